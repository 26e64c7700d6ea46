//! The README's story with the real binary: start a node, open two `roomwire client` sessions,
//! chat. Also: a bad configuration exits with 64 before binding anything.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::proxy::TcpProxy;
use common::*;
use roomwire::client::{Client, ClientOptions};
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
    // A banner first: where to point a browser, and the API key generated for this run.
    let demo = wait_for_line(&mut node_log, "demo page").await;
    assert!(demo.contains("http://127.0.0.1:"), "{demo}");
    let key = wait_for_line(&mut node_log, "API key").await;
    assert!(key.contains("generated for this run"), "{key}");
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
    // The session's end is the node closing the connection: no warning about it.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("WARN"), "{stderr}");
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

/// Runs `roomwire client --url URL ARGS...` to completion (within the deadline).
async fn run_client(url: &str, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        DEADLINE,
        Command::new(BIN)
            .args(["client", "--url", url])
            .args(args)
            .output(),
    )
    .await
    .expect("the CLI finishes in time")
    .unwrap()
}

/// A `roomwire client ... chat ROOM` process with piped standard streams.
struct Chat {
    child: Killed,
    out: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    err: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
}

impl Chat {
    /// Starts a chat and waits until it has joined `room`.
    async fn start(url: &str, user: &str, room: &str, extra: &[&str]) -> Chat {
        let mut child = Killed(
            Command::new(BIN)
                .args(["client", "--url", url, "--token", user, "chat", room])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
        let out = BufReader::new(child.0.stdout.take().unwrap()).lines();
        let err = BufReader::new(child.0.stderr.take().unwrap()).lines();
        let mut chat = Chat { child, out, err };
        wait_for_line(&mut chat.err, &format!("joined {room}")).await;
        chat
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.child.0.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// Waits for the process to exit (its standard input still open).
    async fn exit_status(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(DEADLINE, self.child.0.wait())
            .await
            .expect("the chat exits in time")
            .unwrap()
    }
}

#[tokio::test]
async fn two_chats_of_one_user_never_share_message_ids() {
    // The node de-duplicates client message ids per user for two minutes: two terminals of one
    // user (or a chat restarted within that window) must not number their lines alike.
    let node = TestNode::start().await;
    let mut listener = node.client("bob").await;
    listener.join("lobby").await.unwrap();
    let url = node.ws_url();
    let mut first = Chat::start(&url, "alice", "lobby", &[]).await;
    first.say("from the first terminal").await;
    let m = next_message(&mut listener).await;
    assert_eq!(&m.payload[..], b"from the first terminal");
    let mut second = Chat::start(&url, "alice", "lobby", &[]).await;
    second.say("from the second terminal").await;
    let m = next_message(&mut listener).await;
    assert_eq!(&m.payload[..], b"from the second terminal");
    assert_ne!(m.client_msg_id, "", "chat lines carry ids");
    first.say("and the first again").await;
    let m = next_message(&mut listener).await;
    assert_eq!(&m.payload[..], b"and the first again");
}

#[tokio::test]
async fn a_publish_answered_as_duplicate_says_so() {
    let node = TestNode::start().await;
    let url = node.ws_url();
    let args = [
        "--token", "alice", "publish", "lobby", "once", "--id", "x-1",
    ];
    let first = run_client(&url, &args).await;
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}");
    assert!(stdout.contains("published to lobby"), "{stdout}");
    assert!(!stdout.contains("duplicate"), "{stdout}");
    let again = run_client(&url, &args).await;
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{stdout}");
    assert!(
        stdout.contains("duplicate") && stdout.contains("not delivered again"),
        "{stdout}"
    );
}

#[tokio::test]
async fn chat_exits_at_once_when_the_node_ends_the_session() {
    let node = TestNode::start().await;
    let url = node.ws_url();
    // Standard input stays open: the chat must not wait for a line to notice the close. An
    // operator's disconnect (4005) is deliberate, so --reconnect does not come back either.
    let mut plain = Chat::start(&url, "alice", "lobby", &[]).await;
    let mut reconnecting = Chat::start(&url, "alice", "lobby", &["--reconnect"]).await;
    let (status, _) = node
        .http(
            "POST",
            "/api/v1/users/alice/disconnect",
            Some(API_KEY),
            None,
        )
        .await;
    assert_eq!(status, 200);
    for chat in [&mut plain, &mut reconnecting] {
        wait_for_line(&mut chat.err, "closed (4005)").await;
        let status = chat.exit_status().await;
        assert!(
            !status.success(),
            "a session ended by the node exits non-zero"
        );
    }
}

#[tokio::test]
async fn chat_with_reconnect_comes_back_and_gets_what_it_missed() {
    let node = TestNode::start().await;
    let proxy = TcpProxy::start(node.addr);
    let mut bob = node.client("bob").await;
    bob.join("lobby").await.unwrap();
    let url = format!("ws://{}/ws", proxy.addr);
    let mut alice = Chat::start(&url, "alice", "lobby", &["--reconnect"]).await;
    bob.publish("lobby", "before", "b-1").await.unwrap();
    wait_for_line(&mut alice.out, "bob: before").await;

    // The network drops alice's connection, and her next attempts hang until it heals: the
    // message published meanwhile can reach her only through the resume.
    proxy.blackhole();
    proxy.cut();
    wait_for_line(&mut alice.err, "reconnecting in").await;
    let ack = bob.publish("lobby", "while away", "b-2").await.unwrap();
    proxy.forward();
    let line = wait_for_line(&mut alice.out, "bob: while away").await;
    assert!(line.contains(&format!("#{}", ack.seq)), "{line}");
    wait_for_line(&mut alice.err, "recovered, 1 missed").await;

    alice.say("back again").await;
    loop {
        let m = next_message(&mut bob).await;
        if m.publisher == "alice" {
            assert_eq!(&m.payload[..], b"back again");
            break;
        }
    }
}

#[tokio::test]
async fn client_history_pages_back_through_a_room() {
    let node = TestNode::start().await;
    let alice = node.client("alice").await;
    let mut epoch = 0;
    for (i, text) in ["one", "two", "three"].into_iter().enumerate() {
        let ack = alice
            .publish("lobby", text, &format!("h-{i}"))
            .await
            .unwrap();
        epoch = ack.epoch;
    }
    let url = node.ws_url();
    let newest = run_client(
        &url,
        &["--token", "bob", "history", "lobby", "--limit", "2"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&newest.stdout);
    let stderr = String::from_utf8_lossy(&newest.stderr);
    assert!(newest.status.success(), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("[lobby {epoch}:3] alice: three"),
            format!("[lobby {epoch}:2] alice: two")
        ],
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("more: --before {epoch}:2")),
        "{stderr}"
    );
    let before = format!("{epoch}:2");
    let older = run_client(
        &url,
        &["--token", "bob", "history", "lobby", "--before", &before],
    )
    .await;
    let stdout = String::from_utf8_lossy(&older.stdout);
    assert_eq!(stdout.trim(), format!("[lobby {epoch}:1] alice: one"));
    let after = format!("{epoch}:1");
    let newer = run_client(
        &url,
        &["--token", "bob", "history", "lobby", "--after", &after],
    )
    .await;
    let stdout = String::from_utf8_lossy(&newer.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!("[lobby {epoch}:2] alice: two"),
            format!("[lobby {epoch}:3] alice: three")
        ]
    );
    // A malformed position is a usage error, before any connection.
    let bad = run_client(&url, &["history", "lobby", "--before", "7"]).await;
    assert_eq!(bad.status.code(), Some(2));
}

