//! The QUIC endpoints: their configuration (every QUIC limit set explicitly), the accept loops
//! with their connection limits and address validation, and the certificate's rotation or reload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use quinn::VarInt;

use super::establish::connection;
use crate::certs::webtransport::{self as certs, CertError, CurrentCert};
use crate::config::{AddressValidation, ClientAuth, TlsConfig, WebTransportConfig};
use crate::context::NodeContext;

/// Why the WebTransport listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebTransportError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("QUIC crypto: {0}")]
    Crypto(String),
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The bound QUIC endpoints, not yet accepting.
pub struct Listener {
    endpoints: Vec<quinn::Endpoint>,
}

impl Listener {
    /// Loads or generates the certificate and binds every `webtransport.listen` address.
    pub fn bind(
        config: &WebTransportConfig,
        tls_config: &TlsConfig,
        current: &CurrentCert,
    ) -> Result<Listener, WebTransportError> {
        let cert = certs::load_or_generate(config)?;
        current.set(cert.info.clone());
        let server_config = server_config(config, tls_config, cert)?;
        let mut endpoints = Vec::new();
        for &addr in &config.listen {
            let endpoint = quinn::Endpoint::server(server_config.clone(), addr)
                .map_err(|source| WebTransportError::Bind { addr, source })?;
            endpoints.push(endpoint);
        }
        Ok(Listener { endpoints })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.endpoints
            .iter()
            .filter_map(|e| e.local_addr().ok())
            .collect()
    }

    /// Starts the accept loops (and, for a generated certificate, the rotation task) on the
    /// node's tracker. Returns the endpoints so the node can close them at the end of the drain.
    pub fn serve(self, ctx: &Arc<NodeContext>) -> Vec<quinn::Endpoint> {
        let shared = Arc::new(Shared {
            handshaking: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        });
        for endpoint in &self.endpoints {
            if let Ok(addr) = endpoint.local_addr() {
                tracing::info!(%addr, path = %ctx.config.webtransport.path, "serving WebTransport (HTTP/3 over QUIC)");
            }
            ctx.tracker
                .spawn(accept_loop(endpoint.clone(), ctx.clone(), shared.clone()));
        }
        if ctx.config.webtransport.cert_file.is_empty() {
            ctx.tracker
                .spawn(rotate_certificate(ctx.clone(), self.endpoints.clone()));
        } else {
            ctx.tracker
                .spawn(reload_files(ctx.clone(), self.endpoints.clone()));
        }
        self.endpoints
    }
}

/// Connection counts shared by the accept loops of all endpoints.
struct Shared {
    handshaking: AtomicUsize,
    open: AtomicUsize,
}

/// One of the [`Shared`] counts, held while a connection is in it: counted up when made,
/// down when dropped, whichever way the connection task ends.
pub(super) struct CountGuard {
    shared: Arc<Shared>,
    count: fn(&Shared) -> &AtomicUsize,
}

impl CountGuard {
    fn new(shared: &Arc<Shared>, count: fn(&Shared) -> &AtomicUsize) -> Self {
        count(shared).fetch_add(1, Ordering::Relaxed);
        CountGuard {
            shared: shared.clone(),
            count,
        }
    }

    fn count(&self) -> &AtomicUsize {
        (self.count)(&self.shared)
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.count().fetch_sub(1, Ordering::Relaxed);
    }
}

fn varint(value: u64) -> VarInt {
    VarInt::from_u64(value).unwrap_or(VarInt::MAX)
}

