//! From a QUIC connection to a running session: the handshake, the client certificate's
//! identity, HTTP/3, the WebTransport CONNECT and its token, the session and its stream; then the
//! session runs, and the connection is closed with the session's close code.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h3::ext::Protocol;
use h3::quic::BidiStream as _;
use h3_webtransport::server::{AcceptedBi, WebTransportSession};
use http::{Method, Request, Response, StatusCode};
use quinn::VarInt;
use rustls_pki_types::CertificateDer;

use super::endpoint::{CountGuard, varint};
use super::stream::{DatagramPath, WtSink, WtSource};
use super::{H3Conn, WtSession};
use crate::auth::Principal;
use crate::context::NodeContext;
use crate::member::Transport;

/// HTTP/3 requests on one connection before it is given up (refused CONNECTs, stray GETs).
const MAX_REQUESTS_BEFORE_SESSION: usize = 8;
/// WebTransport application error code of a reset extra stream (mapped into the HTTP/3 space on
/// the wire, as the draft requires).
const STREAM_REFUSED: u32 = 1;

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
/// token, the Connect frame may carry one), exactly as a WebSocket upgrade is checked. The token
/// check (in a mesh, a round trip to the shared token-id store) stays within the establishing's
/// `deadline`; a check cut off by it is refused as retryable.
async fn check_request(
    ctx: &NodeContext,
    req: &Request<()>,
    certified: Option<&Principal>,
    deadline: tokio::time::Instant,
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
    match tokio::time::timeout_at(deadline, ctx.authenticate(&token)).await {
        Ok(Ok(principal)) => Ok(Some(principal)),
        Ok(Err(error)) if error.retryable() => Err(Refusal::AuthBusy),
        Ok(Err(_)) => Err(Refusal::Unauthorized),
        Err(_) => Err(Refusal::AuthBusy),
    }
}

