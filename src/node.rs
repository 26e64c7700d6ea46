//! The node: binds its listeners, accepts connections, serves HTTP and WebSocket on one port,
//! and drains on shutdown.
//!
//! Shutdown is two steps (signal, then wait): the accept loops stop, readiness turns false, every
//! session is sent `GoAway` and closed with 1001 once its queue is flushed, and the node waits for
//! all connection tasks up to `server.drain_grace_ms`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::auth::{ApiKeys, Authenticator, Principal, Services};
use crate::certs::webtransport::CurrentCert;
use crate::cluster::Bus;
use crate::cluster::local::LocalBus;
use crate::cluster::mesh::MeshBus;
use crate::config::{Config, ConfigError};
use crate::context::{ConnPermit, NodeContext, PeerIdentity};
use crate::fanout::Hub;
use crate::ids::random_hex;
use crate::limits::IpGate;
use crate::metrics::Metrics;
use crate::room::RoomName;
use crate::telemetry::Telemetry;
use crate::tls::TlsState;
use crate::transport::webtransport;
use crate::transport::ws::PeerAddr;

/// How often owner state of idle rooms is swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// A bound, not yet running node.
pub struct Node {
    ctx: Arc<NodeContext>,
    listeners: Vec<TcpListener>,
    webtransport: Option<webtransport::Listener>,
    /// The API key generated for this run when none was configured (for the startup banner).
    generated_api_key: Option<String>,
}

