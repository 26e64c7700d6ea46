//! Security over real sockets: JWTs (good and every kind of bad), refresh and expiry, replay,
//! room permissions, idempotent publish, per-IP and per-session limits, Origin, and raw
//! WebSocket framing abuse.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomwire::client::{Client, ClientError, ClientOptions, Event};
use roomwire::config::{AuthMode, JwtAlgorithm};
use roomwire::proto::{self, CloseCode, ErrorCode, client_frame, server_frame};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SECRET: &str = "test-secret-of-at-least-32-bytes!!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jti() -> String {
    roomwire::random_hex(8)
}

/// Claims for `sub`, valid for `ttl` seconds, allowed everywhere unless `extra` says otherwise.
fn claims(sub: &str, ttl: i64, extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "sub": sub, "aud": "roomwire", "iat": now(), "exp": (now() as i64 + ttl) as u64, "jti": jti(),
        "rooms": { "join": [">"], "publish": [">"] },
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs256(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn jwt_node(tweak: impl FnOnce(&mut roomwire::Config)) -> TestNode {
    TestNode::start_with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt.secret = Some(SECRET.into());
        tweak(c);
    })
    .await
}

async fn connect_query(node: &TestNode, token: &str) -> Result<Client, ClientError> {
    Client::connect(
        &format!("{}?token={token}", node.ws_url()),
        ClientOptions::default(),
    )
    .await
}

