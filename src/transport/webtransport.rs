//! WebTransport adapter: a QUIC endpoint (quinn) speaking HTTP/3 (h3, h3-quinn) with WebTransport
//! sessions (h3-webtransport), turned into the same [`FrameSource`]/[`FrameSink`] pair as WebSocket.
//!
//! One QUIC connection carries one WebTransport session. The CONNECT request (`/wt?token=...` or
//! `Authorization: Bearer`) is checked before the session is accepted: a bad token gets 401 and no
//! session exists. The session then runs on the first bidirectional stream the client opens:
//! frames are length-delimited with a Protobuf varint prefix, exactly one `ClientFrame` or
//! `ServerFrame` each, so the protocol is the WebSocket one with another framing. Further streams
//! are reset. Unreliable messages travel as QUIC datagrams (HTTP/3 datagram: the session's
//! quarter stream id, then the encoded frame) and may be dropped.
//!
//! Closing: the node writes its last frames, finishes its stream, waits (linger) for the client to
//! finish its own, then closes the QUIC connection with the session's close code mapped into the
//! HTTP/3 application error space (the WebTransport draft's mapping), so a client that reads the
//! connection's close learns the same code a WebSocket client gets in its close frame.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use h3::ext::Protocol;
use h3::quic::BidiStream as _;
use h3_webtransport::server::{AcceptedBi, WebTransportSession};
use http::{Method, Request, Response, StatusCode};
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;

use crate::auth::{AuthError, Principal};
use crate::certs::webtransport::{self as certs, CertError, CurrentCert};
use crate::config::{AddressValidation, ClientAuth, TlsConfig, WebTransportConfig};
use crate::context::NodeContext;
use crate::member::{DatagramOutcome, Datagrams, Transport};
use crate::metrics::Metrics;
use crate::proto::framing::{self, Delimited};
use crate::session::{FrameSink, FrameSource, Inbound, TransportError};

type H3Conn = h3_quinn::Connection;
type WtSession = WebTransportSession<H3Conn, Bytes>;
type WtSend = h3_webtransport::stream::SendStream<h3_quinn::SendStream<Bytes>, Bytes>;
type WtRecv = h3_webtransport::stream::RecvStream<h3_quinn::RecvStream, Bytes>;

/// HTTP/3 requests on one connection before it is given up (refused CONNECTs, stray GETs).
const MAX_REQUESTS_BEFORE_SESSION: usize = 8;
/// WebTransport application error code of a reset extra stream (mapped into the HTTP/3 space on
/// the wire, as the draft requires).
const STREAM_REFUSED: u32 = 1;

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
struct CountGuard {
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

/// Why a CONNECT request was refused before any session existed.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NotFound,
    NotConnect,
    Unauthorized,
    AuthBusy,
    Draining,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::NotConnect => StatusCode::BAD_REQUEST,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::AuthBusy => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Refusal::NotFound => "wt_not_found",
            Refusal::NotConnect => "wt_not_connect",
            Refusal::Unauthorized => "wt_unauthorized",
            Refusal::AuthBusy => "wt_auth_busy",
            Refusal::Draining => "draining",
        }
    }
}

/// The token of a CONNECT request: `?token=` in the query, else `Authorization: Bearer`.
fn request_token(req: &Request<()>) -> Option<String> {
    if let Some(query) = req.uri().query() {
        let token = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned());
        if token.is_some() {
            return token;
        }
    }
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
}

/// Checks a CONNECT request; `Ok` carries the principal of the token it presented (`None`: no
/// token, the Connect frame may carry one), exactly as a WebSocket upgrade is checked.
fn check_request(
    ctx: &NodeContext,
    req: &Request<()>,
    certified: Option<&Principal>,
) -> Result<Option<Principal>, Refusal> {
    if ctx.is_draining() {
        return Err(Refusal::Draining);
    }
    let is_wt = req.method() == Method::CONNECT
        && req.extensions().get::<Protocol>() == Some(&Protocol::WEB_TRANSPORT);
    if !is_wt {
        return Err(Refusal::NotConnect);
    }
    if req.uri().path() != ctx.config.webtransport.path {
        return Err(Refusal::NotFound);
    }
    // A service's client certificate identifies it; a token beside it is not looked at.
    if let Some(principal) = certified {
        return Ok(Some(principal.clone()));
    }
    let Some(token) = request_token(req).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    match ctx.authenticate(&token, 0) {
        Ok(principal) => Ok(Some(principal)),
        Err(error) => Err(match error {
            AuthError::Busy => Refusal::AuthBusy,
            _ => Refusal::Unauthorized,
        }),
    }
}

