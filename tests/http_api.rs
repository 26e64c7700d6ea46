//! The HTTP routes on the WebSocket port, the server API, and the graceful drain.

mod common;

use common::*;
use roomwire::client::Event;
use roomwire::proto::CloseCode;

#[tokio::test]
async fn health_readiness_and_metrics_answer_while_sessions_are_live() {
    let node = TestNode::start().await;
    let mut member = node.client("m").await;
    member.join("lobby").await.unwrap();
    member.publish("lobby", "x", "").await.unwrap();
    next_message(&mut member).await;

    assert_eq!(
        node.http("GET", "/healthz", None, None).await,
        (200, "ok\n".into())
    );
    assert_eq!(
        node.http("GET", "/readyz", None, None).await,
        (200, "ready\n".into())
    );
    let (status, metrics) = node.http("GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    for expected in [
        r#"roomwire_sessions{transport="ws"} 1"#,
        "roomwire_messages_published_total 1",
        "roomwire_deliveries_total 1",
        "roomwire_slow_consumer_drops_total 0",
        r#"roomwire_frames_received_total{kind="publish"} 1"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
    // The session is unaffected by the HTTP traffic beside it.
    member.ping().await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn server_side_publish_reaches_members_and_needs_the_api_key() {
    let node = TestNode::start().await;
    let mut member = node.client("m").await;
    member.join("alerts").await.unwrap();
    let body = r#"{"room":"alerts","data":"deploy finished","client_msg_id":"ci-1"}"#;

    let (status, response) = node.http("POST", "/api/v1/publish", None, Some(body)).await;
    assert_eq!(status, 401, "{response}");
    assert!(response.contains(r#""error":"unauthorized""#));
    let (status, _) = node
        .http(
            "POST",
            "/api/v1/publish",
            Some("wrong-key-wrong-key"),
            Some(body),
        )
        .await;
    assert_eq!(status, 401);

    let (status, response) = node
        .http("POST", "/api/v1/publish", Some(API_KEY), Some(body))
        .await;
    assert_eq!(status, 200, "{response}");
    let response: serde_json::Value = serde_json::from_str(&response).unwrap();
    assert_eq!(
        (
            response["seq"].as_u64(),
            response["local_deliveries"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let m = next_message(&mut member).await;
    assert_eq!(
        (
            &m.payload[..],
            m.publisher.as_str(),
            m.client_msg_id.as_str()
        ),
        (&b"deploy finished"[..], "$server", "ci-1")
    );

    let (status, _) = node
        .http(
            "POST",
            "/api/v1/publish",
            Some(API_KEY),
            Some(r#"{"room":"alerts","data_base64":"AAEC/w=="}"#),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        &next_message(&mut member).await.payload[..],
        &[0, 1, 2, 255]
    );

    for bad in [
        r#"{"room":"alerts"}"#,
        r#"{"room":"a b","data":"x"}"#,
        r#"{"room":"alerts","user":"bob","data":"x"}"#,
        r#"{"room":"alerts","data":"x","extra":1}"#,
        r#"{"room":"alerts","data_base64":"!!!"}"#,
        "not json",
    ] {
        let (status, response) = node
            .http("POST", "/api/v1/publish", Some(API_KEY), Some(bad))
            .await;
        // 400 for what we refuse, 422 for JSON of the wrong shape; always the JSON error body.
        assert!(
            status == 400 || status == 422,
            "{bad} -> {status} {response}"
        );
        assert!(response.contains(r#""error":"bad_request""#), "{response}");
    }
    let huge = format!(r#"{{"room":"alerts","data":"{}"}}"#, "x".repeat(300 * 1024));
    let (status, _) = node
        .http("POST", "/api/v1/publish", Some(API_KEY), Some(&huge))
        .await;
    assert_eq!(status, 413);
    node.shutdown().await;
}

#[tokio::test]
async fn room_info_lists_members_and_operators_can_disconnect_a_user() {
    let node = TestNode::start().await;
    let mut troll = node.client("troll").await;
    troll.join("forum").await.unwrap();
    let _other = node.client("other").await;
    _other.join("forum").await.unwrap();

    let (status, body) = node
        .http(
            "GET",
            "/api/v1/rooms/forum?members=true",
            Some(API_KEY),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["local_members"], 2);
    let users: Vec<&str> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert!(
        users.contains(&"troll") && users.contains(&"other"),
        "{users:?}"
    );

    let (status, body) = node
        .http(
            "POST",
            "/api/v1/users/troll/disconnect",
            Some(API_KEY),
            None,
        )
        .await;
    assert_eq!(
        (status, body.contains(r#""disconnected":1"#)),
        (200, true),
        "{body}"
    );
    assert_eq!(
        closed_code(&mut troll).await,
        Some(CloseCode::Disconnected as u16)
    );
    eventually("member gone", || async {
        node.http("GET", "/api/v1/rooms/forum", Some(API_KEY), None)
            .await
            .1
            .contains(r#""local_members":1"#)
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_sends_goaway_flushes_and_closes_every_session_with_1001() {
    let node = TestNode::start().await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let client = node.client(&format!("u{i}")).await;
        client.join("room").await.unwrap();
        clients.push(client);
    }
    // Accepted before the drain: must still be delivered before the close.
    clients[0].publish("room", "last words", "").await.unwrap();
    let addr = node.addr;
    node.shutdown().await;
    for mut client in clients {
        let mut saw_message = false;
        let mut saw_goaway = false;
        let code = loop {
            match tokio::time::timeout(DEADLINE, client.next_event())
                .await
                .unwrap()
            {
                Some(Event::Message(m)) => saw_message |= &m.payload[..] == b"last words",
                Some(Event::GoAway(g)) => {
                    assert!(g.reconnect_after_ms > 0);
                    saw_goaway = true;
                }
                Some(Event::Closed { code, .. }) => break code,
                Some(
                    other @ (Event::Error(_)
                    | Event::Joined(_)
                    | Event::TokenExpiring(_)
                    | Event::Left(_)
                    | Event::PresenceDiff(_)
                    | Event::Datagram(_)
                    | Event::EpochChanged(_)),
                ) => {
                    panic!("unexpected {other:?}")
                }
                None => break None,
            }
        };
        assert!(
            saw_message && saw_goaway,
            "message {saw_message} goaway {saw_goaway}"
        );
        assert_eq!(code, Some(CloseCode::GoingAway as u16));
    }
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// One request on an open keep-alive connection; the status, or `None` when the connection
/// was closed instead of answered.
async fn keep_alive_get(stream: &mut tokio::net::TcpStream, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return head.split(' ').nth(1)?.parse().ok();
                }
            }
        }
    })
    .await
    .expect("an answer or a close in time")
}

#[tokio::test]
async fn readyz_on_an_open_keep_alive_connection_answers_503_during_the_drain() {
    let node = TestNode::start_with(|c| {
        c.session.send_queue_frames = 1_000_000;
        c.session.send_queue_bytes = 256 << 20;
        c.limits.session_frames_per_second = 1_000_000;
        c.limits.session_bytes_per_second = 1 << 30;
        c.limits.session_byte_burst = 1 << 30;
    })
    .await;
    // A session that stops reading keeps the drain going (up to drain_grace_ms, 5 s here): the
    // node must write what it had queued before it closes it, and the socket is full.
    let mut stuck = node.raw_connected("stuck").await;
    send_frame(
        &mut stuck,
        2,
        roomwire::proto::client_frame::Kind::Join(roomwire::proto::Join {
            room: "firehose".into(),
            ..Default::default()
        }),
    )
    .await;
    let publisher = node.client("publisher").await;
    let payload = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
    let mut published = 0;
    while node.metric("roomwire_send_queue_bytes") < 1_000_000.0 {
        assert!(published < 20_000, "the stuck session's queue never filled");
        publisher
            .publish("firehose", payload.clone(), "")
            .await
            .unwrap();
        published += 1;
    }
    let mut balancer = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    assert_eq!(keep_alive_get(&mut balancer, "/readyz").await, Some(200));
    node.begin_shutdown();
    eventually("the drain starts", || async { node.ctx.is_draining() }).await;
    assert_eq!(
        keep_alive_get(&mut balancer, "/readyz").await,
        Some(503),
        "answered on the open connection, not closed"
    );
    assert_eq!(keep_alive_get(&mut balancer, "/healthz").await, Some(200));
    assert!(!node.is_finished(), "still draining");
}
