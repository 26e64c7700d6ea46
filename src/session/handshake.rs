//! The start and the end of a connection: the Connect frame and its authentication, a refusal
//! before any session exists, and the linger after the close.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::io::{FrameSink, FrameSource, Inbound, TransportError};
use super::pipeline::Pipeline;
use super::reader::Session;
use crate::auth::Principal;
use crate::context::NodeContext;
use crate::limits::SessionBudget;
use crate::member::{CloseReason, Transport};
use crate::proto::{self, ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame};
use crate::telemetry::{KeyValue, Span, SpanKind, Trace, attr};

/// Time allowed for the last writes of a refusal (the Error frame, the close frame).
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closed session keeps reading for the peer's close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Waits for the Connect frame and authenticates it. On success the session exists: its handle
/// is registered nowhere yet, and `Connected` is already queued. With telemetry on, what
/// follows the Connect frame is a `session.connect` span, returned open: the session ends it
/// once `Connected` goes out (after its implicit joins).
pub(super) async fn handshake<S: FrameSource, K: FrameSink>(
    ctx: &Arc<NodeContext>,
    transport: Transport,
    peer: SocketAddr,
    authenticated: Option<Principal>,
    source: &mut S,
    sink: &mut K,
) -> Option<(Session, Span)> {
    let deadline = tokio::time::Instant::now() + ctx.config.handshake_timeout();
    let (request_id, connect) = loop {
        let inbound = tokio::select! {
            r = tokio::time::timeout_at(deadline, source.recv()) => r,
            _ = ctx.shutdown.cancelled() => {
                refuse(ctx, sink, CloseReason::GoingAway, None).await;
                return None;
            }
        };
        let must = "the first frame must be Connect";
        let (reason, error) = match inbound {
            Err(_) => (CloseReason::HandshakeTimeout, None),
            Ok(Ok(Inbound::Activity | Inbound::Datagram(_))) => continue,
            Ok(Ok(Inbound::Closed)) => return None,
            Ok(Ok(Inbound::Frame(bytes))) => match ClientFrame::decode_bytes(bytes) {
                Ok(ClientFrame {
                    request_id,
                    kind: Some(client_frame::Kind::Connect(c)),
                }) => break (request_id, c),
                Ok(frame) => (
                    CloseReason::ProtocolViolation,
                    Some((frame.request_id, ErrorCode::UnexpectedFrame, must)),
                ),
                Err(_) => (
                    CloseReason::ProtocolViolation,
                    Some((0, ErrorCode::BadFrame, must)),
                ),
            },
            Ok(Ok(Inbound::Text)) => (
                CloseReason::ProtocolViolation,
                Some((0, ErrorCode::TextFrame, must)),
            ),
            Ok(Err(error)) => (error.into(), None),
        };
        refuse(ctx, sink, reason, error).await;
        return None;
    };

    let mut span = ctx.telemetry.span(
        "session.connect",
        SpanKind::Server,
        &Trace::default(),
        || {
            [
                KeyValue::new(attr::TRANSPORT, transport.label()),
                KeyValue::new(attr::CLIENT_ADDRESS, peer.ip().to_string()),
            ]
        },
    );
    if !connect.device_id.is_empty() && !crate::ids::is_valid_device_id(&connect.device_id) {
        span.fail(&crate::ids::DEVICE_ID_RULE);
        let reason = CloseReason::ProtocolViolation;
        let error = Some((request_id, ErrorCode::BadFrame, crate::ids::DEVICE_ID_RULE));
        refuse(ctx, sink, reason, error).await;
        return None;
    }

    let key = ctx.next_session_key();
    // A token that came with the upgrade was checked there; otherwise Connect carries it.
    let principal = match authenticated {
        Some(principal) => principal,
        None => match ctx.authenticate(&connect.token).await {
            Ok(principal) => principal,
            Err(error) => {
                span.fail(&error);
                let reason = CloseReason::Unauthorized(error.to_string());
                let message = error.to_string();
                refuse(
                    ctx,
                    sink,
                    reason,
                    Some((request_id, error.code(), &message)),
                )
                .await;
                return None;
            }
        },
    };

    let user = principal.user.clone();
    let handle = ctx.new_member(key, user, transport, peer, connect.client_name);
    span.record(|| {
        [
            KeyValue::new(attr::USER, handle.user.to_string()),
            KeyValue::new(attr::SESSION, handle.id.to_string()),
        ]
    });
    if let Some(path) = sink.datagrams() {
        handle.set_datagrams(path);
    }
    let config = &ctx.config.session;
    handle.push_frame(&ServerFrame::reply(
        request_id,
        server_frame::Kind::Connected(proto::Connected {
            session_id: handle.id.to_string(),
            node_id: ctx.node_id.to_string(),
            region: ctx.config.node.region.clone(),
            heartbeat_interval_ms: config.heartbeat_interval_ms as u32,
            idle_timeout_ms: config.idle_timeout_ms as u32,
            limits: Some(proto::Limits {
                max_frame_bytes: config.max_frame_bytes as u32,
                max_rooms: config.max_rooms as u32,
                max_room_name_bytes: ctx.config.rooms.max_name_bytes as u32,
                send_queue_frames: config.send_queue_frames as u32,
                send_queue_bytes: config.send_queue_bytes as u32,
                max_violations: config.max_violations,
                frames_per_second: ctx.config.limits.session_frames_per_second,
                bytes_per_second: ctx.config.limits.session_bytes_per_second,
            }),
            user_id: handle.user.to_string(),
            token_expires_at_ms: principal.expires_at.map_or(0, |s| s.saturating_mul(1000)),
        }),
    ));
    let session = Session {
        ctx: ctx.clone(),
        budget: SessionBudget::new(&ctx.config.limits),
        handle,
        rooms: HashSet::new(),
        violations: 0,
        permissions: principal.permissions,
        info: principal.info,
        expires_at: principal.expires_at,
        warned: false,
        rearm: false,
        publishes: Pipeline::default(),
        resume: connect
            .resume
            .map(|resume| (request_id, resume))
            .filter(|(_, resume)| !resume.rooms.is_empty()),
        connect_request_id: request_id,
        device: (!connect.device_id.is_empty()).then_some(connect.device_id),
        user_room_since: None,
    };
    Some((session, span))
}

