//! The browser tests: headless Debian chromium, driven by playwright-core, against a node started
//! here on port 0.
//! - `tests/browser/demo.mjs`: the demo page. One page chats over WebTransport, one over
//!   WebSocket; a typing indicator crosses as a datagram; reconnects, the offline outbox, the
//!   countdown, message ids and a plain-http page; resume across a reload, history, a reset (the
//!   node's `tiny.*` rooms keep 3 messages), a refused resume. The screenshot is kept in
//!   `target/artifacts/demo.png`.
//! - `tests/browser/presence.mjs`: presence through the client library and the demo page: a
//!   page joined with presence lists, counts and announces a second user (its presence info
//!   shown), keeps doing so across a reconnect, and drops the user once it left and the grace
//!   period (1 s here) passed.
//! - `tests/browser/close.mjs`: a page whose client closes its WebTransport session
//!   (`WebTransport.close()`) leaves its room within 2 s, not at the QUIC idle timeout; a
//!   watcher's presence shows it come (with no presence info) and, after the grace, leave; a
//!   session the node ends (the operator's disconnect) reports close code 4005 to the page.
//! - `tests/browser/backoff.mjs`: the client's reconnect backoff (in Node): uniform in
//!   [d/2, d], d doubling up to the cap.
//! - `tests/browser/package.mjs`: the npm package (`web/`) packed, installed, type-checked with
//!   tsc, and used by a page on another origin (CORS).
//!
//! Besides: the generated wire contract (`web/wire.js`) matches the .proto, and the CORS headers
//! of `/client/*` and `/webtransport/certhash`. `scripts/test.sh` installs chromium,
//! playwright-core and typescript.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{DEADLINE, TestNode};
use roomwire::config::{HistoryMode, RoomClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BROWSER_TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// One Chromium at a time: two at once on a 2-core box make each other's deadlines flaky.
static CHROMIUM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn require_browser() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists()
            && root().join("node_modules/playwright-core").exists()
            && root().join("node_modules/typescript").exists(),
        "the browser tests need {chromium} and node_modules/{{playwright-core,typescript}}: run \
         scripts/test.sh, which installs them"
    );
}

/// Runs `node script args…` from the repository root; returns its output once it succeeded and
/// printed `pass_line`.
async fn run_node_script(script: &str, args: &[&str], pass_line: &str) -> String {
    let child = tokio::process::Command::new("node")
        .arg(root().join(script))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node (Node.js) runs");
    let output = tokio::time::timeout(BROWSER_TEST_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} finishes in time"))
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{log}");
    assert!(output.status.success(), "{script} failed:\n{log}");
    assert!(log.contains(pass_line), "{script} did not say {pass_line}");
    log
}

