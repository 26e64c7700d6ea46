//! The browser test: headless Debian chromium, driven by playwright-core
//! (`tests/browser/demo.mjs`), against a node started here on port 0. One page chats over
//! WebTransport, one over WebSocket; a typing indicator crosses as a datagram; the screenshot is
//! kept in `target/artifacts/demo.png`. Besides, the CORS headers of `/client/*` and
//! `/webtransport/certhash`. `scripts/test.sh` installs chromium and playwright-core.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{DEADLINE, TestNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BROWSER_TEST_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_chats_over_webtransport_and_websocket_in_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists() && root.join("node_modules/playwright-core").exists(),
        "the browser test needs {chromium} and node_modules/playwright-core: run scripts/test.sh, \
         which installs both"
    );
    let node = TestNode::start().await;
    let base = format!("http://{}", node.addr);
    let screenshot = root.join("target/artifacts/demo.png");
    let _ = std::fs::remove_file(&screenshot);
    let child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/demo.mjs"))
        .arg(&base)
        .arg(&screenshot)
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node (Node.js) runs");
    let output = tokio::time::timeout(BROWSER_TEST_TIMEOUT, child.wait_with_output())
        .await
        .expect("the browser test finishes in time")
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{log}");
    assert!(output.status.success(), "browser test failed:\n{log}");
    assert!(log.contains("BROWSER TEST PASSED"));
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
    // The node saw both transports and sent the typing indicator as a datagram.
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#) >= 1.0);
    assert!(node.metric(r#"roomwire_sessions_opened_total{transport="ws"}"#) >= 1.0);
    assert!(node.metric("roomwire_datagrams_sent_total") >= 1.0);
    node.shutdown().await;
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