/// Refuses a connection that never became a session: an optional Error frame, then the close.
async fn refuse<K: FrameSink>(
    ctx: &NodeContext,
    sink: &mut K,
    reason: CloseReason,
    error: Option<(u64, ErrorCode, &str)>,
) {
    ctx.metrics
        .connections_refused
        .get_or_create(&[("reason", reason.label())])
        .inc();
    tracing::debug!(reason = reason.label(), "session refused");
    if let Some((request_id, code, message)) = error {
        count_error(ctx, code);
        let frame = ServerFrame::error(request_id, code, message);
        let _ = timeout(
            CLOSE_WRITE_TIMEOUT,
            sink.send_batch(&[frame.encode_shared()]),
        )
        .await;
    }
    let _ = timeout(
        CLOSE_WRITE_TIMEOUT,
        sink.close(reason.code() as u16, &reason.text()),
    )
    .await;
}

pub(super) fn count_error(ctx: &NodeContext, code: ErrorCode) {
    ctx.metrics
        .errors
        .get_or_create(&[("code", code.label())])
        .inc();
}

/// Reads until the peer answers our close frame, or a short linger passes: dropping the socket
/// with the peer's last frames (pongs) unread would reset the connection, and a reset can discard
/// the close frame before the peer read it.
pub(super) async fn linger<S: FrameSource>(source: &mut S) {
    let _ = timeout(CLOSE_LINGER, async {
        // After a framing error tungstenite may keep reporting errors while input remains; read
        // on (bounded) so the socket is not closed with unread data, which would reset it.
        let mut errors = 0;
        loop {
            match source.recv().await {
                Ok(Inbound::Closed) | Err(TransportError::Io(_)) => break,
                Ok(_) => {}
                Err(_) => {
                    errors += 1;
                    if errors > 64 {
                        break;
                    }
                }
            }
        }
    })
    .await;
}