/// `roomwire token ARGS...`: the token printed, or the failure's standard error.
async fn mint_token(args: &[&str]) -> Result<String, String> {
    let output = Command::new(BIN)
        .arg("token")
        .args(args)
        .output()
        .await
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).unwrap().trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[tokio::test]
async fn a_token_minted_by_the_cli_is_accepted_in_jwt_mode() {
    use roomwire::config::{AuthMode, JwtAlgorithm};
    let secret = "a-secret-of-at-least-32-bytes-for-hs256";
    let node = TestNode::start_with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt.secret = Some(secret.into());
    })
    .await;
    let set_secret = format!("auth.jwt.secret={secret}");
    let token = mint_token(&[
        "--sub",
        "alice",
        "--join",
        "chat.*",
        "--publish",
        "chat.lobby",
        "--ttl",
        "1h",
        "--info",
        r#"{"name":"Alice"}"#,
        "--set",
        "auth.mode=jwt",
        "--set",
        &set_secret,
    ])
    .await
    .unwrap();
    let alice = Client::connect(&node.ws_url(), ClientOptions::user(&token))
        .await
        .expect("the node accepts the minted token");
    assert_eq!(alice.connected().user_id, "alice");
    let expires_in = alice.connected().token_expires_at_ms / 1000
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
    assert!((3500..=3600).contains(&expires_in), "{expires_in}");
    alice.join("chat.random").await.unwrap();
    // --info is the token's info claim: alice's presence info.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = alice.presence("chat.random").await.unwrap();
        if let Some(me) = page.members.iter().find(|m| m.user_id == "alice") {
            assert_eq!(&me.info[..], br#"{"name":"Alice"}"#);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice.publish("chat.lobby", "hi", "t-1").await.unwrap();
    let refused = alice.publish("chat.random", "hi", "t-2").await.unwrap_err();
    assert_eq!(
        refused_code(&refused),
        Some(roomwire::proto::ErrorCode::Forbidden)
    );
    let refused = alice.join("news.today").await.unwrap_err();
    assert_eq!(
        refused_code(&refused),
        Some(roomwire::proto::ErrorCode::Forbidden)
    );
    // Each token connects once (anti-replay): a second one for the same user is minted anew.
    assert!(
        Client::connect(&node.ws_url(), ClientOptions::user(&token))
            .await
            .is_err()
    );

    // ES256: the node holds the public key, the tool signs with the private one.
    let dir = std::env::temp_dir().join(format!("roomwire-token-{}", roomwire::random_hex(6)));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (private, public) = (dir.join("issuer-key.pem"), dir.join("issuer.pem"));
    std::fs::write(&private, key.serialize_pem()).unwrap();
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let public_file = public.display().to_string();
    let es256 = TestNode::start_with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt.algorithm = JwtAlgorithm::Es256;
        c.auth.jwt.public_key_file = Some(public_file.clone());
    })
    .await;
    let set_key = format!("auth.jwt.public_key_file={public_file}");
    let es256_args = [
        "--sub",
        "bob",
        "--join",
        "chat.>",
        "--set",
        "auth.mode=jwt",
        "--set",
        "auth.jwt.algorithm=ES256",
        "--set",
        &set_key,
    ];
    let error = mint_token(&es256_args).await.unwrap_err();
    assert!(error.contains("--key"), "{error}");
    let mut with_key = es256_args.to_vec();
    let private_file = private.display().to_string();
    with_key.extend(["--key", &private_file]);
    let token = mint_token(&with_key).await.unwrap();
    let bob = Client::connect(&es256.ws_url(), ClientOptions::user(&token))
        .await
        .expect("the node accepts the ES256 token");
    assert_eq!(bob.connected().user_id, "bob");
    bob.join("chat.a.b").await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    // A token can never name a service.
    let error = mint_token(&[
        "--sub",
        "service:billing",
        "--set",
        "auth.mode=jwt",
        "--set",
        &set_secret,
    ])
    .await
    .unwrap_err();
    assert!(error.contains("service"), "{error}");
}