async fn respond(stream: &mut RequestStream, status: StatusCode) {
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
pub(super) fn connection(
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
    let steps = Steps {
        ctx: &ctx,
        deadline: tokio::time::Instant::now() + ctx.config.handshake_timeout(),
    };
    let quic = steps.handshake(incoming).await?;
    let certified = steps.identify(&quic)?;
    let mut h3 = steps.http3(&quic).await?;
    let (request, stream, authenticated) = steps.connect_request(&quic, &mut h3, certified).await?;
    let quarter_id = stream.send_id().index();
    let session = steps.session(&quic, h3, request, stream).await?;
    let bidi = steps.session_stream(&quic, &session).await?;
    // Established: the connection no longer counts as handshaking.
    drop(guard);
    let (send, recv) = bidi.split();
    let close = Arc::new(Mutex::new(None));
    let datagrams = DatagramPath::new(quic.clone(), quarter_id, ctx.metrics.clone());
    let source = WtSource::new(recv, ctx.config.session.max_frame_bytes, datagrams.clone());
    let sink = WtSink::new(send, close.clone(), datagrams);
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

type RequestStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// The steps of establishing a session, each under the connection's one handshake deadline.
/// A step that fails has counted the refusal (`roomwire_connections_refused_total{reason}`),
/// answered or closed what it could, and returns `None`.
struct Steps<'a> {
    ctx: &'a NodeContext,
    deadline: tokio::time::Instant,
}

impl Steps<'_> {
    fn refused(&self, reason: &'static str) {
        self.ctx
            .metrics
            .connections_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Gives up on the connection at the deadline, telling the peer why.
    fn timed_out(&self, quic: &quinn::Connection, why: &'static [u8]) {
        self.refused("handshake_timeout");
        quic.close(VarInt::from_u32(0x0100), why);
    }

    /// The QUIC (and TLS) handshake.
    async fn handshake(&self, incoming: quinn::Incoming) -> Option<quinn::Connection> {
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(error) => {
                tracing::debug!(%error, "quic accept failed");
                return None;
            }
        };
        match tokio::time::timeout_at(self.deadline, connecting).await {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(error)) => {
                tracing::debug!(%error, "quic handshake failed");
                self.refused("quic_handshake");
                None
            }
            Err(_) => {
                self.refused("handshake_timeout");
                None
            }
        }
    }

    /// Mutual TLS: rustls verified the chain; which service the certificate names is ours to
    /// check. `Some(None)`: no certificate (a browser, or a service with a token).
    fn identify(&self, quic: &quinn::Connection) -> Option<Option<Principal>> {
        let chain = quic
            .peer_identity()
            .map(|identity| identity.downcast::<Vec<CertificateDer<'static>>>());
        let Some(Ok(chain)) = chain else {
            return Some(None);
        };
        match self.ctx.services.identify(&chain) {
            Ok(principal) => Some(Some(principal)),
            Err(error) => {
                tracing::debug!(%error, "client certificate refused");
                self.refused("tls_identity");
                quic.close(
                    VarInt::from_u32(0x0100),
                    b"client certificate names no configured service",
                );
                None
            }
        }
    }

    /// HTTP/3 with extended CONNECT, WebTransport and datagrams.
    async fn http3(
        &self,
        quic: &quinn::Connection,
    ) -> Option<h3::server::Connection<H3Conn, Bytes>> {
        let config = &self.ctx.config.webtransport;
        let mut builder = h3::server::builder();
        builder
            .enable_webtransport(true)
            .enable_extended_connect(true)
            .enable_datagram(true)
            .max_webtransport_sessions(config.max_sessions_per_connection)
            .send_grease(true);
        let h3 = builder.build::<H3Conn, Bytes>(h3_quinn::Connection::new(quic.clone()));
        match tokio::time::timeout_at(self.deadline, h3).await {
            Ok(Ok(h3)) => Some(h3),
            _ => {
                self.refused("h3_setup");
                quic.close(VarInt::from_u32(0x0101), b"h3 setup failed");
                None
            }
        }
    }

    /// Requests until one is an acceptable WebTransport CONNECT (refused ones are answered; a
    /// connection that keeps sending them is closed), with the principal its token names.
    async fn connect_request(
        &self,
        quic: &quinn::Connection,
        h3: &mut h3::server::Connection<H3Conn, Bytes>,
        certified: Option<Principal>,
    ) -> Option<(Request<()>, RequestStream, Option<Principal>)> {
        for _ in 0..MAX_REQUESTS_BEFORE_SESSION {
            let resolver = match tokio::time::timeout_at(self.deadline, h3.accept()).await {
                Ok(Ok(Some(resolver))) => resolver,
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => {
                    self.timed_out(quic, b"no WebTransport session in time");
                    return None;
                }
            };
            let (request, mut stream) =
                match tokio::time::timeout_at(self.deadline, resolver.resolve_request()).await {
                    Ok(Ok(resolved)) => resolved,
                    _ => continue,
                };
            match check_request(self.ctx, &request, certified.as_ref(), self.deadline).await {
                Ok(authenticated) => return Some((request, stream, authenticated)),
                Err(refusal) => {
                    self.refused(refusal.label());
                    tracing::debug!(reason = refusal.label(), path = %request.uri().path(), "webtransport request refused");
                    respond(&mut stream, refusal.status()).await;
                }
            }
        }
        quic.close(VarInt::from_u32(0x0100), b"too many refused requests");
        None
    }

    /// Accepts the WebTransport session on the CONNECT stream. The CONNECT can overtake the
    /// client's SETTINGS (they travel on another stream), and h3-webtransport refuses a session
    /// while the peer's settings are unknown: they are read first.
    async fn session(
        &self,
        quic: &quinn::Connection,
        mut h3: h3::server::Connection<H3Conn, Bytes>,
        request: Request<()>,
        mut stream: RequestStream,
    ) -> Option<WtSession> {
        match tokio::time::timeout_at(self.deadline, peer_settings(&mut h3)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                self.refused("wt_no_webtransport_settings");
                respond(&mut stream, StatusCode::BAD_REQUEST).await;
                return None;
            }
            Ok(Err(_)) | Err(_) => {
                self.refused("h3_setup");
                quic.close(VarInt::from_u32(0x010a), b"no SETTINGS in time");
                return None;
            }
        }
        let accept = WebTransportSession::accept(request, stream, h3);
        match tokio::time::timeout_at(self.deadline, accept).await {
            Ok(Ok(session)) => Some(session),
            Ok(Err(error)) => {
                tracing::debug!(%error, "webtransport session not accepted");
                self.refused("wt_accept");
                None
            }
            Err(_) => {
                self.timed_out(quic, b"no WebTransport session in time");
                None
            }
        }
    }

    /// The session's stream: the first bidirectional stream the client opens (a second CONNECT
    /// meanwhile is answered 429).
    async fn session_stream(
        &self,
        quic: &quinn::Connection,
        session: &WtSession,
    ) -> Option<h3_webtransport::stream::BidiStream<h3_quinn::BidiStream<Bytes>, Bytes>> {
        loop {
            match tokio::time::timeout_at(self.deadline, session.accept_bi()).await {
                Ok(Ok(Some(AcceptedBi::BidiStream(_, bidi)))) => return Some(bidi),
                Ok(Ok(Some(AcceptedBi::Request(_, mut other)))) => {
                    self.refused("wt_extra_session");
                    respond(&mut other, StatusCode::TOO_MANY_REQUESTS).await;
                }
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => {
                    self.timed_out(quic, b"no session stream in time");
                    return None;
                }
            }
        }
    }
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