#[tokio::test]
async fn a_valid_jwt_authenticates_in_the_upgrade_or_in_connect() {
    let node = jwt_node(|_| {}).await;
    let by_query = connect_query(&node, &hs256(&claims("alice", 60, json!({}))))
        .await
        .unwrap();
    assert_eq!(by_query.connected().user_id, "alice");
    assert!(by_query.connected().token_expires_at_ms > 0);
    let by_connect = Client::connect(
        &node.ws_url(),
        ClientOptions::user(&hs256(&claims("bob", 60, json!({})))),
    )
    .await
    .unwrap();
    assert_eq!(by_connect.connected().user_id, "bob");
    // No token at all: refused on Connect with 4004.
    let err = Client::connect(&node.ws_url(), ClientOptions::default())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                code: ErrorCode::Unauthorized,
                ..
            }
        ),
        "{err}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_before_any_session_exists() {
    let node = jwt_node(|c| c.auth.jwt.issuer = None).await;
    let valid = hs256(&claims("mallory", 60, json!({})));
    let parts: Vec<&str> = valid.split('.').collect();
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims("admin", 60, json!({}))),
        parts[2]
    );
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("mallory", 60, json!({})))
    );
    let cases = [
        ("expired", hs256(&claims("mallory", -60, json!({})))),
        (
            "not yet valid",
            hs256(&claims("mallory", 600, json!({ "nbf": now() + 300 }))),
        ),
        (
            "wrong audience",
            hs256(&claims("mallory", 60, json!({ "aud": "someone-else" }))),
        ),
        ("tampered signature", tampered),
        ("alg none", alg_none),
        (
            "no jti",
            hs256(&{
                let mut c = claims("mallory", 60, json!({}));
                c.as_object_mut().unwrap().remove("jti");
                c
            }),
        ),
        (
            "lifetime too long",
            hs256(&claims("mallory", 3 * 86_400, json!({}))),
        ),
        (
            "other secret",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims("mallory", 60, json!({})),
                &EncodingKey::from_secret(b"another-secret-of-32-bytes-or-more!"),
            )
            .unwrap(),
        ),
        ("garbage", "not.a.jwt".into()),
        ("bad user id", hs256(&claims("has space", 60, json!({})))),
    ];
    let refused = cases.len() as f64;
    for (what, token) in cases {
        let err = connect_query(&node, &token)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(err.to_string().contains("401"), "{what}: {err}");
    }
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="ws"}"#),
        0.0
    );
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="unauthorized"}"#),
        refused
    );
    node.shutdown().await;
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_es256_public_key_is_refused() {
    // The algorithm-confusion attack: the verifier must not treat its public key as an HMAC secret.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = std::env::temp_dir().join(format!("roomwire-es256-{}", jti()));
    std::fs::create_dir_all(&dir).unwrap();
    let public = dir.join("public.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let node = TestNode::start_with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt.algorithm = JwtAlgorithm::Es256;
        c.auth.jwt.public_key_file = Some(public.display().to_string());
    })
    .await;
    let es256 = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims("erin", 60, json!({})),
        &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        connect_query(&node, &es256)
            .await
            .unwrap()
            .connected()
            .user_id,
        "erin"
    );
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("erin", 60, json!({})),
        &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
    )
    .unwrap();
    let err = connect_query(&node, &confused).await.err().unwrap();
    assert!(err.to_string().contains("401"), "{err}");
    node.shutdown().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_token_id_is_accepted_once() {
    let node = jwt_node(|_| {}).await;
    let token = hs256(&claims("alice", 60, json!({})));
    let _first = connect_query(&node, &token).await.unwrap();
    let err = connect_query(&node, &token).await.err().unwrap();
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(
        node.metric(r#"roomwire_auth_failures_total{reason="replayed"}"#),
        1.0
    );
    // Standalone, the node's own store is the one that decides.
    for (outcome, count) in [("accepted", 1.0), ("replayed", 1.0)] {
        assert_eq!(
            node.metric(&format!(
                r#"roomwire_replay_checks_total{{store="node",outcome="{outcome}"}}"#
            )),
            count
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn rooms_outside_the_token_patterns_are_forbidden_while_allowed_ones_work() {
    let node = jwt_node(|_| {}).await;
    let rooms = json!({ "rooms": { "join": ["chat.*"], "publish": ["chat.lobby"] } });
    let mut client = connect_query(&node, &hs256(&claims("carol", 600, rooms)))
        .await
        .unwrap();
    client.join("chat.lobby").await.unwrap();
    for (result, what) in [
        (
            client.join("admin.console").await.err(),
            "join admin.console",
        ),
        (client.join("chat.a.b").await.err(), "join chat.a.b"),
        (
            client.publish("chat.random", "x", "").await.err(),
            "publish chat.random",
        ),
    ] {
        assert!(
            matches!(
                result,
                Some(ClientError::Refused {
                    code: ErrorCode::Forbidden,
                    ..
                })
            ),
            "{what}: {result:?}"
        );
    }
    client.publish("chat.lobby", "allowed", "").await.unwrap();
    assert_eq!(&next_message(&mut client).await.payload[..], b"allowed");
    node.shutdown().await;
}

#[tokio::test]
async fn refresh_keeps_a_session_alive_past_its_first_token() {
    let node = jwt_node(|c| c.auth.jwt.refresh_warning_s = 2).await;
    let first = claims("dave", 3, json!({}));
    let first_exp = first["exp"].as_u64().unwrap();
    let mut client = connect_query(&node, &hs256(&first)).await.unwrap();
    let warned = tokio::time::timeout(DEADLINE, client.next_event())
        .await
        .unwrap();
    assert!(
        matches!(warned, Some(Event::TokenExpiring(at)) if at == first_exp * 1000),
        "{warned:?}"
    );
    // Another user's token is no refresh.
    let err = client
        .refresh(&hs256(&claims("eve", 60, json!({}))))
        .await
        .unwrap_err();
    assert_eq!(refused_code(&err), Some(ErrorCode::Unauthorized), "{err}");
    let new_exp = client
        .refresh(&hs256(&claims("dave", 60, json!({}))))
        .await
        .unwrap();
    assert!(new_exp > first_exp * 1000);
    // Wait until the first token is well past its expiry; the session is still there.
    let past = UNIX_EPOCH + Duration::from_secs(first_exp + 1);
    tokio::time::sleep(past.duration_since(SystemTime::now()).unwrap_or_default()).await;
    client.ping().await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn without_refresh_the_session_closes_with_4006_at_expiry() {
    let node = jwt_node(|c| c.auth.jwt.refresh_warning_s = 1).await;
    let mut client = connect_query(&node, &hs256(&claims("frank", 2, json!({}))))
        .await
        .unwrap();
    let mut warned = false;
    let code = loop {
        match tokio::time::timeout(DEADLINE, client.next_event())
            .await
            .unwrap()
        {
            Some(Event::TokenExpiring(_)) => warned = true,
            Some(Event::Closed { code, .. }) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(warned);
    assert_eq!(code, Some(CloseCode::TokenExpired as u16));
    node.shutdown().await;
}

#[tokio::test]
async fn a_retried_publish_is_acknowledged_with_its_first_sequence_and_delivered_once() {
    let node = TestNode::start().await;
    let mut member = node.client("member").await;
    member.join("orders").await.unwrap();
    let publisher = node.client("pub").await;
    let first = publisher.publish("orders", "order 1", "o-1").await.unwrap();
    let retry = publisher.publish("orders", "order 1", "o-1").await.unwrap();
    assert_eq!(
        (retry.seq, retry.epoch, retry.duplicate, first.duplicate),
        (first.seq, first.epoch, true, false)
    );
    // Another publisher may use the same id: ids are per publisher.
    let other = node
        .client("other")
        .await
        .publish("orders", "theirs", "o-1")
        .await
        .unwrap();
    assert_eq!((other.seq, other.duplicate), (2, false));
    let (status, body) = node
        .http(
            "POST",
            "/api/v1/publish",
            Some(API_KEY),
            Some(r#"{"room":"orders","data":"api","client_msg_id":"api-1"}"#),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = node
        .http(
            "POST",
            "/api/v1/publish",
            Some(API_KEY),
            Some(r#"{"room":"orders","data":"api","client_msg_id":"api-1"}"#),
        )
        .await;
    assert!(
        body.contains(r#""duplicate":true"#) && body.contains(r#""seq":3"#),
        "{body}"
    );
    let seqs: Vec<u64> = [
        next_message(&mut member).await,
        next_message(&mut member).await,
        next_message(&mut member).await,
    ]
    .iter()
    .map(|m| m.seq)
    .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), member.next_event())
            .await
            .is_err(),
        "no second delivery"
    );
    assert_eq!(node.metric("roomwire_duplicate_publishes_total"), 2.0);
    node.shutdown().await;
}

/// A raw WebSocket session from a chosen source address, Connect sent and Connected read.
async fn connect_from(node: &TestNode, source: &str) -> Result<RawWs, String> {
    connect_via(node, source, None).await
}

/// [`connect_from`], the upgrade carrying `X-Forwarded-For: forwarded` (as a proxy's would).
async fn connect_via(
    node: &TestNode,
    source: &str,
    forwarded: Option<&str>,
) -> Result<RawWs, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(node.addr).await.map_err(|e| e.to_string())?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let mut request = node.ws_url().into_client_request().unwrap();
    if let Some(forwarded) = forwarded {
        request
            .headers_mut()
            .insert("x-forwarded-for", forwarded.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| e.to_string())?;
    send_frame(
        &mut ws,
        1,
        client_frame::Kind::Connect(proto::Connect {
            token: "u".into(),
            ..Default::default()
        }),
    )
    .await;
    match read_frame(&mut ws).await {
        Some(proto::ServerFrame {
            kind: Some(server_frame::Kind::Connected(_)),
            ..
        }) => Ok(ws),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test]
async fn a_connection_flood_from_one_address_is_limited_while_another_still_connects() {
    let node = TestNode::start_with(|c| {
        c.limits.connections_per_ip_per_second = 1;
        c.limits.connection_burst_per_ip = 5;
        c.limits.max_connections_per_ip = 3;
    })
    .await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match connect_from(&node, "127.0.0.1").await {
            Ok(ws) => held.push(ws),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(held.len(), 3, "max_connections_per_ip holds");
    assert_eq!(refused, 17);
    assert!(node.metric(r#"roomwire_connections_refused_total{reason="ip_rate"}"#) >= 1.0);
    assert!(
        node.metric(r#"roomwire_connections_refused_total{reason="ip_max_connections"}"#) >= 1.0
    );
    connect_from(&node, "127.0.0.2")
        .await
        .expect("another address still connects");
    node.shutdown().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_is_limited_and_a_forged_header_is_ignored() {
    // 127.0.0.1 is the load balancer: the clients are the addresses it forwards.
    let node = TestNode::start_with(|c| {
        c.limits.max_connections_per_ip = 2;
        c.limits.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            connect_via(&node, "127.0.0.1", Some("203.0.113.7"))
                .await
                .expect("client a, under its limit"),
        );
    }
    let refused = connect_via(&node, "127.0.0.1", Some("203.0.113.7")).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("429")),
        "{:?}",
        refused.map(|_| ())
    );
    // An address the client wrote itself, left of what the proxy appended, is not believed.
    assert!(
        connect_via(&node, "127.0.0.1", Some("198.51.100.9, 203.0.113.7"))
            .await
            .is_err()
    );
    // Other clients behind the same proxy have limits of their own.
    for _ in 0..2 {
        held.push(
            connect_via(&node, "127.0.0.1", Some("203.0.113.8"))
                .await
                .expect("client b, under its limit"),
        );
    }
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="ip_max_connections"}"#),
        2.0
    );
    drop(held);
    node.shutdown().await;

    // Without trusted proxies the same header is a forgery, and buys no extra connections.
    let node = TestNode::start_with(|c| c.limits.max_connections_per_ip = 2).await;
    let mut held = Vec::new();
    for forged in ["203.0.113.1", "203.0.113.2"] {
        held.push(
            connect_via(&node, "127.0.0.1", Some(forged))
                .await
                .expect("under the limit"),
        );
    }
    assert!(
        connect_via(&node, "127.0.0.1", Some("203.0.113.3"))
            .await
            .is_err(),
        "a forged X-Forwarded-For must not lift the limit"
    );
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="ip_max_connections"}"#),
        1.0
    );
    drop(held);
    node.shutdown().await;
}

#[tokio::test]
async fn a_message_flood_closes_only_the_flooding_session() {
    let node = TestNode::start_with(|c| {
        c.limits.session_frames_per_second = 20;
        c.limits.session_frame_burst = 20;
        c.limits.max_rate_breaches = 5;
    })
    .await;
    let mut calm = node.client("calm").await;
    calm.join("room").await.unwrap();
    let mut flooder = node.raw_connected("flooder").await;
    for i in 0..200 {
        send_frame(
            &mut flooder,
            i + 10,
            client_frame::Kind::Ping(proto::Ping { nonce: i }),
        )
        .await;
    }
    let mut rate_limited = 0;
    loop {
        match read_frame(&mut flooder).await {
            Some(proto::ServerFrame {
                request_id,
                kind: Some(server_frame::Kind::Error(e)),
            }) => {
                assert_eq!(ErrorCode::try_from(e.code).unwrap(), ErrorCode::RateLimited);
                assert!(
                    e.retryable,
                    "slow down, then resend (PROTOCOL.md section 9)"
                );
                assert!(request_id >= 10, "the refusal answers the dropped request");
                rate_limited += 1;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(rate_limited, 5, "each breach answered until the close");
    eventually("flooder closed", || async {
        node.metric(r#"roomwire_sessions_closed_total{reason="rate_limited"}"#) == 1.0
    })
    .await;
    calm.publish("room", "still here", "").await.unwrap();
    assert_eq!(&next_message(&mut calm).await.payload[..], b"still here");
    node.shutdown().await;
}

#[tokio::test]
async fn browser_origins_are_checked_against_the_allow_list() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let try_origin = |url: String, origin: Option<String>| async move {
        let mut request = url.into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let node = TestNode::start().await;
    let same = format!("http://{}", node.addr);
    assert!(
        try_origin(node.ws_url(), Some(same)).await.is_ok(),
        "same origin"
    );
    assert!(
        try_origin(node.ws_url(), None).await.is_ok(),
        "no origin (not a browser)"
    );
    let err = try_origin(node.ws_url(), Some("https://evil.example".into()))
        .await
        .unwrap_err();
    assert!(err.contains("403"), "{err}");
    node.shutdown().await;

    let node =
        TestNode::start_with(|c| c.server.allowed_origins = vec!["https://app.example.com".into()])
            .await;
    assert!(
        try_origin(node.ws_url(), Some("https://app.example.com".into()))
            .await
            .is_ok()
    );
    let err = try_origin(node.ws_url(), Some(format!("http://{}", node.addr)))
        .await
        .unwrap_err();
    assert!(err.contains("403"), "{err}");
    assert!(node.metric(r#"roomwire_connections_refused_total{reason="origin"}"#) >= 1.0);
    node.shutdown().await;
}

/// A WebSocket spoken by hand, to send frames no well-behaved library would.
struct Wire(TcpStream);

impl Wire {
    async fn open(node: &TestNode) -> Wire {
        let mut stream = TcpStream::connect(node.addr).await.unwrap();
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.unwrap());
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut wire = Wire(stream);
        let connect = proto::ClientFrame {
            request_id: 1,
            kind: Some(client_frame::Kind::Connect(proto::Connect {
                token: "raw".into(),
                ..Default::default()
            })),
        };
        wire.send(0x2, &connect.encode_bytes(), true).await;
        wire
    }

    async fn send(&mut self, opcode: u8, payload: &[u8], masked: bool) {
        self.send_frame(true, opcode, payload, masked).await;
    }

    async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        if payload.len() < 126 {
            frame.push(mask_bit | payload.len() as u8);
        } else {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        self.0.write_all(&frame).await.unwrap();
    }

    /// Reads server frames until a close frame; returns its code.
    async fn close_code(&mut self) -> Option<u16> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let mut head = [0u8; 2];
                self.0.read_exact(&mut head).await.ok()?;
                let mut len = u64::from(head[1] & 0x7f);
                if len == 126 {
                    len = u64::from(self.0.read_u16().await.ok()?);
                } else if len == 127 {
                    len = self.0.read_u64().await.ok()?;
                }
                let mut payload = vec![0u8; len as usize];
                self.0.read_exact(&mut payload).await.ok()?;
                if head[0] & 0x0f == 0x8 {
                    return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                }
            }
        })
        .await
        .expect("close in time")
    }
}

#[tokio::test]
async fn raw_framing_abuse_gets_the_rfc_close_codes() {
    let node = TestNode::start().await;
    // A control frame longer than 125 bytes.
    let mut wire = Wire::open(&node).await;
    wire.send(0x9, &[0u8; 126], true).await;
    assert_eq!(
        wire.close_code().await,
        Some(CloseCode::ProtocolError as u16)
    );
    // An unmasked client frame.
    let mut wire = Wire::open(&node).await;
    wire.send(0x2, b"\x08\x01", false).await;
    assert_eq!(
        wire.close_code().await,
        Some(CloseCode::ProtocolError as u16)
    );
    // A close frame whose reason is not UTF-8.
    let mut wire = Wire::open(&node).await;
    wire.send(0x8, &[0x03, 0xe8, 0xff, 0xfe, 0xfd], true).await;
    assert_eq!(wire.close_code().await, Some(CloseCode::InvalidData as u16));
    // A text message that is not UTF-8.
    let mut wire = Wire::open(&node).await;
    wire.send(0x1, &[0xc3, 0x28], true).await;
    assert_eq!(wire.close_code().await, Some(CloseCode::InvalidData as u16));
    node.shutdown().await;
}

#[tokio::test]
async fn a_fragment_flood_is_bounded_by_the_message_size_limit() {
    let node = TestNode::start_with(|c| c.session.max_frame_bytes = 1024).await;
    let mut wire = Wire::open(&node).await;
    // A binary message that never ends: 1-byte fragments, none with FIN.
    wire.send_frame(false, 0x2, b"x", true).await;
    for _ in 0..2_000 {
        wire.send_frame(false, 0x0, b"x", true).await;
    }
    assert_eq!(
        wire.close_code().await,
        Some(CloseCode::MessageTooBig as u16)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let node = TestNode::start().await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let huge = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = stream.write_all(huge.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .expect("answered in time");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 431"),
        "{response}"
    );
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="ws"}"#),
        0.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_session_without_a_token_cannot_be_given_one_by_refresh() {
    let node = TestNode::start().await;
    let client = node.client("dev-user").await;
    let err = client
        .refresh(&hs256(&claims("dev-user", 600, json!({}))))
        .await
        .unwrap_err();
    assert_eq!(refused_code(&err), Some(ErrorCode::Unauthorized), "{err}");
    client.ping().await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn a_refresh_with_fewer_rooms_leaves_the_rooms_it_no_longer_allows() {
    let node = jwt_node(|_| {}).await;
    let wide = json!({ "rooms": { "join": ["a.*", "b.*"], "publish": [] } });
    let mut client = connect_query(&node, &hs256(&claims("gina", 600, wide)))
        .await
        .unwrap();
    client.join("a.x").await.unwrap();
    client.join("b.x").await.unwrap();
    let narrow = json!({ "rooms": { "join": ["a.*"], "publish": [] } });
    client
        .refresh(&hs256(&claims("gina", 600, narrow)))
        .await
        .unwrap();
    match tokio::time::timeout(DEADLINE, client.next_event())
        .await
        .unwrap()
    {
        Some(Event::Left(room)) => assert_eq!(room, "b.x"),
        other => panic!("{other:?}"),
    }
    let (_, body) = node
        .http("GET", "/api/v1/rooms/b.x", Some(API_KEY), None)
        .await;
    assert!(body.contains(r#""local_members":0"#), "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_token_cannot_pose_as_a_certificate_service_and_ids_are_bounded() {
    let node = jwt_node(|_| {}).await;
    let err = connect_query(&node, &hs256(&claims("service:billing", 600, json!({}))))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("401"), "{err}");
    let client = connect_query(&node, &hs256(&claims("hank", 600, json!({}))))
        .await
        .unwrap();
    let err = client
        .publish("r", "x", &"i".repeat(129))
        .await
        .unwrap_err();
    assert_eq!(refused_code(&err), Some(ErrorCode::BadFrame), "{err}");
    client.publish("r", "x", &"i".repeat(128)).await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn insecure_mode_refuses_service_ids_and_names_anonymous_users_unguessably() {
    let node = TestNode::start().await;
    // In the upgrade (401 before any session) and in Connect (UNAUTHORIZED, 4004).
    let url = format!("{}?token=service:billing", node.ws_url());
    let err = Client::connect(&url, ClientOptions::default())
        .await
        .err()
        .expect("refused in the upgrade");
    assert!(err.to_string().contains("401"), "{err}");
    let err = Client::connect(&node.ws_url(), ClientOptions::user("service:billing"))
        .await
        .err()
        .expect("refused in Connect");
    assert_eq!(refused_code(&err), Some(ErrorCode::Unauthorized), "{err}");
    // Anonymous ids are random, not a counter another client could guess.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let client = Client::connect(&node.ws_url(), ClientOptions::default())
            .await
            .unwrap();
        ids.push(client.connected().user_id.clone());
    }
    for id in &ids {
        let suffix = id.strip_prefix("anon-").unwrap_or_else(|| panic!("{id}"));
        assert_eq!(suffix.len(), 16, "{id}");
        assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{ids:?}");
    node.shutdown().await;
}