impl Node {
    /// Validates the configuration and binds every listener; nothing is served until [`Node::run`].
    ///
    /// Everything the configuration names on disk (TLS certificates and keys, JWT keys, the
    /// client CA) is loaded here once, before any port is bound; a file that cannot be used is a
    /// [`ConfigError`], like a bad value.
    pub async fn bind(config: Config) -> anyhow::Result<Node> {
        config.validate()?;
        let invalid = |e: anyhow::Error| ConfigError::Invalid(format!("{e:#}"));
        let auth = Authenticator::new(&config.auth).map_err(invalid)?;
        let tls = TlsState::load(&config.tls).map_err(invalid)?;
        let services = Services::from_config(&config.tls).map_err(invalid)?;
        let node_id: Arc<str> = if config.node.id.is_empty() {
            generated_node_id().into()
        } else {
            config.node.id.as_str().into()
        };
        let generated_api_key = config.api.keys.is_empty().then(|| random_hex(16));
        let api_keys = match &generated_api_key {
            Some(key) => {
                tracing::info!(api_key = %key, "no api.keys configured: generated a development key for this run");
                vec![key.clone()]
            }
            None => config.api.keys.clone(),
        };
        let mut listeners = Vec::new();
        for addr in &config.server.listen {
            listeners.push(
                bind_tcp(*addr, config.server.listen_backlog)
                    .with_context(|| format!("binding {addr}"))?,
            );
        }
        let (webtransport, webtransport_cert) = if config.webtransport.enabled {
            let current = Arc::new(CurrentCert::default());
            let listener =
                webtransport::Listener::bind(&config.webtransport, &config.tls, &current)
                    .context("starting WebTransport")?;
            (Some(listener), Some(current))
        } else {
            (None, None)
        };
        let ip_gate = IpGate::new(&config.limits);
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(metrics.clone()));
        metrics
            .node_info
            .get_or_create(&vec![
                ("node", node_id.to_string()),
                ("region", config.node.region.clone()),
            ])
            .set(1);
        let telemetry = Arc::new(
            Telemetry::start(&config.telemetry, &node_id, &config.node.region)
                .map_err(|e| invalid(e.context("telemetry")))?,
        );
        let bus = if config.mesh.nats_urls.is_empty() {
            Bus::Standalone(LocalBus::new(
                node_id.clone(),
                hub.clone(),
                metrics.clone(),
                &config.rooms,
                telemetry.clone(),
            ))
        } else {
            Bus::Mesh(
                MeshBus::start(
                    &config,
                    node_id.clone(),
                    hub.clone(),
                    metrics.clone(),
                    telemetry.clone(),
                )
                .await
                .context("joining the mesh")?,
            )
        };
        let ctx = Arc::new(NodeContext {
            config,
            node_id,
            metrics,
            hub,
            bus,
            telemetry,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            api_keys: ApiKeys::new(api_keys),
            webtransport_cert,
            webtransport_port: webtransport
                .as_ref()
                .and_then(|l| l.local_addrs().first().map(SocketAddr::port)),
            auth,
            ip_gate,
            tls,
            services,
            draining: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
        });
        Ok(Node {
            ctx,
            listeners,
            webtransport,
            generated_api_key,
        })
    }

    /// The API key generated for this run, when `api.keys` configured none.
    pub fn generated_api_key(&self) -> Option<&str> {
        self.generated_api_key.as_deref()
    }

    /// The bound addresses (with the real port when the config asked for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound WebTransport (UDP) addresses; empty when WebTransport is disabled.
    pub fn webtransport_addrs(&self) -> Vec<SocketAddr> {
        self.webtransport
            .as_ref()
            .map(webtransport::Listener::local_addrs)
            .unwrap_or_default()
    }

    pub fn context(&self) -> Arc<NodeContext> {
        self.ctx.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let router = crate::http::router(ctx.clone());
        let limit = Arc::new(Semaphore::new(ctx.config.server.max_connections));
        // Open HTTP connections keep being served through the drain (so a load balancer's
        // keep-alive connection hears /readyz answer 503), and are closed when it is over.
        let drained = CancellationToken::new();
        for listener in self.listeners {
            tracing::info!(addr = %listener.local_addr()?, node = %ctx.node_id, region = %ctx.config.node.region, "serving HTTP and WebSocket (/ws)");
            ctx.tracker.spawn(accept_loop(
                listener,
                ctx.clone(),
                router.clone(),
                limit.clone(),
                drained.clone(),
            ));
        }
        let quic_endpoints = self
            .webtransport
            .map(|listener| listener.serve(&ctx))
            .unwrap_or_default();
        let sweeper = tokio::spawn({
            let ctx = ctx.clone();
            async move {
                let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
                loop {
                    ticker.tick().await;
                    ctx.bus.sweep();
                    ctx.ip_gate.sweep();
                }
            }
        });

        let presence = tokio::spawn({
            let ctx = ctx.clone();
            async move {
                let mut ticker = tokio::time::interval(ctx.bus.presence().interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    ctx.bus.presence_tick().await;
                }
            }
        });

        let reloader = ctx.tls.clone().map(|tls| {
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(tls.reload_interval());
                loop {
                    ticker.tick().await;
                    // File reads and certificate parsing are blocking work: off the workers.
                    let tls = tls.clone();
                    match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                        Ok(Ok(true)) => tracing::info!("tls certificates reloaded"),
                        Ok(Ok(false)) => {}
                        Ok(Err(error)) => tracing::warn!(
                            "tls reload failed, keeping the previous certificates: {error:#}"
                        ),
                        Err(error) => tracing::warn!(%error, "tls reload task failed"),
                    }
                }
            })
        });

        shutdown.cancelled().await;
        sweeper.abort();
        presence.abort();
        if let Some(reloader) = reloader {
            reloader.abort();
        }
        drain(&ctx).await;
        drained.cancel();
        for endpoint in &quic_endpoints {
            endpoint.close(quinn::VarInt::from_u32(0), b"node shut down");
        }
        for endpoint in &quic_endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        // The last spans (the drain's) go to the collector; the exporter's flush blocks.
        let telemetry = ctx.telemetry.clone();
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        Ok(())
    }
}