async fn respond(
    stream: &mut h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
    status: StatusCode,
) {
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("a status-only response is valid");
    // Bounded: a peer that grants no stream credit must not hold this task (and its connection
    // slot) forever; after the bound the refusal is abandoned with the connection.
    let _ = tokio::time::timeout(RESPOND_TIMEOUT, async {
        let _ = stream.send_response(response).await;
        let _ = stream.finish().await;
    })
    .await;
}

/// Longest a refusal response may take to write.
const RESPOND_TIMEOUT: Duration = Duration::from_secs(2);

/// One QUIC connection: [`establish`] (handshake, HTTP/3, the CONNECT check, the session
/// stream), then the session. The establishing runs boxed: it is large (the h3 and
/// h3-webtransport futures) and runs once, and what stays for the connection's life is only the
/// session's own state. A plain function, not an `async fn`, so nothing is held twice.
fn connection(
    ctx: Arc<NodeContext>,
    incoming: quinn::Incoming,
    handshaking: CountGuard,
) -> impl Future<Output = ()> + Send {
    let span = tracing::info_span!("wt_connection", peer = %incoming.remote_address());
    let establishing = Box::pin(establish(ctx.clone(), incoming, handshaking));
    tracing::Instrument::instrument(
        async move {
            let Some(Established {
                session,
                quic,
                close,
                run,
            }) = establishing.await
            else {
                return;
            };
            tokio::select! {
                _ = run => {}
                _ = refuse_extra_streams(&ctx, &session) => {}
            }
            let (code, reason) = close
                .lock()
                .expect("close lock poisoned")
                .take()
                .unwrap_or((1000, String::new()));
            quic.close(
                varint(web_transport_quinn::proto::error_to_http3(u32::from(code))),
                reason.as_bytes(),
            );
            drop(session);
        },
        span,
    )
}

/// A connection with an accepted WebTransport session, and the session ready to run.
struct Established<R> {
    session: WtSession,
    quic: quinn::Connection,
    /// The close code and reason the session's sink leaves for the connection.
    close: Arc<Mutex<Option<(u16, String)>>>,
    run: R,
}

