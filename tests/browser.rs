//! The browser test: headless Debian chromium, driven by playwright-core
//! (`tests/browser/demo.mjs`), against a node started here on port 0. One page chats over
//! WebTransport, one over WebSocket; a typing indicator crosses as a datagram; the screenshot is
//! kept in `target/artifacts/demo.png`. `scripts/test.sh` installs chromium and playwright-core.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::TestNode;

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
