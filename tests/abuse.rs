//! Bad input over real sockets: every refusal is a clear Error frame or close code, counted in
//! metrics, and nothing already accepted is lost for anyone else.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use roomwire::proto::{self, CloseCode, ErrorCode, client_frame, server_frame};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn error_code(frame: &proto::ServerFrame) -> ErrorCode {
    match &frame.kind {
        Some(server_frame::Kind::Error(e)) => ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let node = TestNode::start_with(|c| c.session.max_frame_bytes = 1024).await;
    let mut ws = node.raw_connected("big").await;
    ws.send(WsMessage::Binary(Bytes::from(vec![0u8; 1025])))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut ws).await,
        Some(CloseCode::MessageTooBig as u16)
    );
    eventually("close counted", || async {
        node.metric(r#"roomwire_sessions_closed_total{reason="message_too_big"}"#) == 1.0
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn text_and_garbage_frames_get_errors_then_a_close_on_repeat() {
    let node = TestNode::start_with(|c| c.session.max_violations = 3).await;
    let mut ws = node.raw_connected("noisy").await;
    ws.send(WsMessage::Text("hello?".into())).await.unwrap();
    assert_eq!(
        error_code(&read_frame(&mut ws).await.unwrap()),
        ErrorCode::TextFrame
    );
    ws.send(WsMessage::Binary(Bytes::from_static(&[
        0xff, 0xff, 0xff, 0x07,
    ])))
    .await
    .unwrap();
    assert_eq!(
        error_code(&read_frame(&mut ws).await.unwrap()),
        ErrorCode::BadFrame
    );
    // The session still works between violations.
    send_frame(
        &mut ws,
        9,
        client_frame::Kind::Ping(proto::Ping { nonce: 5 }),
    )
    .await;
    let pong = read_frame(&mut ws).await.unwrap();
    assert_eq!(pong.request_id, 9);
    assert!(matches!(
        pong.kind,
        Some(server_frame::Kind::Pong(proto::Pong { nonce: 5 }))
    ));
    send_frame(
        &mut ws,
        10,
        client_frame::Kind::Connect(proto::Connect::default()),
    )
    .await;
    let third = read_frame(&mut ws).await.unwrap();
    assert_eq!(
        (error_code(&third), third.request_id),
        (ErrorCode::UnexpectedFrame, 10)
    );
    assert_eq!(
        close_code(&mut ws).await,
        Some(CloseCode::ProtocolViolation as u16)
    );
    assert_eq!(
        node.metric(r#"roomwire_errors_total{code="TEXT_FRAME"}"#),
        1.0
    );
    assert_eq!(
        node.metric(r#"roomwire_errors_total{code="BAD_FRAME"}"#),
        1.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_first_frame_must_be_connect() {
    let node = TestNode::start().await;
    let mut ws = node.raw().await;
    send_frame(
        &mut ws,
        1,
        client_frame::Kind::Join(proto::Join {
            room: "x".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        error_code(&read_frame(&mut ws).await.unwrap()),
        ErrorCode::UnexpectedFrame
    );
    assert_eq!(
        close_code(&mut ws).await,
        Some(CloseCode::ProtocolViolation as u16)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_text_first_frame_gets_an_error_then_close_and_pings_before_connect_are_fine() {
    let node = TestNode::start().await;
    let mut ws = node.raw().await;
    ws.send(WsMessage::Text("CONNECT".into())).await.unwrap();
    assert_eq!(
        error_code(&read_frame(&mut ws).await.unwrap()),
        ErrorCode::TextFrame
    );
    assert_eq!(
        close_code(&mut ws).await,
        Some(CloseCode::ProtocolViolation as u16)
    );

    let mut ws = node.raw().await;
    ws.send(WsMessage::Ping(Bytes::from_static(b"early")))
        .await
        .unwrap();
    send_frame(
        &mut ws,
        4,
        client_frame::Kind::Connect(proto::Connect::default()),
    )
    .await;
    let connected = read_frame(&mut ws).await.unwrap();
    assert_eq!(connected.request_id, 4);
    assert!(
        matches!(connected.kind, Some(server_frame::Kind::Connected(_))),
        "{connected:?}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn no_connect_within_the_handshake_timeout_closes_with_4003() {
    let node = TestNode::start_with(|c| c.server.handshake_timeout_ms = 200).await;
    let mut ws = node.raw().await;
    assert_eq!(
        close_code(&mut ws).await,
        Some(CloseCode::HandshakeTimeout as u16)
    );
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="handshake_timeout"}"#),
        1.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_slowloris_http_client_is_cut_off_by_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start_with(|c| c.server.handshake_timeout_ms = 200).await;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The node closes the connection (possibly after a 408) instead of waiting forever.
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .ok();
    node.shutdown().await;
}

#[tokio::test]
async fn an_invalid_user_token_is_refused_with_4004() {
    let node = TestNode::start().await;
    let mut ws = node.raw().await;
    send_frame(
        &mut ws,
        1,
        client_frame::Kind::Connect(proto::Connect {
            token: "no spaces allowed".into(),
            ..Default::default()
        }),
    )
    .await;
    let frame = read_frame(&mut ws).await.unwrap();
    assert_eq!(
        (error_code(&frame), frame.request_id),
        (ErrorCode::Unauthorized, 1)
    );
    assert_eq!(
        close_code(&mut ws).await,
        Some(CloseCode::Unauthorized as u16)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed_after_the_idle_timeout() {
    // Generous against a loaded CI box: the live client has 2 s to answer a 200 ms ping.
    let node = TestNode::start_with(|c| {
        c.session.heartbeat_interval_ms = 200;
        c.session.idle_timeout_ms = 2_000;
    })
    .await;
    // A live client answers pings (its library reads and pongs) and stays.
    let mut live = node.client("live").await;
    // The raw connection never reads, so it never answers a ping.
    let mut silent = node.raw_connected("silent").await;
    eventually("idle session closed", || async {
        node.metric(r#"roomwire_sessions_closed_total{reason="idle_timeout"}"#) >= 1.0
    })
    .await;
    assert_eq!(
        close_code(&mut silent).await,
        Some(CloseCode::IdleTimeout as u16)
    );
    // The live one outlived the idle timeout.
    tokio::time::timeout(Duration::from_millis(500), live.next_event())
        .await
        .expect_err("live client got no close");
    live.ping().await.unwrap();
    assert_eq!(
        node.metric(r#"roomwire_sessions_closed_total{reason="idle_timeout"}"#),
        1.0
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_while_the_others_receive_everything() {
    const QUEUE_BYTES: usize = 256 * 1024;
    let node = TestNode::start_with(|c| {
        c.session.send_queue_frames = 64;
        c.session.send_queue_bytes = QUEUE_BYTES;
        // The publisher is a firehose on purpose; this test is about the stuck reader.
        c.limits.session_frames_per_second = 1_000_000;
        c.limits.session_bytes_per_second = 1 << 30;
        c.limits.session_byte_burst = 1 << 30;
    })
    .await;
    let mut stuck = node.raw_connected("stuck").await;
    send_frame(
        &mut stuck,
        2,
        client_frame::Kind::Join(proto::Join {
            room: "firehose".into(),
            ..Default::default()
        }),
    )
    .await;
    let mut readers = Vec::new();
    for i in 0..3 {
        let client = node.client(&format!("reader{i}")).await;
        client.join("firehose").await.unwrap();
        readers.push(client);
    }
    // Readers drain concurrently, so they are never the slow ones.
    let collectors: Vec<_> = readers
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                while let Some(roomwire::client::Event::Message(m)) = client.next_event().await {
                    seqs.push(m.seq);
                    if m.payload.is_empty() {
                        break;
                    }
                }
                seqs
            })
        })
        .collect();
    let publisher = node.client("publisher").await;
    let payload = Bytes::from(vec![b'x'; 4096]);
    let mut published = 0u64;
    let mut max_queued = 0.0f64;
    // Publish until the stuck session is cut off (the kernel's socket buffers absorb some MB first).
    while node.metric("roomwire_slow_consumer_drops_total") < 1.0 {
        assert!(published < 50_000, "the stuck session was never cut off");
        publisher
            .publish("firehose", payload.clone(), "")
            .await
            .unwrap();
        published += 1;
        max_queued = max_queued.max(node.metric("roomwire_send_queue_bytes"));
    }
    for _ in 0..100 {
        publisher
            .publish("firehose", payload.clone(), "")
            .await
            .unwrap();
        published += 1;
    }
    publisher
        .publish("firehose", Bytes::new(), "end")
        .await
        .unwrap();
    published += 1;
    for collector in collectors {
        let seqs = collector.await.unwrap();
        assert_eq!(
            seqs,
            (1..=published).collect::<Vec<_>>(),
            "a reader missed messages"
        );
    }
    // Memory stayed bounded: never more queued than every member's bound together.
    assert!(
        max_queued <= (5 * QUEUE_BYTES) as f64,
        "queued {max_queued} bytes"
    );
    // The stuck client, once it reads, finds the documented close code after what was sent.
    assert_eq!(
        close_code(&mut stuck).await,
        Some(CloseCode::SlowConsumer as u16)
    );
    assert_eq!(
        node.metric(r#"roomwire_sessions_closed_total{reason="slow_consumer"}"#),
        1.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_at_accept() {
    let node = TestNode::start_with(|c| c.server.max_connections = 2).await;
    let _a = node.client("a").await;
    let _b = node.client("b").await;
    let third = roomwire::client::Client::connect(
        &node.ws_url(),
        roomwire::client::ClientOptions::user("c"),
    )
    .await;
    assert!(third.is_err());
    eventually("refusal counted", || async {
        node.metric(r#"roomwire_connections_refused_total{reason="max_connections"}"#) >= 1.0
    })
    .await;
    drop(_a);
    // A freed slot is usable again.
    eventually("slot freed", || async {
        roomwire::client::Client::connect(
            &node.ws_url(),
            roomwire::client::ClientOptions::user("d"),
        )
        .await
        .is_ok()
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_wrong_subprotocol_is_refused_before_upgrade() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = TestNode::start().await;
    let mut request = node.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    node.shutdown().await;
}
