//! WebSocket adapter: the HTTP upgrade on `/ws` (done here with hyper and tokio-tungstenite, so
//! tungstenite is in the tree in one version only) and the [`FrameSource`]/[`FrameSink`] halves.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::context::{ConnPermit, NodeContext, PeerIdentity};
use crate::member::Transport;
use crate::proto::WS_SUBPROTOCOL;
use crate::session::{FrameSink, FrameSource, Inbound, TransportError};

type Io = TokioIo<hyper::upgrade::Upgraded>;

/// The peer address of an HTTP connection, put into each request's extensions by the acceptor.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The tungstenite limits derived from the session config: small eager read buffer, frame and
/// message caps at `max_frame_bytes` so an oversized message is refused from its header.
pub fn ws_config(ctx: &NodeContext) -> WebSocketConfig {
    let s = &ctx.config.session;
    WebSocketConfig::default()
        .read_buffer_size(s.ws_read_buffer_bytes)
        .write_buffer_size(s.ws_write_buffer_bytes)
        .max_write_buffer_size(s.ws_write_buffer_bytes + s.send_queue_bytes + s.max_frame_bytes)
        .max_message_size(Some(s.max_frame_bytes))
        .max_frame_size(Some(s.max_frame_bytes))
}

/// `GET /ws`: validates the upgrade request, answers 101 and hands the upgraded connection to a
/// session task (tracked for shutdown).
pub async fn upgrade(State(ctx): State<Arc<NodeContext>>, mut req: Request) -> Response {
    let refuse = |status: StatusCode, reason: &'static str, why: &str| {
        ctx.metrics
            .connections_refused
            .get_or_create(&[("reason", reason)])
            .inc();
        tracing::debug!(reason, why, "websocket upgrade refused");
        (status, format!("{}\n", why.trim_end())).into_response()
    };
    if ctx.is_draining() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is draining\n",
        );
    }
    // Through a trusted proxy (limits.trusted_proxies) the client's own address is limited, as
    // a direct client's is at accept, and is the session's peer; anyone else's header is ignored.
    let mut client_slot = None;
    let mut peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    if let Some(proxy) = peer.filter(|p| ctx.ip_gate.trusts(p.ip())) {
        let forwarded: Vec<&str> = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let client = ctx
            .ip_gate
            .client_address(proxy.ip(), Some(&forwarded.join(",")));
        match ctx.ip_gate.admit(client) {
            Ok(slot) => client_slot = Some(slot),
            Err(refusal) => {
                return refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    refusal.label(),
                    "too many connections from this address\n",
                );
            }
        }
        peer = Some(SocketAddr::new(client, 0));
    }
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "not_upgrade",
            "websocket upgrade required\n",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_version",
            "Sec-WebSocket-Version must be 13\n",
        );
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no_key",
            "Sec-WebSocket-Key missing\n",
        );
    };
    // A client that asks for subprotocols must ask for ours; one that asks for none is accepted
    // (command-line tools rarely set it) and speaks roomwire.v1 all the same.
    let protocols_offered = headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL);
    if protocols_offered && !has_token(header::SEC_WEBSOCKET_PROTOCOL, WS_SUBPROTOCOL) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "subprotocol",
            "subprotocol roomwire.v1 required\n",
        );
    }
    let accept = derive_accept_key(key.as_bytes());
    if !origin_allowed(&ctx.config.server.allowed_origins, headers) {
        return refuse(StatusCode::FORBIDDEN, "origin", "origin not allowed");
    }
    // A service's client certificate (mutual TLS) identifies it; otherwise a token in the
    // upgrade request is checked now, so a bad one never becomes a session.
    let certified = req.extensions().get::<PeerIdentity>().map(|p| p.0.clone());
    let authenticated = match upgrade_token(&req) {
        _ if certified.is_some() => certified,
        None => None,
        // In a mesh this waits for the shared token-id store (bounded by mesh.request_timeout_ms).
        Some(token) => match ctx.authenticate(&token).await {
            Ok(principal) => Some(principal),
            Err(error) => {
                let status = if error.retryable() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::UNAUTHORIZED
                };
                return refuse(status, "unauthorized", &error.to_string());
            }
        },
    };

    // The session holds the connection's permit from here on; the HTTP task that upgraded ends.
    let permit = req.extensions().get::<ConnPermit>().cloned();
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no_upgrade",
            "connection cannot upgrade\n",
        );
    };

    let config = ws_config(&ctx);
    let task_ctx = ctx.clone();
    ctx.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "websocket upgrade failed");
                return;
            }
        };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let (sink, source) = ws.split();
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let session = crate::session::run(
            task_ctx.clone(),
            Transport::WebSocket,
            peer,
            authenticated,
            WsSource { inner: source },
            WsSink { inner: sink },
        );
        // A task of its own, so what the upgrade needed is not kept for the session's life
        // (and `map`, not an `async` block, which would hold the session's future twice).
        task_ctx
            .tracker
            .spawn(session.map(move |()| drop((permit, client_slot))));
    });

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    if protocols_offered {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(WS_SUBPROTOCOL),
        );
    }
    response
}