async fn drain(ctx: &Arc<NodeContext>) {
    tracing::info!("draining: telling sessions to reconnect elsewhere");
    ctx.draining.store(true, Ordering::Relaxed);
    // Rooms move to their next owners first, so the sessions' last publishes are sequenced
    // there and nothing is sequenced here after the hand-off.
    ctx.bus.drain().await;
    ctx.shutdown.cancel();
    let sessions = ctx.hub.members(&RoomName::broadcast());
    for session in &sessions {
        session.go_away("node shutting down");
    }
    ctx.tracker.close();
    if tokio::time::timeout(ctx.config.drain_grace(), ctx.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = ctx.tracker.len(),
            "drain grace period over; closing what is left"
        );
    } else {
        tracing::info!(sessions = sessions.len(), "drained");
    }
    ctx.bus.shut_down().await;
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<NodeContext>,
    router: Router,
    limit: Arc<Semaphore>,
    drained: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = ctx.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Refused connections are dropped at once, before any TLS or HTTP work is spent on them.
        let refuse = |reason: &'static str| {
            ctx.metrics
                .connections_refused
                .get_or_create(&[("reason", reason)])
                .inc();
            tracing::debug!(%peer, reason, "connection refused at accept");
        };
        // A trusted proxy's connections carry many clients: each upgrade is limited by its
        // client's address instead (transport::ws).
        let slot = if ctx.ip_gate.trusts(peer.ip()) {
            None
        } else {
            match ctx.ip_gate.admit(peer.ip()) {
                Ok(slot) => Some(slot),
                Err(refusal) => {
                    refuse(refusal.label());
                    continue;
                }
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            refuse("max_connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let permit = ConnPermit(Arc::new((permit, slot)));
        let (ctx, router, drained) = (ctx.clone(), router.clone(), drained.clone());
        // Not on the node's tracker: the drain waits for sessions (each upgrade spawns its own
        // task there), not for idle keep-alive connections; these end when the drain does.
        tokio::spawn(async move {
            match ctx.tls.clone() {
                None => serve_connection(stream, peer, ctx, router, permit, None, drained).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(
                        ctx.config.handshake_timeout(),
                        tls.acceptor().accept(stream),
                    );
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            ctx.metrics
                                .connections_refused
                                .get_or_create(&[("reason", "tls_handshake")])
                                .inc();
                            tracing::debug!(%peer, %error, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            ctx.metrics
                                .connections_refused
                                .get_or_create(&[("reason", "tls_timeout")])
                                .inc();
                            return;
                        }
                    };
                    // rustls verified the chain; which service the certificate names is ours to check.
                    let identity = match stream.get_ref().1.peer_certificates() {
                        None => None,
                        Some(chain) => match ctx.services.identify(chain) {
                            Ok(principal) => Some(principal),
                            Err(error) => {
                                ctx.metrics
                                    .connections_refused
                                    .get_or_create(&[("reason", "tls_identity")])
                                    .inc();
                                tracing::debug!(%peer, %error, "client certificate refused");
                                return;
                            }
                        },
                    };
                    serve_connection(stream, peer, ctx, router, permit, identity, drained).await;
                }
            }
        });
    }
}

/// Serves HTTP/1.1 (with upgrades) on one connection, plain or TLS.
async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    ctx: Arc<NodeContext>,
    router: Router,
    permit: ConnPermit,
    identity: Option<Principal>,
    drained: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        req.extensions_mut().insert(permit.clone());
        if let Some(identity) = &identity {
            req.extensions_mut().insert(PeerIdentity(identity.clone()));
        }
        router.clone().oneshot(req)
    });
    let config = &ctx.config.server;
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.config.handshake_timeout())
        .max_buf_size(config.max_header_bytes)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    // During the drain requests are still answered (/readyz with 503, /ws upgrades refused);
    // once it is over the connection finishes what is in flight and closes.
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = drained.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(Duration::from_secs(1), conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "http connection ended with an error");
    }
}

/// A listening socket with an explicit accept backlog: a burst of connects (a reconnect storm
/// after a deploy) must queue in the kernel, not be dropped into the client's 1 s SYN retry.
fn bind_tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// `<hostname>-<6 hex>`: unique enough to tell nodes apart, readable in logs.
fn generated_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", random_hex(3))
}