async fn establish(
    ctx: Arc<NodeContext>,
    incoming: quinn::Incoming,
    guard: CountGuard,
) -> Option<Established<impl Future<Output = ()> + Send>> {
    let peer = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + ctx.config.handshake_timeout();
    let refused = |reason: &'static str| {
        ctx.metrics
            .connections_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    };
    let conn = match incoming.accept() {
        Ok(connecting) => match tokio::time::timeout_at(deadline, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                tracing::debug!(%error, "quic handshake failed");
                refused("quic_handshake");
                return None;
            }
            Err(_) => {
                refused("handshake_timeout");
                return None;
            }
        },
        Err(error) => {
            tracing::debug!(%error, "quic accept failed");
            return None;
        }
    };
    // Mutual TLS: rustls verified the chain; which service the certificate names is ours to check.
    let certified = match conn
        .peer_identity()
        .map(|identity| identity.downcast::<Vec<CertificateDer<'static>>>())
    {
        Some(Ok(chain)) => match ctx.services.identify(&chain) {
            Ok(principal) => Some(principal),
            Err(error) => {
                tracing::debug!(%error, "client certificate refused");
                refused("tls_identity");
                conn.close(
                    VarInt::from_u32(0x0100),
                    b"client certificate names no configured service",
                );
                return None;
            }
        },
        _ => None,
    };
    let quic = conn.clone();
    let config = &ctx.config.webtransport;
    let mut builder = h3::server::builder();
    builder
        .enable_webtransport(true)
        .enable_extended_connect(true)
        .enable_datagram(true)
        .max_webtransport_sessions(config.max_sessions_per_connection)
        .send_grease(true);
    let h3 = builder.build::<H3Conn, Bytes>(h3_quinn::Connection::new(conn));
    let mut h3 = match tokio::time::timeout_at(deadline, h3).await {
        Ok(Ok(h3)) => h3,
        _ => {
            refused("h3_setup");
            quic.close(VarInt::from_u32(0x0101), b"h3 setup failed");
            return None;
        }
    };

    // Requests until one is an acceptable WebTransport CONNECT.
    let mut requests = 0;
    let (request, mut stream, authenticated) = loop {
        requests += 1;
        let resolver = match tokio::time::timeout_at(deadline, h3.accept()).await {
            Ok(Ok(Some(resolver))) => resolver,
            Ok(Ok(None)) | Ok(Err(_)) => return None,
            Err(_) => {
                refused("handshake_timeout");
                quic.close(VarInt::from_u32(0x0100), b"no WebTransport session in time");
                return None;
            }
        };
        let (request, mut stream) =
            match tokio::time::timeout_at(deadline, resolver.resolve_request()).await {
                Ok(Ok(resolved)) => resolved,
                _ => continue,
            };
        match check_request(&ctx, &request, certified.as_ref()) {
            Ok(authenticated) => break (request, stream, authenticated),
            Err(refusal) => {
                refused(refusal.label());
                tracing::debug!(reason = refusal.label(), path = %request.uri().path(), "webtransport request refused");
                respond(&mut stream, refusal.status()).await;
                if requests >= MAX_REQUESTS_BEFORE_SESSION {
                    quic.close(VarInt::from_u32(0x0100), b"too many refused requests");
                    return None;
                }
            }
        }
    };
    let quarter_id = stream.send_id().index();
    // The CONNECT can overtake the client's SETTINGS (they travel on another stream), and
    // h3-webtransport refuses a session while the peer's settings are unknown: read them first.
    match tokio::time::timeout_at(deadline, peer_settings(&mut h3)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            refused("wt_no_webtransport_settings");
            respond(&mut stream, StatusCode::BAD_REQUEST).await;
            return None;
        }
        Ok(Err(_)) | Err(_) => {
            refused("h3_setup");
            quic.close(VarInt::from_u32(0x010a), b"no SETTINGS in time");
            return None;
        }
    }
    let session =
        match tokio::time::timeout_at(deadline, WebTransportSession::accept(request, stream, h3))
            .await
        {
            Ok(Ok(session)) => session,
            Ok(Err(error)) => {
                tracing::debug!(%error, "webtransport session not accepted");
                refused("wt_accept");
                return None;
            }
            Err(_) => {
                refused("handshake_timeout");
                quic.close(VarInt::from_u32(0x0100), b"no WebTransport session in time");
                return None;
            }
        };

    // The session's stream: the first bidirectional stream the client opens.
    let bidi = loop {
        match tokio::time::timeout_at(deadline, session.accept_bi()).await {
            Ok(Ok(Some(AcceptedBi::BidiStream(_, bidi)))) => break bidi,
            Ok(Ok(Some(AcceptedBi::Request(_, mut other)))) => {
                refused("wt_extra_session");
                respond(&mut other, StatusCode::TOO_MANY_REQUESTS).await;
            }
            Ok(Ok(None)) | Ok(Err(_)) => return None,
            Err(_) => {
                refused("handshake_timeout");
                quic.close(VarInt::from_u32(0x0100), b"no session stream in time");
                return None;
            }
        }
    };
    drop(guard);
    let (send, recv) = bidi.split();
    let close = Arc::new(Mutex::new(None));
    let datagrams = DatagramPath::new(quic.clone(), quarter_id, ctx.metrics.clone());
    let source = WtSource {
        recv,
        buf: BytesMut::new(),
        max_frame: ctx.config.session.max_frame_bytes,
        datagrams: datagrams.clone(),
    };
    let sink = WtSink {
        send,
        buf: BytesMut::new(),
        close: close.clone(),
        datagrams,
    };
    let run = crate::session::run(
        ctx.clone(),
        Transport::WebTransport,
        peer,
        authenticated,
        source,
        sink,
    );
    Some(Established {
        session,
        quic,
        close,
        run,
    })
}