#[tokio::test]
async fn print_config_redacts_secrets() {
    let output = Command::new(BIN)
        .args(["--print-config"])
        .args([
            "--set",
            "auth.jwt.secret=hs256-secret-that-must-not-be-printed",
        ])
        .args(["--set", r#"api.keys=["api-key-that-must-not-be-printed"]"#])
        .args(["--set", "mesh.token=nats-token-that-must-not-be-printed"])
        .args([
            "--set",
            r#"mesh.nats_urls=["nats://user:nats-password-not-printed@127.0.0.1:4222"]"#,
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stdout.contains("must-not-be-printed"), "{stdout}");
    assert!(!stdout.contains("nats-password"), "{stdout}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
    assert!(
        stdout.contains("nats://user:<redacted>@127.0.0.1:4222")
            || stdout.contains("nats://user:%3Credacted%3E@127.0.0.1:4222"),
        "{stdout}"
    );
}

#[tokio::test]
async fn certs_init_refuses_to_overwrite_without_force_and_says_what_next() {
    let dir = std::env::temp_dir().join(format!("roomwire-certs-{}", roomwire::random_hex(6)));
    let dir_arg = dir.display().to_string();
    let init = |force: bool| {
        let mut command = Command::new(BIN);
        command.args(["certs", "init", "--dir", &dir_arg, "--service", "billing"]);
        if force {
            command.arg("--force");
        }
        command.output()
    };
    let first = init(false).await.unwrap();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        stdout.contains("next:") && stdout.contains("tls.cert_file="),
        "{stdout}"
    );
    assert!(stdout.contains("--ca-file"), "{stdout}");
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();

    let again = init(false).await.unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        stderr.contains("--force") && stderr.contains("ca.pem"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        ca,
        "the CA is untouched"
    );

    let forced = init(true).await.unwrap();
    assert!(forced.status.success());
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca, "a new CA");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failing_client_says_each_cause_once() {
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = run_client(
        &format!("ws://127.0.0.1:{port}/ws"),
        &["publish", "lobby", "hi"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.matches("refused").count(), 1, "{stderr}");
}
