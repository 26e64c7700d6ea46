//! From a QUIC connection to a running session: the handshake, the client certificate's
//! identity, the WebTransport request (HTTP/3 SETTINGS and the CONNECT, read by
//! web-transport-quinn) and its token, the session and its stream; then the session runs, and
//! the connection is closed with the session's close code.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use web_transport_quinn::proto::{ConnectError as ProtoConnectError, ConnectRequest};
use web_transport_quinn::{ConnectError, Request, ServerError, Session};

use super::endpoint::CountGuard;
use super::stream::{DatagramPath, WtSink, WtSource};
use crate::auth::Principal;
use crate::context::NodeContext;
use crate::member::Transport;

/// WebTransport application error code of a reset extra stream (mapped into the HTTP/3 space on
/// the wire by web-transport-quinn, as the draft requires).
const STREAM_REFUSED: u32 = 1;

/// HTTP/3 error codes (RFC 9114 §8.1) the node closes a connection with before any session.
const H3_NO_ERROR: u32 = 0x0100;
const H3_SETTINGS_ERROR: u32 = 0x0109;
const H3_MISSING_SETTINGS: u32 = 0x010a;
const H3_MESSAGE_ERROR: u32 = 0x010e;

/// Why a CONNECT request was refused before any session existed.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NotFound,
    Unauthorized,
    AuthBusy,
    Draining,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::AuthBusy => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Refusal::NotFound => "wt_not_found",
            Refusal::Unauthorized => "wt_unauthorized",
            Refusal::AuthBusy => "wt_auth_busy",
            Refusal::Draining => "draining",
        }
    }
}

/// The token of a CONNECT request: `?token=` in the query, else `Authorization: Bearer`.
fn request_token(req: &ConnectRequest) -> Option<String> {
    let token = req
        .url
        .query_pairs()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    if token.is_some() {
        return token;
    }
    req.headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
}

/// Checks a CONNECT request (web-transport-quinn has checked that it is an extended CONNECT
/// for WebTransport); `Ok` carries the principal of the token it presented (`None`: no token,
/// the Connect frame may carry one), exactly as a WebSocket upgrade is checked. The token check
/// (in a mesh, a round trip to the shared token-id store) stays within the establishing's
/// `deadline`; a check cut off by it is refused as retryable.
async fn check_request(
    ctx: &NodeContext,
    req: &ConnectRequest,
    certified: Option<&Principal>,
    deadline: tokio::time::Instant,
) -> Result<Option<Principal>, Refusal> {
    if ctx.is_draining() {
        return Err(Refusal::Draining);
    }
    if req.url.path() != ctx.config.webtransport.path {
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

/// Longest the connection task waits for a closed session's connection to end (the library's
/// own bound is a few round trips, at least 100 ms).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Longest a refusal response may take to write, and then to be read: the connection is closed
/// once the client has closed it or after this.
const RESPOND_TIMEOUT: Duration = Duration::from_secs(2);

/// One QUIC connection: [`establish`] (handshake, the CONNECT check, the session stream), then
/// the session. The establishing runs boxed: it is large and runs once, and what stays for the
/// connection's life is only the session's own state. A plain function, not an `async fn`, so
/// nothing is held twice.
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
            // A CLOSE_WEBTRANSPORT_SESSION capsule with the code and reason (what a browser's
            // `WebTransport.closed` reports), then the QUIC connection is closed with the code
            // mapped into the HTTP/3 space once the client has closed it or after a few round
            // trips. A no-op when the client closed the session first. web-transport-quinn's
            // tasks (this close, and the CONNECT-stream reader) are spawned on the runtime
            // outside the node's tracker; both end with the connection, which the drain's
            // closing of the endpoints ends at the latest.
            session.close(u32::from(code), reason.as_bytes());
            let _ = tokio::time::timeout(CLOSE_WAIT, session.closed()).await;
        },
        span,
    )
}

/// A connection with an accepted WebTransport session, and the session ready to run.
struct Established<R> {
    session: Arc<Session>,
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
    let request = steps.request(&quic).await?;
    let (request, authenticated) = steps.check(&quic, request, certified).await?;
    let session = Arc::new(steps.session(&quic, request).await?);
    let (send, recv) = steps.session_stream(&quic, &session).await?;
    // Established: the connection no longer counts as handshaking.
    drop(guard);
    let close = Arc::new(Mutex::new(None));
    let datagrams = DatagramPath::new(session.clone(), ctx.metrics.clone());
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
        close,
        run,
    })
}