/// A TCP port free right now on 127.0.0.1, for a server the test cannot start on port 0 (the
/// node must know its origin before it starts).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_chats_over_webtransport_and_websocket_in_chromium() {
    require_browser();
    let _chromium = CHROMIUM.lock().await;
    // `tiny.*` rooms keep 3 messages, so a page away for more is told of a reset.
    let node = TestNode::start_with(|config| {
        config.rooms.classes.insert(
            0,
            RoomClass {
                name: "tiny".into(),
                pattern: "tiny.*".into(),
                history: HistoryMode::Memory,
                max_messages: 3,
                max_age_ms: 3_600_000,
                max_bytes: 64 * 1024,
                presence: false,
                presence_list_max: 1_000,
            },
        );
    })
    .await;
    let base = format!("http://{}", node.addr);
    let screenshot = root().join("target/artifacts/demo.png");
    let _ = std::fs::remove_file(&screenshot);
    run_node_script(
        "tests/browser/demo.mjs",
        &[&base, &screenshot.display().to_string()],
        "BROWSER TEST PASSED",
    )
    .await;
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
    // The node saw both transports and sent the typing indicator as a datagram.
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#) >= 1.0);
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="ws"}"#) >= 1.0);
    assert!(node.metric("roomwire_datagrams_sent_total") >= 1.0);
    // The repeated message id was answered from the node's memory, not delivered again.
    assert!(node.metric("roomwire_duplicate_publishes_total") >= 1.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_keeps_the_presence_of_its_room_in_chromium() {
    require_browser();
    let _chromium = CHROMIUM.lock().await;
    // Diffs every 100 ms and a 1 s grace, so a leave shows within about a second.
    let node = TestNode::start_with(|config| {
        config.rooms.presence_interval_ms = 100;
        config.rooms.presence_grace_ms = 1_000;
    })
    .await;
    let base = format!("http://{}", node.addr);
    run_node_script(
        "tests/browser/presence.mjs",
        &[&base, "1000", "100"],
        "PRESENCE TEST PASSED",
    )
    .await;
    // The diffs came from the node's presence; the page resumed over WebTransport.
    assert!(node.metric("roomwire_presence_diffs_total") >= 1.0);
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#) >= 2.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_closes_its_webtransport_session_leaves_the_room_at_once_in_chromium() {
    require_browser();
    let _chromium = CHROMIUM.lock().await;
    // Long idle timeouts: only the close itself can end the sessions within the test's 2 s.
    // Presence diffs every 100 ms and a 1 s grace, so the watcher sees the leaves soon after.
    let node = TestNode::start_with(|config| {
        config.webtransport.idle_timeout_ms = 30_000;
        config.session.idle_timeout_ms = 60_000;
        config.rooms.presence_interval_ms = 100;
        config.rooms.presence_grace_ms = 1_000;
    })
    .await;
    let base = format!("http://{}", node.addr);
    run_node_script(
        "tests/browser/close.mjs",
        &[&base, common::API_KEY, "2000", "4100"],
        "CLOSE TEST PASSED",
    )
    .await;
    // The two closers and the disconnected one (which may have reconnected before its close).
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#) >= 3.0);
    common::eventually("no WebTransport session left", || async {
        node.metric(r#"roomwire_sessions{transport="webtransport"}"#) == 0.0
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packed_npm_package_chats_from_another_origin_in_chromium() {
    require_browser();
    let _chromium = CHROMIUM.lock().await;
    let page_port = free_port();
    let page_origin = format!("http://127.0.0.1:{page_port}");
    let node = TestNode::start_with(|config| {
        config.server.allowed_origins = vec![page_origin.clone()];
    })
    .await;
    let base = format!("http://{}", node.addr);
    run_node_script(
        "tests/browser/package.mjs",
        &[&base, &page_port.to_string()],
        "PACKAGE TEST PASSED",
    )
    .await;
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#) >= 1.0);
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="ws"}"#) >= 1.0);
    node.shutdown().await;
}

/// The reconnect backoff's distribution (Node only, no page): exponential, capped, spread.
#[tokio::test]
async fn the_browser_clients_reconnect_backoff_is_capped_and_spread() {
    run_node_script("tests/browser/backoff.mjs", &[], "BACKOFF TEST PASSED").await;
}

#[test]
fn the_browser_client_wire_contract_is_generated_from_the_proto() {
    let output = std::process::Command::new("node")
        .arg(root().join("web/tools/generate-wire.mjs"))
        .arg("--check")
        .current_dir(root())
        .output()
        .expect("node (Node.js) runs");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One request; returns the status and the response head's lines (lowercased names).
async fn request_head(
    node: &TestNode,
    method: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>) {
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let extra: String = extra_headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .unwrap();
    let response = String::from_utf8_lossy(&response).to_string();
    let head = response.split("\r\n\r\n").next().unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status.parse().unwrap(), headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn client_files_and_the_certificate_hash_answer_cors_for_allowed_origins() {
    const APP: &str = "https://app.example";
    let node = TestNode::start_with(|config| {
        config.server.allowed_origins = vec![APP.into()];
    })
    .await;
    for path in ["/client/roomwire.js", "/webtransport/certhash"] {
        let (status, headers) = request_head(&node, "GET", path, &[("Origin", APP)]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            Some(APP),
            "{path}"
        );
        assert_eq!(header(&headers, "vary"), Some("origin"), "{path}");

        let (status, headers) =
            request_head(&node, "GET", path, &[("Origin", "https://evil.example")]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            None,
            "{path}"
        );
        assert_eq!(header(&headers, "vary"), Some("origin"), "{path}");

        let preflight = [
            ("Origin", APP),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "cache-control"),
        ];
        let (status, headers) = request_head(&node, "OPTIONS", path, &preflight).await;
        assert_eq!(status, 204, "{path} preflight");
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            Some(APP),
            "{path}"
        );
        assert!(
            header(&headers, "access-control-allow-methods").is_some_and(|m| m.contains("GET")),
            "{path}: {headers:?}"
        );
        assert_eq!(
            header(&headers, "access-control-allow-headers"),
            Some("cache-control"),
            "{path}"
        );
    }
    // The other routes are not for browsers on other origins.
    let (_, headers) = request_head(&node, "GET", "/healthz", &[("Origin", APP)]).await;
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    // The generated wire contract is served beside the client that imports it.
    let (status, _) = request_head(&node, "GET", "/client/wire.js", &[]).await;
    assert_eq!(status, 200);
    node.shutdown().await;

    let open = TestNode::start_with(|config| {
        config.server.allowed_origins = vec!["*".into()];
    })
    .await;
    for path in ["/client/roomwire.js", "/webtransport/certhash"] {
        let (_, headers) =
            request_head(&open, "GET", path, &[("Origin", "https://any.example")]).await;
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            Some("*"),
            "{path}"
        );
    }
    open.shutdown().await;
}
