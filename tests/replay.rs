//! Anti-replay across the mesh, end to end: real nats-servers with JetStream (joined by a
//! gateway where a test spans regions), real `roomwire` processes checking JWTs, real WebSocket
//! clients. A token id used on one node is refused on every other node (over the WebSocket
//! upgrade, in a Connect frame, in a Refresh), its key in the mesh's KV bucket expires with the
//! token, and while the bucket cannot be reached tokens are refused as retryable (or, when
//! configured, checked by the node alone).
//!
//! Every wait is on a condition with a deadline.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::nats::NatsServer;
use common::node_process::NodeProcess;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomwire::client::{Client, ClientError, ClientOptions};
use roomwire::proto::ErrorCode;
use serde_json::json;

const SECRET: &str = "test-secret-of-at-least-32-bytes!!";
/// The mesh's token-id bucket under the default subject prefix.
const BUCKET: &str = "roomwire_jti";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `sub` valid `ttl` seconds, with the token id `jti`.
fn token(sub: &str, jti: &str, ttl: u64) -> String {
    let claims = json!({
        "sub": sub, "aud": "roomwire", "iat": now(), "exp": now() + ttl, "jti": jti,
        "rooms": { "join": [">"], "publish": [">"] },
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn fresh_jti() -> String {
    roomwire::random_hex(8)
}

/// The key of a token id in the bucket: hex SHA-256 (docs/CLUSTER.md).
fn key_of(jti: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, jti.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A mesh node checking JWTs, with `extra` overrides.
async fn jwt_node(id: &str, region: &str, nats: &NatsServer, extra: &[&str]) -> NodeProcess {
    let mut overrides = vec![
        "auth.mode=jwt",
        "auth.jwt.secret=test-secret-of-at-least-32-bytes!!",
    ];
    overrides.extend_from_slice(extra);
    NodeProcess::mesh_with(id, region, &[nats.url()], &overrides).await
}

/// Waits until `node` has opened the mesh's token-id bucket.
async fn wait_bucket_open(node: &NodeProcess) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while node.log_lines_with("mesh: token-id bucket open").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} never opened the token-id bucket:\n{}",
            node.id,
            node.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a session with the token in the upgrade request (`?token=`).
async fn by_upgrade(node: &NodeProcess, token: &str) -> Result<Client, ClientError> {
    Client::connect(
        &format!("{}?token={token}", node.ws_url()),
        ClientOptions::default(),
    )
    .await
}

/// Opens a session with the token in the Connect frame.
async fn by_connect(node: &NodeProcess, token: &str) -> Result<Client, ClientError> {
    Client::connect(&node.ws_url(), ClientOptions::user(token)).await
}

fn assert_http_status(result: Result<Client, ClientError>, status: &str, what: &str) {
    match result {
        Ok(_) => panic!("{what}: accepted, expected HTTP {status}"),
        Err(error) => assert!(error.to_string().contains(status), "{what}: {error}"),
    }
}

/// A refusal in answer to Connect: the error code and whether it is retryable.
fn connect_refusal(result: Result<Client, ClientError>, what: &str) -> (ErrorCode, bool) {
    match result {
        Ok(_) => panic!("{what}: accepted, expected a refusal"),
        Err(ClientError::Refused {
            code, retryable, ..
        }) => (code, retryable),
        Err(other) => panic!("{what}: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_used_in_one_region_is_refused_in_every_other() {
    // Two regions; the bucket lives in eu (placed there explicitly, so it does not depend on
    // which node comes up first). n1 is in eu, n2 in us: every claim of n2 crosses the gateway.
    let mut nats = NatsServer::start_gateways(&["eu", "us"]).await;
    let placement = ["mesh.jetstream_placement=eu"];
    let n1 = jwt_node("n1", "eu", &nats[0], &placement).await;
    let n2 = jwt_node("n2", "us", &nats[1], &placement).await;
    for server in &nats {
        server.wait_jetstream().await;
    }
    wait_bucket_open(&n1).await;
    wait_bucket_open(&n2).await;

    // Upgrade on n1, then the same token on n2: upgrade and Connect both refuse it.
    let first = token("alice", &fresh_jti(), 600);
    let _alice = by_upgrade(&n1, &first).await.expect("first use on n1");
    assert_http_status(
        by_upgrade(&n2, &first).await,
        "401",
        "replay by upgrade on n2",
    );
    let (code, retryable) = connect_refusal(by_connect(&n2, &first).await, "replay in Connect");
    assert_eq!((code, retryable), (ErrorCode::Unauthorized, false));

    // Connect on n2 first, then n1 (the other direction, the other path).
    let second = token("bob", &fresh_jti(), 600);
    let bob = by_connect(&n2, &second).await.expect("first use on n2");
    let (code, _) = connect_refusal(by_connect(&n1, &second).await, "replay on n1");
    assert_eq!(code, ErrorCode::Unauthorized);
    assert_http_status(
        by_upgrade(&n1, &second).await,
        "401",
        "replay by upgrade on n1",
    );

    // A Refresh is a use too: a token used on n1 cannot refresh a session on n2, and a fresh
    // one used in a Refresh on n2 cannot open a session on n1.
    let used = token("bob", &fresh_jti(), 600);
    let _bob_on_n1 = by_upgrade(&n1, &used).await.expect("first use on n1");
    let error = bob.refresh(&used).await.unwrap_err();
    assert_eq!(
        refused_code(&error),
        Some(ErrorCode::Unauthorized),
        "{error}"
    );
    let refresh = token("bob", &fresh_jti(), 600);
    bob.refresh(&refresh)
        .await
        .expect("a fresh token refreshes");
    assert_http_status(
        by_upgrade(&n1, &refresh).await,
        "401",
        "refresh token replayed",
    );

    // The refusals were the mesh's store's verdicts, on both nodes.
    let replayed = r#"roomwire_replay_checks_total{store="mesh",outcome="replayed"}"#;
    let accepted = r#"roomwire_replay_checks_total{store="mesh",outcome="accepted"}"#;
    assert_eq!(n2.metric(replayed).await, 3.0);
    assert_eq!(n1.metric(replayed).await, 3.0);
    assert_eq!(n1.metric(accepted).await, 2.0);
    assert_eq!(n2.metric(accepted).await, 2.0);
    assert_eq!(
        n2.metric(r#"roomwire_auth_failures_total{reason="replayed"}"#)
            .await,
        3.0
    );
    assert_eq!(
        n1.metric(r#"roomwire_replay_checks_total{store="node",outcome="accepted"}"#)
            .await,
        0.0,
        "no claim fell back to the node's own store"
    );

    // The bucket's region is gone: us can no longer check tokens and refuses them as
    // retryable, within mesh.request_timeout_ms (1 s) and a little.
    nats[0].kill();
    let started = Instant::now();
    assert_http_status(
        by_upgrade(&n2, &token("carol", &fresh_jti(), 600)).await,
        "503",
        "bucket's region down",
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(
        n2.metric(r#"roomwire_replay_checks_total{store="mesh",outcome="unavailable"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_token_ids_key_expires_with_its_token_and_not_before() {
    let nats = NatsServer::start().await;
    nats.wait_jetstream().await;
    // No leeway, so the key's TTL is the token's remaining lifetime: the token is accepted
    // through the second `exp` (a JWT is expired once now > exp), so 2-3 s.
    let node = jwt_node("n1", "local", &nats, &["auth.jwt.leeway_s=0"]).await;
    wait_bucket_open(&node).await;

    let jti = fresh_jti();
    let expires = now() + 2;
    let short = token("dave", &jti, 2);
    let _dave = by_upgrade(&node, &short).await.expect("first use");

    let client = async_nats::connect(nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value(BUCKET)
        .await
        .expect("the node created the bucket");
    let config = &kv.stream.cached_info().config;
    assert!(config.allow_message_ttl, "per-key TTLs: {config:?}");
    assert_eq!(config.max_messages_per_subject, 1, "history 1");
    assert_eq!(
        config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    let key = key_of(&jti);
    assert_eq!(
        kv.get(&key).await.unwrap().as_deref(),
        Some(&b"n1"[..]),
        "the key names the node that accepted the token"
    );

    let deadline = Instant::now() + DEADLINE;
    while kv.get(&key).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the key never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        gone_at_ms >= (expires + 1) * 1000,
        "the key expired {} ms before its token",
        (expires + 1) * 1000 - gone_at_ms
    );
    // Now the token itself is refused as expired, not as replayed.
    assert_http_status(by_upgrade(&node, &short).await, "401", "expired token");
    assert_eq!(
        node.metric(r#"roomwire_auth_failures_total{reason="invalid"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_tokens_are_refused_as_retryable_unless_the_node_may_decide() {
    let mut nats = NatsServer::start().await;
    nats.wait_jetstream().await;
    let strict = jwt_node("strict", "local", &nats, &[]).await;
    let lenient = jwt_node(
        "lenient",
        "local",
        &nats,
        &["auth.jwt.replay_when_unavailable=node"],
    )
    .await;
    wait_bucket_open(&strict).await;
    wait_bucket_open(&lenient).await;
    by_upgrade(&strict, &token("erin", &fresh_jti(), 600))
        .await
        .expect("accepted while NATS is up");

    nats.kill();
    for node in [&strict, &lenient] {
        eventually(&format!("{} notices NATS is gone", node.id), || async {
            node.readyz().await == Some(503)
        })
        .await;
    }

    // Fail closed: 503 before the upgrade, a retryable UNAVAILABLE in answer to Connect.
    assert_http_status(
        by_upgrade(&strict, &token("erin", &fresh_jti(), 600)).await,
        "503",
        "strict, upgrade",
    );
    let (code, retryable) = connect_refusal(
        by_connect(&strict, &token("erin", &fresh_jti(), 600)).await,
        "strict, Connect",
    );
    assert_eq!((code, retryable), (ErrorCode::Unavailable, true));
    assert_eq!(
        strict
            .metric(r#"roomwire_replay_checks_total{store="mesh",outcome="unavailable"}"#)
            .await,
        2.0
    );
    assert_eq!(
        strict
            .metric(r#"roomwire_auth_failures_total{reason="replay_unavailable"}"#)
            .await,
        2.0
    );

    // replay_when_unavailable = "node": the node's own store decides, and still refuses a
    // replay on this node.
    let fallback = token("frank", &fresh_jti(), 600);
    let _frank = by_upgrade(&lenient, &fallback)
        .await
        .expect("accepted by the node's own store");
    assert_http_status(
        by_upgrade(&lenient, &fallback).await,
        "401",
        "replay on the lenient node",
    );
    assert_eq!(lenient.metric("roomwire_replay_fallbacks_total").await, 2.0);
    assert_eq!(
        lenient
            .metric(r#"roomwire_replay_checks_total{store="node",outcome="accepted"}"#)
            .await,
        1.0
    );
    assert_eq!(
        lenient
            .metric(r#"roomwire_replay_checks_total{store="node",outcome="replayed"}"#)
            .await,
        1.0
    );

    // NATS is back (same store): the strict node accepts tokens again, checked in the bucket.
    nats.restart().await;
    nats.wait_jetstream().await;
    eventually("the strict node accepts tokens again", || async {
        by_upgrade(&strict, &token("grace", &fresh_jti(), 600))
            .await
            .is_ok()
    })
    .await;
    assert!(
        strict
            .metric(r#"roomwire_replay_checks_total{store="mesh",outcome="accepted"}"#)
            .await
            >= 2.0
    );
}

/// Claim latency, for the report (not run by default): fresh-token connects to a standalone
/// node (the node-local store), to a mesh node whose bucket is in its own region and to one whose
/// bucket is across the gateway, and the claim times the mesh nodes measured
/// (`roomwire_replay_claim_seconds`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn claim_latency_in_and_across_regions() {
    const CONNECTS: usize = 300;
    let nats = NatsServer::start_gateways(&["eu", "us"]).await;
    let placement = ["mesh.jetstream_placement=eu"];
    let n1 = jwt_node("n1", "eu", &nats[0], &placement).await;
    let n2 = jwt_node("n2", "us", &nats[1], &placement).await;
    let solo = NodeProcess::start(
        "solo",
        "local",
        &["auth.mode=jwt".into(), format!("auth.jwt.secret={SECRET}")],
    )
    .await;
    for server in &nats {
        server.wait_jetstream().await;
    }
    wait_bucket_open(&n1).await;
    wait_bucket_open(&n2).await;
    println!("{:?}", n2.log_lines_with("token-id bucket open"));
    for node in [&solo, &n1, &n2] {
        let mut times = Vec::with_capacity(CONNECTS);
        for _ in 0..CONNECTS {
            let started = Instant::now();
            let client = by_upgrade(node, &token("lat", &fresh_jti(), 600))
                .await
                .unwrap();
            times.push(started.elapsed());
            drop(client);
        }
        times.sort();
        let count = node.metric("roomwire_replay_claim_seconds_count").await;
        let sum = node.metric("roomwire_replay_claim_seconds_sum").await;
        let (_, body) = node.try_get("/metrics").await.unwrap();
        let buckets: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("roomwire_replay_claim_seconds_bucket"))
            .collect();
        println!(
            "{} ({}; bucket in eu): connect p50 {:?} p90 {:?} p99 {:?}; claim mean {:.0} us over {count} claims\n  {}",
            node.id,
            node.region,
            times[CONNECTS / 2],
            times[CONNECTS * 9 / 10],
            times[CONNECTS * 99 / 100],
            sum / count * 1e6,
            buckets.join("\n  ")
        );
    }
}