/// The quinn server configuration: TLS from [`certs::server_tls`] and every QUIC limit from the
/// config, set explicitly.
fn server_config(
    config: &WebTransportConfig,
    tls_config: &TlsConfig,
    cert: certs::CertifiedKey,
) -> Result<quinn::ServerConfig, WebTransportError> {
    let verifier =
        crate::tls::client_verifier(config.client_auth, tls_config.client_ca_file.as_deref())
            .map_err(|e| WebTransportError::Crypto(format!("{e:#}")))?;
    let tls = certs::server_tls(cert, verifier)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| WebTransportError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(varint(config.max_bidi_streams))
        .max_concurrent_uni_streams(varint(config.max_uni_streams))
        .stream_receive_window(varint(config.stream_receive_window))
        .receive_window(varint(config.receive_window))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms))
                .unwrap_or(quinn::IdleTimeout::from(VarInt::from_u32(30_000))),
        ))
        .keep_alive_interval(Some(Duration::from_millis(config.keep_alive_interval_ms)))
        .datagram_receive_buffer_size(Some(config.datagram_receive_buffer_bytes))
        .datagram_send_buffer_size(config.datagram_send_buffer_bytes);
    server.transport_config(Arc::new(transport));
    // A client whose address changes (a NAT rebinding, Wi-Fi to cellular) keeps its session:
    // quinn validates the new path and moves the connection to it (tests/faults.rs).
    server.migration(true);
    Ok(server)
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<NodeContext>, shared: Arc<Shared>) {
    let config = &ctx.config.webtransport;
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = ctx.shutdown.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        let refused = |reason: &'static str| {
            ctx.metrics
                .connections_refused
                .get_or_create(&[("reason", reason)])
                .inc();
        };
        let slot = match ctx.ip_gate.admit(incoming.remote_address().ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                refused(refusal.label());
                incoming.refuse();
                continue;
            }
        };
        if shared.open.load(Ordering::Relaxed) >= config.max_connections {
            refused("quic_max_connections");
            incoming.refuse();
            continue;
        }
        let must_retry = match config.address_validation {
            AddressValidation::Never => false,
            AddressValidation::Always => true,
            AddressValidation::UnderLoad => {
                shared.handshaking.load(Ordering::Relaxed) > config.retry_above_handshakes
            }
        };
        if must_retry && !incoming.remote_address_validated() && incoming.may_retry() {
            ctx.metrics.quic_retries.inc();
            if incoming.retry().is_err() {
                tracing::debug!("quic retry impossible");
            }
            continue;
        }
        let open = CountGuard::new(&shared, |s| &s.open);
        let handshaking = CountGuard::new(&shared, |s| &s.handshaking);
        ctx.tracker.spawn(
            connection(ctx.clone(), incoming, handshaking).map(move |()| drop((open, slot))),
        );
    }
}

/// Replaces a generated certificate when half its validity is over: new connections get the new
/// one, open connections keep theirs; `/webtransport/certhash` answers the new hash.
async fn rotate_certificate(ctx: Arc<NodeContext>, endpoints: Vec<quinn::Endpoint>) {
    let config = ctx.config.webtransport.clone();
    let validity = Duration::from_secs(u64::from(config.generated_cert_validity_days) * 86_400);
    let every = match config.generated_cert_rotate_after_ms {
        0 => validity / 2,
        ms => Duration::from_millis(ms),
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = ctx.shutdown.cancelled() => return,
        }
        match rebuild(&ctx).await {
            Ok((info, server)) => {
                install(&ctx, &endpoints, info.clone(), server);
                tracing::info!(sha256 = %info.hex, "rotated the generated WebTransport certificate");
            }
            Err(error) => {
                tracing::error!(%error, "certificate rotation failed; keeping the old one")
            }
        }
    }
}

/// With certificate files configured: re-reads them (and the client CA file, with mutual TLS)
/// when any changes, every `tls.reload_interval_ms`, so rotating a certificate or revoking a CA
/// needs no restart. A broken new file is logged and retried; the old configuration stays.
async fn reload_files(ctx: Arc<NodeContext>, endpoints: Vec<quinn::Endpoint>) {
    let config = &ctx.config.webtransport;
    let mut files = vec![config.cert_file.clone(), config.key_file.clone()];
    if config.client_auth != ClientAuth::Off {
        files.extend(ctx.config.tls.client_ca_file.clone());
    }
    let stamps = move |files: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            files
                .iter()
                .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default()
    };
    let mut seen = stamps(files.clone()).await;
    let mut ticker =
        tokio::time::interval(Duration::from_millis(ctx.config.tls.reload_interval_ms));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = ctx.shutdown.cancelled() => return,
        }
        let now = stamps(files.clone()).await;
        if now == seen {
            continue;
        }
        match rebuild(&ctx).await {
            Ok((info, server)) => {
                install(&ctx, &endpoints, info.clone(), server);
                seen = now;
                tracing::info!(sha256 = %info.hex, "reloaded the WebTransport certificate files");
            }
            Err(error) => {
                tracing::warn!(%error, "WebTransport reload failed; keeping the previous configuration")
            }
        }
    }
}

/// Loads (or generates) the certificate and builds the server configuration, off the workers:
/// key generation and file reads are blocking work.
async fn rebuild(ctx: &Arc<NodeContext>) -> Result<(certs::CertInfo, quinn::ServerConfig), String> {
    let (config, tls) = (ctx.config.webtransport.clone(), ctx.config.tls.clone());
    tokio::task::spawn_blocking(move || {
        let cert = certs::load_or_generate(&config).map_err(|e| e.to_string())?;
        let info = cert.info.clone();
        let server = server_config(&config, &tls, cert).map_err(|e| e.to_string())?;
        Ok((info, server))
    })
    .await
    .map_err(|e| e.to_string())?
}

fn install(
    ctx: &NodeContext,
    endpoints: &[quinn::Endpoint],
    info: certs::CertInfo,
    server: quinn::ServerConfig,
) {
    for endpoint in endpoints {
        endpoint.set_server_config(Some(server.clone()));
    }
    if let Some(current) = &ctx.webtransport_cert {
        current.set(info);
    }
}
