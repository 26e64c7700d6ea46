//! Token ids used anywhere in the mesh (anti-replay), in a JetStream KV bucket.
//!
//! The bucket is `<mesh.subject_prefix>_jti`. A used token id is a key (the hex SHA-256 of the
//! `jti`, so any id is a valid key of fixed size) holding the id of the node that accepted it,
//! and it expires with its token (a per-key TTL). Claiming an id is one `create` of its key:
//! created means first use in the whole mesh; "already exists" means the token was used before,
//! on this node or another one. One round trip to the bucket's stream leader decides, so two
//! nodes claiming the same id at the same moment cannot both win.
//!
//! The bucket is a stream placed in one NATS cluster (`mesh.jetstream_placement`; by default the
//! cluster of the server of the node that creates it), `mesh.jetstream_replicas` copies, file
//! storage, one entry per key, per-key TTLs (`limit_markers`, nats-server 2.11 or later). It is
//! opened, or created, in the background from the start, so a node starts and serves while NATS
//! or JetStream is away; until it is open, and whenever it cannot be reached, a claim fails and
//! the caller decides (refuse, or the node-local store).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use tokio::sync::Notify;

use super::{Inner, MeshBus};
use crate::cluster::BusError;
use crate::config::{AuthMode, Config};

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenClaim {
    /// First use anywhere in the mesh; the id is now held until its TTL ends.
    Fresh,
    /// Used before, here or on another node, and not expired.
    Replayed,
}

/// Pauses between attempts to open the bucket: from the first, doubling to the last.
const OPEN_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// How long the delete marker an expired key leaves behind is kept (the server's minimum). The
/// marker is only what the server needs to forget the key; nothing here reads it.
const MARKER_TTL: Duration = Duration::from_secs(1);
/// A key without a TTL cannot outlive this (a backstop: every claim sets a TTL, which is below
/// `auth.jwt.max_lifetime_s`, at most 30 days, plus the leeway).
const MAX_KEY_AGE: Duration = Duration::from_secs(31 * 86_400);

/// The mesh's token-id bucket, once open.
pub(super) struct TokenIds {
    store: RwLock<Option<Arc<kv::Store>>>,
    /// Wakes the opener after a claim found the bucket gone (a server that lost its store, an
    /// operator who deleted it): it is opened, or created, again.
    reopen: Notify,
}

impl TokenIds {
    /// Starts opening the bucket in the background when the node checks tokens (`auth.mode =
    /// "jwt"`); otherwise no claim ever comes, and nothing is asked of JetStream.
    pub(super) fn start(inner: &Arc<Inner>, config: &Config) -> Arc<TokenIds> {
        let ids = Arc::new(TokenIds {
            store: RwLock::new(None),
            reopen: Notify::new(),
        });
        if config.auth.mode == AuthMode::Jwt {
            tokio::spawn(open_loop(inner.clone(), ids.clone()));
        }
        ids
    }

    fn store(&self) -> Option<Arc<kv::Store>> {
        self.store.read().expect("token-id lock poisoned").clone()
    }
}

impl MeshBus {
    /// Uses up `jti` across the mesh for `ttl`, rounded up to whole seconds (at least one: the
    /// server's resolution), within `mesh.request_timeout_ms`.
    pub async fn claim_token_id(&self, jti: &str, ttl: Duration) -> Result<TokenClaim, BusError> {
        let inner = &self.inner;
        let unavailable = |why: String| BusError::Unavailable(format!("token-id bucket: {why}"));
        let Some(store) = self.token_ids.store() else {
            return Err(unavailable("not open yet".into()));
        };
        inner.check_link()?;
        let bound = Duration::from_millis(inner.config.request_timeout_ms);
        let started = Instant::now();
        let claim = store.create_with_ttl(
            hashed_key(jti),
            Bytes::copy_from_slice(inner.node_id.as_bytes()),
            whole_seconds(ttl),
        );
        let result = tokio::time::timeout(bound, claim).await;
        inner
            .metrics
            .replay_claim_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(_revision)) => Ok(TokenClaim::Fresh),
            Ok(Err(error)) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                Ok(TokenClaim::Replayed)
            }
            Ok(Err(error)) => {
                // The server answered, but not with a verdict: the bucket may be gone.
                self.token_ids.reopen.notify_one();
                Err(unavailable(error.to_string()))
            }
            Err(_) => Err(unavailable("timed out".into())),
        }
    }
}

