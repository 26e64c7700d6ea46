//! WebTransport end to end: real QUIC on 127.0.0.1:0, the node's generated certificate trusted by
//! its SHA-256, WebTransport and WebSocket clients in the same rooms.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{DEADLINE, TestNode, closed_code, eventually, next_message};
use roomwire::client::{Client, ClientError, Event};
use roomwire::proto::{self, ClientFrame, ErrorCode, client_frame};

/// The next event that is not a Message (errors), within the deadline.
async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(DEADLINE, client.next_event())
        .await
        .expect("an event in time")
        .expect("client open")
}

#[tokio::test]
async fn webtransport_and_websocket_members_see_one_order() {
    let node = TestNode::start().await;
    let mut wt = node.wt_client("alice").await;
    let mut ws = node.client("bob").await;
    assert_eq!(wt.transport(), "webtransport");
    assert_eq!(wt.connected().user_id, "alice");
    wt.join("lobby").await.unwrap();
    ws.join("lobby").await.unwrap();

    // Both publish at once, interleaving on the owner.
    const EACH: usize = 20;
    let (a, b) = tokio::join!(
        async {
            for i in 0..EACH {
                wt.publish("lobby", format!("wt-{i}"), &format!("a{i}"))
                    .await
                    .unwrap();
            }
        },
        async {
            for i in 0..EACH {
                ws.publish("lobby", format!("ws-{i}"), &format!("b{i}"))
                    .await
                    .unwrap();
            }
        }
    );
    let ((), ()) = (a, b);
    let mut seen_wt = Vec::new();
    let mut seen_ws = Vec::new();
    for _ in 0..2 * EACH {
        let m = next_message(&mut wt).await;
        seen_wt.push((m.seq, m.publisher, m.payload));
        let m = next_message(&mut ws).await;
        seen_ws.push((m.seq, m.publisher, m.payload));
    }
    assert_eq!(seen_wt, seen_ws);
    let seqs: Vec<u64> = seen_wt.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (1..=2 * EACH as u64).collect::<Vec<_>>());
    assert_eq!(
        node.metric(r#"roomwire_sessions{transport="webtransport"}"#),
        1.0
    );
    wt.close().await;
    eventually("the webtransport session is gone", || async {
        node.metric(r#"roomwire_sessions{transport="webtransport"}"#) == 0.0
    })
    .await;
}

/// Frames that span many QUIC packets and frames that share one: the node reassembles what the
/// stream hands it in chunks, and every byte arrives where it belongs.
#[tokio::test]
async fn large_and_small_frames_over_webtransport_arrive_whole_and_in_order() {
    let node = TestNode::start().await;
    let mut wt = node.wt_client("alice").await;
    let mut ws = node.client("bob").await;
    wt.join("files").await.unwrap();
    ws.join("files").await.unwrap();
    // Near max_frame_bytes (64 KiB), each a different pattern, with small ones between.
    let payloads: Vec<Bytes> = (0..12u8)
        .map(|i| match i % 3 {
            0 => Bytes::from(vec![i; 60_000]),
            1 => Bytes::from(
                (0..40_000u32)
                    .map(|b| (b % 251) as u8 ^ i)
                    .collect::<Vec<u8>>(),
            ),
            _ => Bytes::from(format!("small-{i}")),
        })
        .collect();
    let acks =
        futures_util::future::join_all(payloads.iter().map(|p| wt.publish("files", p.clone(), "")))
            .await;
    for ack in acks {
        ack.unwrap();
    }
    for client in [&mut wt, &mut ws] {
        let mut got = Vec::new();
        for _ in 0..payloads.len() {
            got.push(next_message(client).await.payload);
        }
        assert_eq!(got.len(), payloads.len());
        for (i, (got, sent)) in got.iter().zip(&payloads).enumerate() {
            assert!(
                got == sent,
                "message {i}: {} bytes, sent {}",
                got.len(),
                sent.len()
            );
        }
    }
}

#[tokio::test]
async fn unreliable_publishes_are_datagrams_for_webtransport_and_frames_for_websocket() {
    let node = TestNode::start().await;
    let mut wt = node.wt_client("alice").await;
    let mut ws = node.client("bob").await;
    wt.join("cursors").await.unwrap();
    ws.join("cursors").await.unwrap();

    ws.publish_unreliable("cursors", "x=1").await.unwrap();
    match next_event(&mut wt).await {
        Event::Datagram(m) => {
            assert_eq!(m.payload, Bytes::from("x=1"));
            assert_eq!((m.seq, m.publisher.as_str()), (0, "bob"));
        }
        other => panic!("expected a datagram, got {other:?}"),
    }
    let m = next_message(&mut ws).await;
    assert_eq!((m.seq, &m.payload[..]), (0, &b"x=1"[..]));

    // From the WebTransport side the Publish itself travels as a datagram.
    wt.publish_unreliable("cursors", "x=2").await.unwrap();
    let m = next_message(&mut ws).await;
    assert_eq!(
        (m.seq, &m.payload[..], m.publisher.as_str()),
        (0, &b"x=2"[..], "alice")
    );
    assert!(matches!(next_event(&mut wt).await, Event::Datagram(m) if m.payload == "x=2"));
    assert!(node.metric("roomwire_datagrams_sent_total") >= 2.0);
    assert_eq!(
        node.metric(r#"roomwire_datagrams_received_total{outcome="publish"}"#),
        1.0
    );

    // Reliable messages still come on the stream, in order after the datagrams.
    ws.publish("cursors", "saved", "m1").await.unwrap();
    assert_eq!(next_message(&mut wt).await.seq, 1);
}

#[tokio::test]
async fn an_unreliable_message_too_large_for_a_datagram_is_refused_to_the_publisher() {
    let node = TestNode::start().await;
    let wt = node.wt_client("alice").await;
    let mut ws = node.client("bob").await;
    wt.join("big").await.unwrap();
    ws.join("big").await.unwrap();
    // 4 KB fits a frame (max_frame_bytes 64 KiB) but no QUIC datagram on a 1500-byte path.
    ws.send(ClientFrame {
        request_id: 42,
        kind: Some(client_frame::Kind::Publish(proto::Publish {
            room: "big".into(),
            payload: Bytes::from(vec![b'x'; 4096]),
            client_msg_id: String::new(),
            unreliable: true,
        })),
    })
    .await
    .unwrap();
    // The WebSocket publisher is a member too and gets its frame, then the error.
    assert_eq!(next_message(&mut ws).await.payload.len(), 4096);
    match next_event(&mut ws).await {
        Event::Error(e) => {
            assert_eq!(ErrorCode::try_from(e.code), Ok(ErrorCode::PayloadTooLarge));
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(
        node.metric(r#"roomwire_datagrams_dropped_total{reason="too_large"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_bad_token_is_refused_with_401_before_any_session_exists() {
    let node = TestNode::start().await;
    match Client::connect(&node.wt_url(), node.wt_options("not a user id!")).await {
        Err(ClientError::Status(401)) => {}
        Err(other) => panic!("expected HTTP 401, got {other}"),
        Ok(_) => panic!("a bad token was accepted"),
    }
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="wt_unauthorized"}"#),
        1.0
    );
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#),
        0.0
    );
    // The same node accepts a good token.
    node.wt_client("alice").await;
}

#[tokio::test]
async fn extra_streams_are_reset_and_the_stream_count_is_bounded() {
    let node = TestNode::start_with(|c| c.webtransport.max_bidi_streams = 4).await;
    let client = node.wt_client("alice").await;
    // The session uses one stream; every further one is reset by the node.
    let (mut send1, mut recv1) = client.open_extra_stream().await.unwrap().unwrap();
    send1.write_all(b"hello?").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(DEADLINE, recv1.read(&mut buf))
        .await
        .expect("the node answers the extra stream in time");
    assert!(read.is_err(), "extra stream was not reset: {read:?}");
    assert_eq!(
        node.metric("roomwire_webtransport_streams_refused_total"),
        1.0
    );

    // A client that keeps its half of refused streams open keeps holding QUIC stream credit: with
    // the CONNECT and session streams, max_bidi_streams = 4 leaves room for two, and a third
    // open waits on the node's credit instead of costing it anything.
    let held = client.open_extra_stream().await.unwrap().unwrap();
    eventually("the second extra stream is reset", || async {
        node.metric("roomwire_webtransport_streams_refused_total") == 2.0
    })
    .await;
    let blocked =
        tokio::time::timeout(Duration::from_millis(500), client.open_extra_stream()).await;
    assert!(blocked.is_err(), "a fifth concurrent stream was granted");

    // Letting go of them returns the credit; the session itself never noticed.
    drop((send1, recv1, held));
    let again = tokio::time::timeout(DEADLINE, client.open_extra_stream())
        .await
        .expect("credit comes back")
        .unwrap()
        .unwrap();
    drop(again);
    eventually("the third extra stream is reset", || async {
        node.metric("roomwire_webtransport_streams_refused_total") == 3.0
    })
    .await;
    assert!(client.ping().await.unwrap() < DEADLINE);
}

#[tokio::test]
async fn a_length_prefix_over_max_frame_bytes_closes_the_session_with_1009() {
    let node = TestNode::start_with(|c| c.session.max_frame_bytes = 1024).await;
    let mut client = node.wt_client("alice").await;
    let mut prefix = Vec::new();
    prost::encoding::encode_varint(1_000_000, &mut prefix);
    client.send_raw(&prefix).await.unwrap();
    // The code travels in the QUIC close, which the client reads on a best-effort basis.
    let code = closed_code(&mut client).await;
    assert!(matches!(code, Some(1009) | None), "{code:?}");
    eventually("the close is counted", || async {
        node.metric(r#"roomwire_sessions_closed_total{reason="message_too_big"}"#) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_draining_node_sends_goaway_and_closes_webtransport_sessions_with_1001() {
    let node = TestNode::start().await;
    let mut client = node.wt_client("alice").await;
    client.join("lobby").await.unwrap();
    let metrics = node.ctx.metrics.clone();
    node.shutdown().await;
    let mut saw_goaway = false;
    let code = loop {
        match next_event(&mut client).await {
            Event::GoAway(g) => {
                assert!(g.reconnect_after_ms > 0);
                saw_goaway = true;
            }
            Event::Closed { code, .. } => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(saw_goaway);
    // The code travels in the QUIC close; the client surfaces it on a best-effort basis (see
    // Client docs), so the node's own account is what is asserted.
    assert!(matches!(code, Some(1001) | None), "{code:?}");
    assert!(
        metrics
            .render()
            .contains(r#"roomwire_sessions_closed_total{reason="going_away"} 1"#)
    );
}

#[tokio::test]
async fn the_certificate_hash_route_matches_the_served_certificate() {
    let node = TestNode::start().await;
    let (status, body) =
        common::http_request(node.addr, "GET", "/webtransport/certhash", None, None).await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["algorithm"], "sha-256");
    assert_eq!(info["generated"], true);
    assert_eq!(info["port"], node.wt_addr.unwrap().port());
    // A client pinned to a wrong hash is refused by TLS; the published one works.
    let mut wrong = node.wt_options("alice");
    wrong.cert_hashes = vec![vec![0u8; 32]];
    assert!(Client::connect(&node.wt_url(), wrong).await.is_err());
    let hex = info["hex"].as_str().unwrap();
    assert_eq!(
        node.wt_options("alice").cert_hashes[0]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        hex
    );
    node.wt_client("alice").await;
}

#[tokio::test]
async fn a_jwt_in_the_connect_request_authenticates_once_and_bad_ones_get_401() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    const SECRET: &str = "test-secret-of-at-least-32-bytes!!";
    let node = TestNode::start_with(|c| {
        c.auth.mode = roomwire::config::AuthMode::Jwt;
        c.auth.jwt.secret = Some(SECRET.into());
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = |ttl: i64| {
        let claims = serde_json::json!({
            "sub": "alice", "aud": "roomwire", "iat": now, "exp": now + ttl,
            "jti": roomwire::random_hex(8),
            "rooms": { "join": [">"], "publish": [">"] },
        });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let good = token(60);
    let client = Client::connect(&node.wt_url(), node.wt_options(&good))
        .await
        .expect("a valid JWT in the CONNECT request is accepted");
    assert_eq!(client.connected().user_id, "alice");
    client.join("lobby").await.unwrap();

    // The same token id again, and an expired token: 401, and no session.
    for bad in [good, token(-120)] {
        match Client::connect(&node.wt_url(), node.wt_options(&bad)).await {
            Err(ClientError::Status(401)) => {}
            Err(other) => panic!("expected HTTP 401, got {other}"),
            Ok(_) => panic!("a bad token was accepted"),
        }
    }
    assert_eq!(
        node.metric(r#"roomwire_auth_failures_total{reason="replayed"}"#),
        1.0
    );
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_generated_certificate_is_rotated_and_the_new_hash_published() {
    let node = TestNode::start_with(|c| c.webtransport.generated_cert_rotate_after_ms = 300).await;
    let current = || node.cert_hash_hex();
    let first = current();
    let old_options = node.wt_options("alice");
    eventually("the certificate is rotated", || async {
        current() != first
    })
    .await;
    let (status, body) =
        common::http_request(node.addr, "GET", "/webtransport/certhash", None, None).await;
    assert_eq!(status, 200);
    assert!(body.contains(&current()), "{body}");
    // New connections get the new certificate: the new hash works, the old pin no longer does.
    // (The loop tolerates a rotation between reading the hash and connecting.)
    let mut connected = false;
    for _ in 0..5 {
        if Client::connect(&node.wt_url(), node.wt_options("bob"))
            .await
            .is_ok()
        {
            connected = true;
            break;
        }
    }
    assert!(connected, "a client pinned to the published hash connects");
    assert!(Client::connect(&node.wt_url(), old_options).await.is_err());
}

/// The users the room's local members are, from the HTTP API.
async fn member_users(node: &TestNode, room: &str) -> Vec<String> {
    let (status, body) = node
        .http(
            "GET",
            &format!("/api/v1/rooms/{room}?members=true"),
            Some(common::API_KEY),
            None,
        )
        .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    info["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| m["user"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_member_that_closes_its_webtransport_session_leaves_the_room_at_once() {
    // Not at the idle timeout: whichever way the client ends it, the session ends within ~2 s.
    let node = TestNode::start_with(|c| {
        c.webtransport.idle_timeout_ms = 30_000;
        c.session.idle_timeout_ms = 60_000;
    })
    .await;
    let _stays = {
        let stays = node.wt_client("stays").await;
        stays.join("lobby").await.unwrap();
        stays
    };
    for how in ["stream", "session", "connection"] {
        let user = format!("closes-its-{how}");
        let member = node.wt_client(&user).await;
        member.join("lobby").await.unwrap();
        assert!(member_users(&node, "lobby").await.contains(&user));
        let closed_at = std::time::Instant::now();
        match how {
            "stream" => member.close().await,
            "session" => {
                assert!(member.close_webtransport_session(0, "bye"));
                drop(member);
            }
            _ => {
                assert!(member.close_quic_connection());
                drop(member);
            }
        }
        let deadline = closed_at + Duration::from_secs(2);
        loop {
            let users = member_users(&node, "lobby").await;
            if !users.contains(&user) {
                assert!(users.contains(&"stays".to_string()), "{users:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{how}: still a member after {:?}",
                closed_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("{how}: left after {:?}", closed_at.elapsed());
    }
    node.shutdown().await;
}

/// Chromium's `WebTransport.close()` sends a CLOSE_WEBTRANSPORT_SESSION capsule and FIN on the
/// CONNECT stream, then waits for the server: it neither closes the QUIC connection nor ends the
/// session's stream. The node reads the CONNECT stream, so the member leaves at once, not at the
/// QUIC idle timeout; with or without the capsule.
#[tokio::test]
async fn a_session_closed_on_its_connect_stream_as_chromium_does_leaves_the_room_at_once() {
    use common::browser_wt::BrowserLikeSession;
    let node = TestNode::start_with(|c| {
        c.webtransport.idle_timeout_ms = 30_000;
        c.session.idle_timeout_ms = 60_000;
    })
    .await;
    for (user, capsule) in [("capsule", Some((0, "bye"))), ("fin", None)] {
        let mut member = BrowserLikeSession::open(&node, user).await;
        let joined = member
            .request(client_frame::Kind::Join(proto::Join {
                room: "lobby".into(),
                ..Default::default()
            }))
            .await;
        assert!(
            matches!(joined.kind, Some(proto::server_frame::Kind::Joined(_))),
            "{joined:?}"
        );
        assert!(
            member_users(&node, "lobby")
                .await
                .contains(&user.to_string())
        );
        let closed_at = std::time::Instant::now();
        member.close(capsule).await;
        let deadline = closed_at + Duration::from_secs(2);
        while member_users(&node, "lobby")
            .await
            .contains(&user.to_string())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{user}: still a member {:?} after closing the session",
                closed_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("{user}: left after {:?}", closed_at.elapsed());
        // The node closed the QUIC connection (the browser waits for that): web-transport-quinn
        // does, on reading the session's end, with code 0 in the HTTP/3 space.
        let closed = tokio::time::timeout(DEADLINE, member.conn.closed())
            .await
            .expect("the node closes the QUIC connection");
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
                close.error_code.into_inner(),
                web_transport_quinn::proto::error_to_http3(0),
                "{close:?}"
            ),
            other => panic!("{other:?}"),
        }
    }
    // The session's end is counted once its writer has finished and lingered.
    let deadline = std::time::Instant::now() + DEADLINE;
    while node.metric(r#"roomwire_sessions{transport="webtransport"}"#) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "WebTransport sessions still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

/// What web-transport-quinn refuses before the node sees a request gets no HTTP status: the
/// connection is closed with an HTTP/3 error code, and the refusal is counted.
#[tokio::test]
async fn settings_without_webtransport_or_a_request_that_is_no_connect_close_the_connection() {
    use common::browser_wt::quic_connection;
    use web_transport_quinn::proto::{Frame, Settings, VarInt};
    let node = TestNode::start().await;
    let closed_with = |conn: quinn::Connection| async move {
        match tokio::time::timeout(DEADLINE, conn.closed())
            .await
            .expect("the node closes the connection")
        {
            quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
            other => panic!("not closed by the node: {other:?}"),
        }
    };

    // SETTINGS that do not enable WebTransport (an HTTP/3 client that is no WebTransport one).
    let (_endpoint, conn) = quic_connection(&node).await;
    let mut control = conn.open_uni().await.unwrap();
    Settings::default().write(&mut control).await.unwrap();
    assert_eq!(closed_with(conn).await, 0x0109, "H3_SETTINGS_ERROR");
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="wt_no_webtransport_settings"}"#),
        1.0
    );

    // WebTransport SETTINGS, then a request stream that opens with a DATA frame.
    let (_endpoint, conn) = quic_connection(&node).await;
    let mut control = conn.open_uni().await.unwrap();
    let mut settings = Settings::default();
    settings.enable_webtransport(1);
    settings.write(&mut control).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut frame = Vec::new();
    Frame::DATA.encode(&mut frame);
    VarInt::from_u32(2).encode(&mut frame);
    frame.extend_from_slice(b"hi");
    send.write_all(&frame).await.unwrap();
    assert_eq!(closed_with(conn).await, 0x010e, "H3_MESSAGE_ERROR");
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="wt_not_connect"}"#),
        1.0
    );
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#),
        0.0
    );
}