/// The steps of establishing a session, each under the connection's one handshake deadline
/// (a refusal's answer, once the request was checked, has its own bound: `RESPOND_TIMEOUT`).
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
        quic.close(VarInt::from_u32(H3_NO_ERROR), why);
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
                    VarInt::from_u32(H3_NO_ERROR),
                    b"client certificate names no configured service",
                );
                None
            }
        }
    }

    /// The HTTP/3 SETTINGS exchange and the CONNECT request, read by web-transport-quinn
    /// (nothing is answered yet). One request per connection: the first bidirectional stream.
    /// What it refuses cannot be answered with a status (web-transport-quinn has dropped the
    /// stream), so the connection is closed with an HTTP/3 error code.
    async fn request(&self, quic: &quinn::Connection) -> Option<Request> {
        let error =
            match tokio::time::timeout_at(self.deadline, Request::accept(quic.clone())).await {
                Ok(Ok(request)) => return Some(request),
                Ok(Err(error)) => error,
                Err(_) => {
                    self.timed_out(quic, b"no WebTransport session in time");
                    return None;
                }
            };
        tracing::debug!(%error, detail = ?error, "no WebTransport request");
        // web-transport-quinn does not export its settings error type: the variant's name (read
        // once, here) tells a peer without WebTransport from a broken SETTINGS or a peer gone.
        let settings_variant = match &error {
            ServerError::SettingsError(e) => {
                let name = format!("{e:?}");
                name.split(['(', ' '])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            }
            _ => String::new(),
        };
        let (reason, code, why): (_, _, &[u8]) = match &error {
            ServerError::SettingsError(_) => match settings_variant.as_str() {
                "WebTransportUnsupported" => (
                    "wt_no_webtransport_settings",
                    H3_SETTINGS_ERROR,
                    b"WebTransport and datagrams are not enabled in SETTINGS",
                ),
                // The connection broke during the exchange: the peer went away.
                "ConnectionError" | "ReadError" | "WriteError" => return None,
                _ => ("h3_setup", H3_MISSING_SETTINGS, b"no valid SETTINGS"),
            },
            // The request stream ended or broke before a whole request: the peer went away.
            ServerError::ConnectError(ConnectError::ProtoError(
                ProtoConnectError::UnexpectedEnd | ProtoConnectError::Io(_),
            )) => return None,
            ServerError::ConnectError(ConnectError::ProtoError(_)) => (
                "wt_not_connect",
                H3_MESSAGE_ERROR,
                b"not a WebTransport CONNECT request",
            ),
            // The peer went away: nothing to refuse.
            _ => return None,
        };
        self.refused(reason);
        quic.close(VarInt::from_u32(code), why);
        None
    }

    /// Checks the request; a refused one is answered with its status, and the connection is
    /// closed once the client has read it (it closes the connection) or after a bound.
    async fn check(
        &self,
        quic: &quinn::Connection,
        request: Request,
        certified: Option<Principal>,
    ) -> Option<(Request, Option<Principal>)> {
        let refusal =
            match check_request(self.ctx, &request, certified.as_ref(), self.deadline).await {
                Ok(authenticated) => return Some((request, authenticated)),
                Err(refusal) => refusal,
            };
        self.refused(refusal.label());
        tracing::debug!(reason = refusal.label(), path = %request.url.path(), "webtransport request refused");
        // Bounded: a peer that grants no stream credit, or never closes, must not hold this
        // task (and its connection slot) for long.
        let _ = tokio::time::timeout(RESPOND_TIMEOUT, request.reject(refusal.status())).await;
        let _ = tokio::time::timeout(RESPOND_TIMEOUT, quic.closed()).await;
        quic.close(VarInt::from_u32(H3_NO_ERROR), b"request refused");
        None
    }

    /// Answers 200 and opens the session. From here web-transport-quinn reads the CONNECT
    /// stream: when the client closes the session (a CLOSE_WEBTRANSPORT_SESSION capsule, or FIN)
    /// it closes the QUIC connection, which ends the session's stream and so the session.
    async fn session(&self, quic: &quinn::Connection, request: Request) -> Option<Session> {
        match tokio::time::timeout_at(self.deadline, request.ok()).await {
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

    /// The session's stream: the first bidirectional WebTransport stream the client opens.
    async fn session_stream(
        &self,
        quic: &quinn::Connection,
        session: &Session,
    ) -> Option<(
        web_transport_quinn::SendStream,
        web_transport_quinn::RecvStream,
    )> {
        match tokio::time::timeout_at(self.deadline, session.accept_bi()).await {
            Ok(Ok(bidi)) => Some(bidi),
            Ok(Err(error)) => {
                tracing::debug!(%error, "no session stream");
                None
            }
            Err(_) => {
                self.timed_out(quic, b"no session stream in time");
                None
            }
        }
    }
}

/// Resets every bidirectional stream after the session's first; never completes on its own (the
/// session's end ends it). Streams that are not WebTransport streams of this session (a second
/// CONNECT, say) never get here: web-transport-quinn drops them as it reads their header.
async fn refuse_extra_streams(ctx: &NodeContext, session: &Session) {
    while let Ok((mut send, mut recv)) = session.accept_bi().await {
        ctx.metrics.webtransport_streams_refused.inc();
        tracing::debug!("extra bidirectional stream reset");
        let _ = send.reset(STREAM_REFUSED);
        let _ = recv.stop(STREAM_REFUSED);
    }
    std::future::pending::<()>().await;
}