/// Waits until the peer's HTTP/3 SETTINGS have been read; returns whether they enable
/// WebTransport and datagrams.
async fn peer_settings(
    h3: &mut h3::server::Connection<H3Conn, Bytes>,
) -> Result<bool, h3::error::ConnectionError> {
    use h3::ConnectionState as _;
    let supported = |h3: &h3::server::Connection<H3Conn, Bytes>| {
        let settings = h3.settings();
        settings.enable_webtransport() && settings.enable_datagram()
    };
    if supported(h3) {
        return Ok(true);
    }
    // The first frame of the control stream is SETTINGS (anything else is a connection error
    // inside h3), so one frame is enough.
    std::future::poll_fn(|cx| h3.inner.poll_control(cx)).await?;
    Ok(supported(h3))
}

/// Resets every bidirectional stream after the session's first, and answers further CONNECTs
/// with 429; never completes on its own (the session's end ends it).
async fn refuse_extra_streams(ctx: &NodeContext, session: &WtSession) {
    loop {
        match session.accept_bi().await {
            Ok(Some(AcceptedBi::BidiStream(_, mut bidi))) => {
                ctx.metrics.webtransport_streams_refused.inc();
                tracing::debug!("extra bidirectional stream reset");
                let code = web_transport_quinn::proto::error_to_http3(STREAM_REFUSED);
                h3::quic::SendStream::reset(&mut bidi, code);
                h3::quic::RecvStream::stop_sending(&mut bidi, code);
            }
            Ok(Some(AcceptedBi::Request(_, mut other))) => {
                ctx.metrics
                    .connections_refused
                    .get_or_create(&[("reason", "wt_extra_session")])
                    .inc();
                // Boxed: rare, and this future is part of every open connection's state.
                Box::pin(respond(&mut other, StatusCode::TOO_MANY_REQUESTS)).await;
            }
            Ok(None) | Err(_) => break,
        }
    }
    std::future::pending::<()>().await;
}

/// The datagram side of a session: sends encoded frames as HTTP/3 datagrams without waiting.
#[derive(Clone)]
pub struct DatagramPath {
    conn: quinn::Connection,
    /// The session's quarter stream id, QUIC-varint encoded: every datagram starts with it.
    prefix: Bytes,
    metrics: Arc<Metrics>,
}

impl DatagramPath {
    fn new(conn: quinn::Connection, quarter_id: u64, metrics: Arc<Metrics>) -> Self {
        let mut prefix = BytesMut::new();
        quic_varint(quarter_id, &mut prefix);
        Self {
            conn,
            prefix: prefix.freeze(),
            metrics,
        }
    }

    /// The next datagram of this session, without its prefix; `None` once the connection is gone.
    async fn recv(&self) -> Option<Bytes> {
        loop {
            let mut datagram = self.conn.read_datagram().await.ok()?;
            if datagram.starts_with(&self.prefix) {
                datagram.advance(self.prefix.len());
                return Some(datagram);
            }
            self.metrics
                .datagrams_received
                .get_or_create(&[("outcome", "other_session")])
                .inc();
        }
    }
}

impl Datagrams for DatagramPath {
    /// Sends `frame` (already encoded once for every receiver) as one datagram. Never waits:
    /// when the send buffer has no room the datagram is dropped, as datagrams may be.
    fn send(&self, frame: &Bytes) -> DatagramOutcome {
        let len = self.prefix.len() + frame.len();
        let dropped = |reason: &'static str| {
            self.metrics
                .datagrams_dropped
                .get_or_create(&[("reason", reason)])
                .inc();
        };
        let Some(max) = self.conn.max_datagram_size() else {
            dropped("unsupported");
            return DatagramOutcome::Dropped;
        };
        if len > max {
            dropped("too_large");
            return DatagramOutcome::TooLarge {
                max: max.saturating_sub(self.prefix.len()),
            };
        }
        if self.conn.datagram_send_buffer_space() < len {
            dropped("buffer_full");
            return DatagramOutcome::Dropped;
        }
        // The prefix is per connection, so this one copy per receiver is the datagram framing;
        // the frame itself was encoded once.
        let mut datagram = BytesMut::with_capacity(len);
        datagram.extend_from_slice(&self.prefix);
        datagram.extend_from_slice(frame);
        match self.conn.send_datagram(datagram.freeze()) {
            Ok(()) => {
                self.metrics.datagrams_sent.inc();
                DatagramOutcome::Sent
            }
            Err(quinn::SendDatagramError::TooLarge) => {
                dropped("too_large");
                DatagramOutcome::TooLarge {
                    max: max.saturating_sub(self.prefix.len()),
                }
            }
            Err(_) => {
                dropped("connection");
                DatagramOutcome::Dropped
            }
        }
    }
}

