//! The node's shared state, as every connection and session task sees it: the configuration,
//! the metrics, the local membership table, the bus to the room owners, the credentials checks,
//! and the shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiKeys, AuthError, Authenticator, Principal, Services, TokenId};
use crate::certs::webtransport::CurrentCert;
use crate::clock::wall_ms;
use crate::cluster::{Bus, TokenClaim};
use crate::config::{Config, ReplayWhenUnavailable};
use crate::fanout::Hub;
use crate::limits::{IpGate, IpSlot};
use crate::member::{Identity, Member, MemberLimits, Transport};
use crate::metrics::Metrics;
use crate::telemetry::Telemetry;
use crate::tls::TlsState;

/// State shared by every task of the node.
pub struct NodeContext {
    pub config: Config,
    pub node_id: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub bus: Bus,
    /// OpenTelemetry spans (off unless `telemetry.otlp_endpoint` is set).
    pub telemetry: Arc<Telemetry>,
    /// Every connection and session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Keys accepted by the HTTP API.
    pub api_keys: ApiKeys,
    /// The WebTransport certificate's hash, for `/webtransport/certhash` (`None`: disabled).
    pub webtransport_cert: Option<Arc<CurrentCert>>,
    /// The UDP port WebTransport listens on (the first listener's), for the browser client.
    pub webtransport_port: Option<u16>,
    /// Checks connection tokens.
    pub auth: Authenticator,
    /// Per-address connection limits, applied at accept.
    pub ip_gate: Arc<IpGate>,
    /// TLS for the HTTP/WebSocket port, when enabled.
    pub tls: Option<Arc<TlsState>>,
    /// Services known by client certificate, on either transport.
    pub services: Services,
    pub(crate) draining: AtomicBool,
    pub(crate) next_session: AtomicU64,
}

impl NodeContext {
    pub fn next_session_key(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The bounds every member of this node is held to.
    pub fn member_limits(&self) -> MemberLimits {
        MemberLimits {
            queue_frames: self.config.session.send_queue_frames,
            queue_bytes: self.config.session.send_queue_bytes,
            reconnect_after_ms: self.config.server.reconnect_after_ms,
        }
    }

    /// A new member of this node, with the node's id in its session id (`<node>:<key hex>`).
    pub fn new_member(
        &self,
        key: u64,
        user: Arc<str>,
        transport: Transport,
        peer: SocketAddr,
        client_name: String,
    ) -> Arc<Member> {
        let identity = Identity {
            key,
            id: format!("{}:{key:x}", self.node_id).into(),
            user,
            transport,
            peer,
            client_name,
        };
        Member::new(identity, self.member_limits(), self.metrics.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Checks a connection token now, whichever transport brought it, uses up its token id
    /// (in a mesh: for every node), and counts a refusal in `roomwire_auth_failures_total{reason}`.
    /// In a mesh this waits for the shared token-id store,
    /// at most `mesh.request_timeout_ms`.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let now = wall_ms() / 1000;
        let result = match self.auth.verify(token, now) {
            Ok((principal, id)) => self.claim_token_id(id, now).await.map(|()| principal),
            Err(error) => Err(error),
        };
        self.count_auth(result)
    }

    /// Checks a Refresh token for a live session of `user`, exactly like
    /// [`NodeContext::authenticate`] (a token for another user is refused before its id is used).
    pub async fn refresh(&self, token: &str, user: &str) -> Result<Principal, AuthError> {
        let now = wall_ms() / 1000;
        let result = match self.auth.verify_refresh(token, user, now) {
            Ok((principal, id)) => self.claim_token_id(id, now).await.map(|()| principal),
            Err(error) => Err(error),
        };
        self.count_auth(result)
    }

    /// Uses up a verified token's id: standalone in this node's store; in a mesh in the shared
    /// one, or (when it cannot be reached and `auth.jwt.replay_when_unavailable = "node"`) in this
    /// node's store after all. Counted in `roomwire_replay_checks_total{store, outcome}`.
    async fn claim_token_id(&self, id: Option<TokenId>, now: u64) -> Result<(), AuthError> {
        let Some(id) = id else {
            return Ok(());
        };
        // The key must outlive the token on every node: through the whole second `keep_until`
        // (`exp + leeway`, the last one a node accepts it in) on the clock of the node that
        // claims it, plus the leeway again for nodes whose clocks run behind this one's (the
        // JWT leeway is the clock skew the deployment tolerates).
        let leeway = self.config.auth.jwt.leeway_s;
        let remaining = id.keep_until.saturating_add(1).saturating_sub(now);
        let ttl = Duration::from_secs(remaining.saturating_add(leeway));
        let (store, result) = match self.bus.claim_token_id(&id.jti, ttl).await {
            None => ("node", self.auth.claim_locally(&id, now)),
            Some(Ok(TokenClaim::Fresh)) => ("mesh", Ok(())),
            Some(Ok(TokenClaim::Replayed)) => ("mesh", Err(AuthError::Replayed)),
            Some(Err(error)) => {
                let policy = self.config.auth.jwt.replay_when_unavailable;
                if should_warn_replay_unavailable() {
                    tracing::warn!(%error, ?policy, "the mesh's token-id store is unavailable");
                } else {
                    tracing::debug!(%error, ?policy, "the mesh's token-id store is unavailable");
                }
                match policy {
                    ReplayWhenUnavailable::Refuse => {
                        ("mesh", Err(AuthError::ReplayCheckUnavailable))
                    }
                    ReplayWhenUnavailable::Node => {
                        self.metrics.replay_fallbacks.inc();
                        ("node", self.auth.claim_locally(&id, now))
                    }
                }
            }
        };
        let outcome = match &result {
            Ok(()) => "accepted",
            Err(AuthError::Replayed) => "replayed",
            Err(AuthError::Busy) => "full",
            Err(_) => "unavailable",
        };
        self.metrics
            .replay_checks
            .get_or_create(&[("store", store), ("outcome", outcome)])
            .inc();
        result
    }

    fn count_auth(&self, result: Result<Principal, AuthError>) -> Result<Principal, AuthError> {
        if let Err(error) = &result {
            self.metrics
                .auth_failures
                .get_or_create(&[("reason", error.label())])
                .inc();
        }
        result
    }
}

/// Whether an unavailable token-id store is worth a warning now: at most one per
/// [`REPLAY_WARNING_EVERY_MS`] (every connect meets it during an outage; the metrics count them all).
fn should_warn_replay_unavailable() -> bool {
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let now = crate::clock::mono_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    (last == 0 || now.saturating_sub(last) >= REPLAY_WARNING_EVERY_MS)
        && LAST_MS
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

const REPLAY_WARNING_EVERY_MS: u64 = 10_000;

/// The principal a verified client certificate named (mutual TLS), put into each request.
#[derive(Clone)]
pub struct PeerIdentity(pub Principal);

/// A connection's share of `server.max_connections` and of its address's limit (none for a
/// trusted proxy's connection: its upgrades take their clients' places); released when the last
/// holder (the HTTP connection task, or the WebSocket session it upgraded into) drops it.
#[derive(Clone)]
pub struct ConnPermit(#[allow(dead_code)] pub(crate) Arc<(OwnedSemaphorePermit, Option<IpSlot>)>);
