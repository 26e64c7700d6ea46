//! The README's story with the real binary: start a node, open two `roomwire client` sessions,
//! chat. Also: a bad configuration exits with 64 before binding anything.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_roomwire");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Reads lines of `reader` until one contains `needle`.
async fn wait_for_line<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut tokio::io::Lines<BufReader<R>>,
    needle: &str,
) -> String {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("stream ended before {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no line with {needle:?} in time"))
}

#[tokio::test]
async fn two_cli_clients_chat_through_a_node_started_from_the_binary() {
    let mut node = Killed(
        Command::new(BIN)
            .args([
                "--set",
                r#"server.listen=["127.0.0.1:0"]"#,
                "--set",
                r#"webtransport.listen=["127.0.0.1:0"]"#,
                "--set",
                "node.id=cli-test",
            ])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    );
    let mut node_log = BufReader::new(node.0.stderr.take().unwrap()).lines();
    let line = wait_for_line(&mut node_log, "serving HTTP").await;
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let url = format!("ws://{addr}/ws");

    let spawn_chat = |user: &str| {
        Killed(
            Command::new(BIN)
                .args(["client", "--url", &url, "--token", user, "chat", "lobby"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        )
    };
    let mut alice = spawn_chat("alice");
    let mut bob = spawn_chat("bob");
    let mut alice_err = BufReader::new(alice.0.stderr.take().unwrap()).lines();
    let mut bob_err = BufReader::new(bob.0.stderr.take().unwrap()).lines();
    wait_for_line(&mut alice_err, "joined lobby").await;
    wait_for_line(&mut bob_err, "joined lobby").await;

    let mut bob_out = BufReader::new(bob.0.stdout.take().unwrap()).lines();
    let mut alice_out = BufReader::new(alice.0.stdout.take().unwrap()).lines();
    alice
        .0
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"hello from alice\n")
        .await
        .unwrap();
    let line = wait_for_line(&mut bob_out, "hello from alice").await;
    assert!(line.contains("alice:"), "{line}");
    bob.0
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"hi alice\n")
        .await
        .unwrap();
    wait_for_line(&mut alice_out, "bob: hi alice").await;

    // Ctrl-D ends a chat cleanly.
    drop(alice.0.stdin.take());
    let status = tokio::time::timeout(DEADLINE, alice.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    // SIGTERM drains the node: bob is told to go away and sees 1001.
    let pid = node.0.id().unwrap().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    wait_for_line(&mut bob_err, "node going away").await;
    wait_for_line(&mut bob_err, "closed (1001)").await;
    let status = tokio::time::timeout(DEADLINE, node.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "node exit {status}");
}

#[tokio::test]
async fn a_bad_configuration_exits_with_64_before_binding() {
    for args in [
        vec!["--set", "session.no_such_key=1"],
        vec![
            "--set",
            "session.heartbeat_interval_ms=5000",
            "--set",
            "session.idle_timeout_ms=10",
        ],
        vec!["--config", "/nonexistent/roomwire.toml"],
        // Files the configuration names are loaded before any port is bound.
        vec![
            "--set",
            "tls.enabled=true",
            "--set",
            "tls.cert_file=/nonexistent/node.pem",
        ],
        vec![
            "--set",
            "auth.mode=jwt",
            "--set",
            "auth.jwt.secret_file=/nonexistent/secret",
        ],
    ] {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(BIN).args(&args).output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            output.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!output.stderr.is_empty());
    }
}

#[tokio::test]
async fn the_region_example_is_the_effective_default() {
    // regions/local.toml documents every key with its default: loading it changes nothing.
    let from_file = Command::new(BIN)
        .args(["--config", "regions/local.toml", "--print-config"])
        .output()
        .await
        .unwrap();
    let defaults = Command::new(BIN)
        .args(["--print-config"])
        .output()
        .await
        .unwrap();
    assert!(from_file.status.success());
    assert_eq!(
        String::from_utf8_lossy(&from_file.stdout),
        String::from_utf8_lossy(&defaults.stdout)
    );
}

#[tokio::test]
async fn the_cli_publishes_over_webtransport_trusting_the_certificate_hash() {
    let node = TestNode::start().await;
    let mut listener = node.client("bob").await;
    listener.join("lobby").await.unwrap();
    let hex = node.cert_hash_hex();
    let url = node.wt_url();
    let run = |hash: String| {
        let url = url.clone();
        async move {
            tokio::time::timeout(
                DEADLINE,
                Command::new(BIN)
                    .args([
                        "client",
                        "--url",
                        &url,
                        "--cert-hash",
                        &hash,
                        "--token",
                        "carol",
                    ])
                    .args(["publish", "lobby", "over quic"])
                    .output(),
            )
            .await
            .expect("the CLI finishes in time")
            .unwrap()
        }
    };
    let output = run(hex).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("published to lobby"), "{stdout}");
    let m = next_message(&mut listener).await;
    assert_eq!(
        (m.publisher.as_str(), &m.payload[..]),
        ("carol", &b"over quic"[..])
    );
    // A wrong pin fails the TLS handshake: no session, non-zero exit.
    let output = run("00".repeat(32)).await;
    assert!(!output.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_cli_processes_connecting_over_webtransport_at_once_all_succeed() {
    // Separate processes on a busy box: a client's CONNECT request can overtake its HTTP/3
    // SETTINGS, and the node must wait for them instead of refusing the session.
    const CLIENTS: usize = 64;
    let node = TestNode::start_with(|c| {
        c.limits.max_connections_per_ip = 1000;
        c.limits.connections_per_ip_per_second = 1000;
        c.limits.connection_burst_per_ip = 1000;
    })
    .await;
    let hex = node.cert_hash_hex();
    let url = node.wt_url();
    let runs = (0..CLIENTS).map(|i| {
        let (url, hex) = (url.clone(), hex.clone());
        tokio::spawn(async move {
            Command::new(BIN)
                .args(["client", "--url", &url, "--cert-hash", &hex])
                .args(["--token", &format!("u{i}"), "publish", "lobby", "hi"])
                .output()
                .await
                .unwrap()
        })
    });
    let outputs = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(runs),
    )
    .await
    .expect("every CLI finishes in time");
    let failed: Vec<String> = outputs
        .into_iter()
        .map(|o| o.unwrap())
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#),
        CLIENTS as f64
    );
}