/// The key of a token id (or a user id): hex SHA-256, valid in a KV key whatever the id holds.
pub(super) fn hashed_key(jti: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, jti.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The TTL the server keeps: whole seconds, rounded up so a key never expires before its
/// token, and at least one second (the server refuses less).
fn whole_seconds(ttl: Duration) -> Duration {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(seconds.max(1))
}

/// Opens (or creates) the bucket until it is open; then waits for a claim to report it gone and
/// starts over. Attempts wait while NATS is disconnected and back off while JetStream fails.
async fn open_loop(inner: Arc<Inner>, ids: Arc<TokenIds>) {
    let bound = Duration::from_millis(inner.config.request_timeout_ms);
    // The context's own timeout is longer than the bound each call runs under, so an
    // acknowledgement that comes late never turns into a second look at a key this node
    // just wrote (create would then report its own write as "already exists").
    let js = jetstream::ContextBuilder::new()
        .timeout(2 * bound)
        .build(inner.nats.clone());
    let config = bucket_config(&inner);
    let mut pause = OPEN_RETRY.0;
    loop {
        if !inner.connected() {
            tokio::time::sleep(pause).await;
            continue;
        }
        match open(&js, &config, bound).await {
            Ok(store) => {
                let info = store.stream.cached_info();
                tracing::info!(
                    bucket = %config.bucket,
                    cluster = info.cluster.as_ref().and_then(|c| c.name.as_deref()).unwrap_or(""),
                    leader = info.cluster.as_ref().and_then(|c| c.leader.as_deref()).unwrap_or(""),
                    "mesh: token-id bucket open"
                );
                *ids.store.write().expect("token-id lock poisoned") = Some(Arc::new(store));
                pause = OPEN_RETRY.0;
                ids.reopen.notified().await;
            }
            Err(error) => {
                tracing::warn!(bucket = %config.bucket, %error, retry_in_ms = pause.as_millis() as u64,
                    "mesh: cannot open the token-id bucket; tokens are checked per auth.jwt.replay_when_unavailable");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(OPEN_RETRY.1);
            }
        }
    }
}

/// The bucket as this node would create it.
fn bucket_config(inner: &Inner) -> kv::Config {
    let placement = &inner.config.jetstream_placement;
    kv::Config {
        bucket: format!("{}_jti", inner.prefix),
        description:
            "roomwire: token ids (jti) used in the mesh, each kept until its token expires".into(),
        history: 1,
        max_age: MAX_KEY_AGE,
        storage: stream::StorageType::File,
        num_replicas: inner.config.jetstream_replicas,
        placement: (!placement.is_empty()).then(|| stream::Placement {
            cluster: Some(placement.clone()),
            tags: Vec::new(),
        }),
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    }
}

/// Opens the bucket, or creates it when it cannot be opened, each step within `bound`. An
/// existing bucket is used as it is (whoever created it chose its placement), provided it keeps
/// per-key TTLs, without which no key would ever expire.
async fn open(
    js: &jetstream::Context,
    config: &kv::Config,
    bound: Duration,
) -> Result<kv::Store, String> {
    let opened = match tokio::time::timeout(bound, js.get_key_value(&config.bucket)).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    let store = match opened {
        Ok(store) => store,
        Err(open_error) => {
            match tokio::time::timeout(2 * bound, js.create_key_value(config.clone())).await {
                Ok(Ok(store)) => store,
                Ok(Err(error)) => {
                    return Err(format!("creating it: {error} (opening it: {open_error})"));
                }
                Err(_) => return Err(format!("creating it: timed out (opening it: {open_error})")),
            }
        }
    };
    if !store.stream.cached_info().config.allow_message_ttl {
        return Err(format!(
            "the existing stream KV_{} has no per-message TTLs (allow_msg_ttl): delete it so it is created afresh",
            config.bucket
        ));
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_size_hex_whatever_the_token_id() {
        for jti in ["a", "with spaces.and.dots>*", "ü", &"x".repeat(128)] {
            let k = hashed_key(jti);
            assert_eq!(k.len(), 64);
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
        assert_ne!(hashed_key("a"), hashed_key("b"));
        assert_eq!(hashed_key("a"), hashed_key("a"));
    }

    #[test]
    fn ttls_round_up_to_whole_seconds_and_at_least_one() {
        let s = Duration::from_secs;
        assert_eq!(whole_seconds(Duration::ZERO), s(1));
        assert_eq!(whole_seconds(Duration::from_millis(1)), s(1));
        assert_eq!(whole_seconds(s(1)), s(1));
        assert_eq!(whole_seconds(Duration::from_millis(1001)), s(2));
        assert_eq!(whole_seconds(s(3600)), s(3600));
    }
}