/// Whether a browser's Origin may open a session: listed, `*` listed, or (empty list) the same
/// host as the request. No Origin header means no browser, which the allow-list does not concern.
fn origin_allowed(allowed: &[String], headers: &http::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
        return !host.is_empty() && origin_host.eq_ignore_ascii_case(host);
    }
    allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// The token of an upgrade request: `?token=` (browsers cannot set headers on a WebSocket) or
/// `Authorization: Bearer`.
fn upgrade_token(req: &Request) -> Option<String> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = match header.and_then(crate::auth::bearer) {
        Some(token) => Some(token.to_string()),
        None => {
            let query = req.uri().query()?;
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        }
    };
    // An empty token is no token: the Connect frame may still carry one.
    token.filter(|t| !t.is_empty())
}

pub struct WsSource {
    inner: SplitStream<WebSocketStream<Io>>,
}

pub struct WsSink {
    inner: SplitSink<WebSocketStream<Io>, Message>,
}

fn map_error(error: WsError) -> TransportError {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { max_size, .. }) => {
            TransportError::TooBig { max: max_size }
        }
        WsError::Capacity(other) => TransportError::Protocol(other.to_string()),
        WsError::Utf8(_) => TransportError::InvalidUtf8,
        WsError::Protocol(ProtocolError::InvalidCloseSequence) => {
            TransportError::Protocol("invalid close".into())
        }
        WsError::Protocol(p) => TransportError::Protocol(p.to_string()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => TransportError::Io("closed".into()),
        other => TransportError::Io(other.to_string()),
    }
}

impl FrameSource for WsSource {
    async fn recv(&mut self) -> Result<Inbound, TransportError> {
        match self.inner.next().await {
            None => Ok(Inbound::Closed),
            Some(Ok(Message::Binary(bytes))) => Ok(Inbound::Frame(bytes)),
            Some(Ok(Message::Text(_))) => Ok(Inbound::Text),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                Ok(Inbound::Activity)
            }
            Some(Ok(Message::Close(_))) => Ok(Inbound::Closed),
            Some(Err(error)) => Err(map_error(error)),
        }
    }
}

impl FrameSink for WsSink {
    async fn send_batch(&mut self, frames: &[Bytes]) -> Result<(), TransportError> {
        // `feed` only buffers (up to ws_write_buffer_bytes); the one `flush` writes the batch.
        for frame in frames {
            self.inner
                .feed(Message::Binary(frame.clone()))
                .await
                .map_err(map_error)?;
        }
        self.inner.flush().await.map_err(map_error)
    }

    async fn heartbeat(&mut self) -> Result<(), TransportError> {
        self.inner
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(map_error)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        let _ = self.inner.send(Message::Close(Some(frame))).await;
    }
}