/// QUIC variable-length integer (RFC 9000 §16), the framing of HTTP/3 datagrams.
fn quic_varint(value: u64, out: &mut BytesMut) {
    if value < 1 << 6 {
        out.extend_from_slice(&[value as u8]);
    } else if value < 1 << 14 {
        out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes());
    } else if value < 1 << 30 {
        out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// The read half: the session stream's frames, and the session's datagrams.
pub struct WtSource {
    recv: WtRecv,
    buf: BytesMut,
    max_frame: usize,
    datagrams: DatagramPath,
}

impl FrameSource for WtSource {
    async fn recv(&mut self) -> Result<Inbound, TransportError> {
        loop {
            match framing::parse_delimited(&self.buf, self.max_frame) {
                Delimited::Frame { prefix, len } => {
                    self.buf.advance(prefix);
                    let frame = self.buf.split_to(len).freeze();
                    if self.buf.is_empty() {
                        // An emptied buffer would still pin the chunk it came from.
                        self.buf = BytesMut::new();
                    }
                    return Ok(Inbound::Frame(frame));
                }
                Delimited::TooBig { .. } => {
                    return Err(TransportError::TooBig {
                        max: self.max_frame,
                    });
                }
                Delimited::Invalid => {
                    return Err(TransportError::Protocol("invalid length prefix".into()));
                }
                Delimited::Incomplete { need } => {
                    // A frame split across chunks: room for the rest of it (bounded by
                    // max_frame), so it is copied together once.
                    if !self.buf.is_empty() {
                        self.buf.reserve(need.saturating_sub(self.buf.len()));
                    }
                }
            }
            // quinn hands out the chunks it received: no read buffer of our own is held while
            // the session is idle, and a chunk of whole frames is sliced, not copied.
            let chunk =
                std::future::poll_fn(|cx| h3::quic::RecvStream::poll_data(&mut self.recv, cx));
            tokio::select! {
                chunk = chunk => match chunk {
                    Ok(Some(chunk)) if self.buf.is_empty() => {
                        self.buf = chunk.try_into_mut().unwrap_or_else(|c| BytesMut::from(&c[..]));
                    }
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                    Ok(None) => return Ok(Inbound::Closed),
                    Err(error) => return Err(TransportError::Io(error.to_string())),
                },
                datagram = self.datagrams.recv() => match datagram {
                    Some(datagram) => return Ok(Inbound::Datagram(datagram)),
                    None => return Ok(Inbound::Closed),
                },
            }
        }
    }
}

/// The write half: one coalesced stream write per batch; the close code waits in `close` for
/// the connection task, which closes the QUIC connection with it once the session is over.
pub struct WtSink {
    send: WtSend,
    buf: BytesMut,
    close: Arc<Mutex<Option<(u16, String)>>>,
    datagrams: DatagramPath,
}

impl FrameSink for WtSink {
    async fn send_batch(&mut self, frames: &[Bytes]) -> Result<(), TransportError> {
        self.buf.clear();
        for frame in frames {
            framing::delimit_into(frame, &mut self.buf);
        }
        self.send
            .write_all(&self.buf)
            .await
            .map_err(|e| TransportError::Io(e.to_string()))?;
        // Keep a big batch's buffer from pinning memory for the rest of the session.
        if self.buf.capacity() > 256 * 1024 {
            self.buf = BytesMut::new();
        }
        Ok(())
    }

    /// QUIC keep-alives keep the connection up; liveness of the client is its Ping frames.
    async fn heartbeat(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &str) {
        *self.close.lock().expect("close lock poisoned") = Some((code, reason.to_string()));
        let _ = self.send.shutdown().await;
    }

    fn datagrams(&self) -> Option<Box<dyn Datagrams>> {
        Some(Box::new(self.datagrams.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_varints_use_the_shortest_form() {
        for (value, expected) in [
            (0u64, vec![0x00]),
            (37, vec![0x25]),
            (15293, vec![0x7b, 0xbd]),
            (494_878_333, vec![0x9d, 0x7f, 0x3e, 0x7d]),
        ] {
            let mut out = BytesMut::new();
            quic_varint(value, &mut out);
            assert_eq!(out.to_vec(), expected, "{value}");
        }
    }
}
