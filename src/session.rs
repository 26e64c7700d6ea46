//! One client connection's life, independent of its transport.
//!
//! Life cycle: **connecting** (the transport is up; the first frame must be `Connect` within the
//! handshake timeout) → **authenticated** (`Connected` sent; the writer task runs) → **closing**
//! (a [`CloseReason`] is set: by the peer, an error, the slow-consumer policy, an operator or the
//! drain) → **closed** (memberships dropped, close code sent, tasks ended).
//!
//! Two tasks per session: the reader (this module's [`run`], on the connection's task) handles
//! inbound frames; the writer drains the bounded send queue into the transport, coalescing every
//! frame waiting in the queue into one write, and sends heartbeats.
//!
//! Slow-consumer policy: the send queue is bounded in frames (`send_queue_frames`) and bytes
//! (`send_queue_bytes`). Pushing never waits; when a push would exceed either bound the session is
//! closed with 4001 and its queue dropped, so one stuck client costs at most its bound and never
//! stalls the room or the other members.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{MissedTickBehavior, timeout};

use crate::auth::{AuthError, Permissions, Principal};
use crate::cluster::{BusError, Publication};
use crate::limits::{Admit, SessionBudget};
use crate::node::NodeContext;
use crate::proto::{
    self, ClientFrame, CloseCode, ErrorCode, ServerFrame, client_frame, server_frame,
};
use crate::room::{RoomName, RoomNameError};
use crate::transport::webtransport::{DatagramOutcome, DatagramPath};
use crate::transport::{FrameSink, FrameSource, Inbound, Transport, TransportError};

/// Frames taken from the queue per write at most; bounds the writer's batch buffer.
const MAX_BATCH: usize = 256;
/// Time allowed for the last writes (queued frames on a graceful close, the close frame).
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closed session keeps reading for the peer's close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Longest client message id, in bytes: the owner remembers ids for de-duplication, so they
/// must stay small.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;
/// Longest user id, in bytes (it becomes part of the room name `$user.<id>`).
pub const MAX_USER_ID_BYTES: usize = 64;

/// Why a session ends. Each reason has one close code (documented in docs/PROTOCOL.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or its connection went away.
    ClientClosed,
    /// The node is draining or shutting down (after a GoAway).
    GoingAway,
    /// WebSocket framing error.
    ProtocolError(String),
    InvalidUtf8,
    MessageTooBig,
    /// `max_violations` bad frames.
    ProtocolViolation,
    SlowConsumer,
    IdleTimeout,
    HandshakeTimeout,
    Unauthorized(String),
    /// An operator disconnected the session through the HTTP API.
    Disconnected,
    /// Writing to the connection failed.
    WriteFailed,
    /// The token expired without a Refresh.
    TokenExpired,
    /// Inbound rate budget exceeded for too long.
    RateLimited,
}

impl CloseReason {
    pub fn code(&self) -> CloseCode {
        match self {
            CloseReason::ClientClosed => CloseCode::Normal,
            CloseReason::GoingAway => CloseCode::GoingAway,
            CloseReason::ProtocolError(_) => CloseCode::ProtocolError,
            CloseReason::InvalidUtf8 => CloseCode::InvalidData,
            CloseReason::MessageTooBig => CloseCode::MessageTooBig,
            CloseReason::ProtocolViolation => CloseCode::ProtocolViolation,
            CloseReason::SlowConsumer => CloseCode::SlowConsumer,
            CloseReason::IdleTimeout => CloseCode::IdleTimeout,
            CloseReason::HandshakeTimeout => CloseCode::HandshakeTimeout,
            CloseReason::Unauthorized(_) => CloseCode::Unauthorized,
            CloseReason::Disconnected => CloseCode::Disconnected,
            CloseReason::WriteFailed => CloseCode::InternalError,
            CloseReason::TokenExpired => CloseCode::TokenExpired,
            CloseReason::RateLimited => CloseCode::RateLimited,
        }
    }

    /// Metrics label (`roomwire_sessions_closed_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::GoingAway => "going_away",
            CloseReason::ProtocolError(_) => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::ProtocolViolation => "protocol_violation",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::Unauthorized(_) => "unauthorized",
            CloseReason::Disconnected => "disconnected",
            CloseReason::WriteFailed => "write_failed",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RateLimited => "rate_limited",
        }
    }

    /// The close frame's reason text (at most 123 bytes by RFC 6455).
    pub fn text(&self) -> String {
        let text = match self {
            CloseReason::ClientClosed => "bye".to_string(),
            CloseReason::GoingAway => "node going away, reconnect".to_string(),
            CloseReason::ProtocolError(e) => format!("protocol error: {e}"),
            CloseReason::InvalidUtf8 => "invalid utf-8".to_string(),
            CloseReason::MessageTooBig => "message too big".to_string(),
            CloseReason::ProtocolViolation => "too many protocol violations".to_string(),
            CloseReason::SlowConsumer => "slow consumer: send queue full".to_string(),
            CloseReason::IdleTimeout => "idle timeout".to_string(),
            CloseReason::HandshakeTimeout => "no Connect frame in time".to_string(),
            CloseReason::Unauthorized(e) => format!("unauthorized: {e}"),
            CloseReason::Disconnected => "disconnected by server".to_string(),
            CloseReason::WriteFailed => "write failed".to_string(),
            CloseReason::TokenExpired => "token expired".to_string(),
            CloseReason::RateLimited => "rate limit exceeded".to_string(),
        };
        truncate_utf8(text, 123)
    }

    /// Whether frames already queued are written before the close frame. A slow consumer's queue
    /// is dropped (it is the problem); otherwise what was accepted is delivered.
    fn flushes_queue(&self) -> bool {
        !matches!(
            self,
            CloseReason::SlowConsumer | CloseReason::WriteFailed | CloseReason::ClientClosed
        )
    }

    /// Peer-caused reasons log at debug; the node's own at info.
    fn peer_caused(&self) -> bool {
        !matches!(
            self,
            CloseReason::GoingAway | CloseReason::Disconnected | CloseReason::WriteFailed
        )
    }
}

impl From<TransportError> for CloseReason {
    fn from(error: TransportError) -> Self {
        match error {
            TransportError::TooBig { .. } => CloseReason::MessageTooBig,
            TransportError::InvalidUtf8 => CloseReason::InvalidUtf8,
            TransportError::Protocol(e) => CloseReason::ProtocolError(e),
            TransportError::Io(_) => CloseReason::ClientClosed,
        }
    }
}

fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Session life-cycle states, as the admin API reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Authenticated = 1,
    Closing = 2,
    Closed = 3,
}

/// The signal that a session is closing, for its two tasks. Lock-free on every path: a flag and
/// one waker per waiting task. (A `CancellationToken` takes a mutex on every poll of its wait
/// future; polled in the reader's and writer's select loops it cost ~5% of a fan-out node's CPU
/// under perf.)
#[derive(Default)]
struct CloseSignal {
    fired: AtomicBool,
    reader: AtomicWaker,
    writer: AtomicWaker,
}

#[derive(Clone, Copy)]
enum Waiter {
    Reader,
    Writer,
}

impl CloseSignal {
    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.reader.wake();
        self.writer.wake();
    }

    fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves once the signal fired. Each waiter kind has at most one waiting future, polled by
    /// one task only (the session's reader or writer), whose waker never changes: it registers
    /// once, and every later poll is a single atomic load.
    fn wait(&self, who: Waiter) -> impl Future<Output = ()> + '_ {
        let mut registered = false;
        std::future::poll_fn(move |cx| {
            if self.is_fired() {
                return Poll::Ready(());
            }
            if !registered {
                registered = true;
                match who {
                    Waiter::Reader => self.reader.register(cx.waker()),
                    Waiter::Writer => self.writer.register(cx.waker()),
                }
                // Checked again after registering, so a fire in between is not missed.
                if self.is_fired() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
    }
}

/// The shared face of a live session: what fan-out pushes into and what operators close.
pub struct SessionHandle {
    /// Numeric key, unique on this node (membership tables).
    pub key: u64,
    /// Printable id, unique in the cluster: `<node id>:<key in hex>`.
    pub id: Arc<str>,
    pub user: Arc<str>,
    pub transport: Transport,
    pub peer: SocketAddr,
    pub client_name: String,
    outbox: mpsc::Sender<Bytes>,
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    state: AtomicU8,
    closing: CloseSignal,
    reason: OnceLock<CloseReason>,
    /// Set for WebTransport sessions: unreliable frames go out as datagrams.
    datagrams: OnceLock<DatagramPath>,
    ctx: Arc<NodeContext>,
}

/// What became of an unreliable frame pushed to one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreliableOutcome {
    /// Into the send queue (no datagram path: WebSocket).
    Queued,
    /// Sent as a datagram.
    Datagram,
    /// Not sent (datagram buffer full, session closing); unreliable frames may be lost.
    Dropped,
    /// Larger than this session's datagram limit (`max` bytes of frame).
    TooLarge { max: usize },
}

impl SessionHandle {
    /// A new authenticated session and the receiving end of its send queue (what the writer
    /// drains). Benchmarks use it to stand up sessions without sockets.
    pub fn new(
        ctx: &Arc<NodeContext>,
        key: u64,
        user: Arc<str>,
        transport: Transport,
        peer: SocketAddr,
        client_name: String,
    ) -> (Arc<Self>, mpsc::Receiver<Bytes>) {
        let config = &ctx.config.session;
        let (tx, rx) = mpsc::channel(config.send_queue_frames);
        let handle = Arc::new(SessionHandle {
            key,
            id: format!("{}:{key:x}", ctx.node_id).into(),
            user,
            transport,
            peer,
            client_name: truncate_utf8(client_name, 64),
            outbox: tx,
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: config.send_queue_bytes,
            state: AtomicU8::new(State::Authenticated as u8),
            closing: CloseSignal::default(),
            reason: OnceLock::new(),
            datagrams: OnceLock::new(),
            ctx: ctx.clone(),
        });
        (handle, rx)
    }

    /// Queues one encoded frame without waiting. Returns `false` when the frame was not queued:
    /// the session is closing, or this push found the queue full and cut the session off.
    /// Accounts the node-wide queued-bytes gauge; fan-out uses [`Self::push_uncounted`] and
    /// accounts once per fan-out instead.
    pub fn push(&self, frame: Bytes) -> bool {
        let len = frame.len() as i64;
        let queued = self.push_uncounted(frame);
        if queued {
            self.ctx.metrics.queued_bytes.inc_by(len);
        }
        queued
    }

    pub(crate) fn push_uncounted(&self, frame: Bytes) -> bool {
        // A plain atomic load: this runs once per member per fan-out.
        if self.state.load(Ordering::Relaxed) != State::Authenticated as u8 {
            return false;
        }
        let len = frame.len();
        let queued = self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.cut_off_slow();
            return false;
        }
        match self.outbox.try_send(frame) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.cut_off_slow();
                false
            }
            Err(TrySendError::Closed(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                false
            }
        }
    }

    /// Pushes an unreliable frame without waiting: as a datagram when the session has a datagram
    /// path, else into the send queue like any frame. The same encoded bytes go to every receiver.
    pub fn push_unreliable(&self, frame: &Bytes) -> UnreliableOutcome {
        match self.datagrams.get() {
            Some(path) => match path.send(frame) {
                DatagramOutcome::Sent => UnreliableOutcome::Datagram,
                DatagramOutcome::Dropped => UnreliableOutcome::Dropped,
                DatagramOutcome::TooLarge { max } => UnreliableOutcome::TooLarge { max },
            },
            None if self.push_uncounted(frame.clone()) => UnreliableOutcome::Queued,
            None => UnreliableOutcome::Dropped,
        }
    }

    pub fn push_frame(&self, frame: &ServerFrame) -> bool {
        self.push(frame.encode_shared())
    }

    fn cut_off_slow(&self) {
        if self.close(CloseReason::SlowConsumer) {
            self.ctx.metrics.slow_consumer_drops.inc();
        }
    }

    /// Starts closing the session; the first reason wins. Returns whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.state.store(State::Closing as u8, Ordering::Relaxed);
            self.closing.fire();
            if let Some(reason) = self.reason.get() {
                self.ctx
                    .metrics
                    .sessions_closed
                    .get_or_create(&[("reason", reason.label())])
                    .inc();
            }
        }
        first
    }

    /// Sends GoAway and closes with 1001 once what is queued has been written.
    pub fn go_away(&self, reason: &str) {
        let frame = ServerFrame::reply(
            0,
            server_frame::Kind::GoAway(proto::GoAway {
                reason: reason.to_string(),
                reconnect_after_ms: self.ctx.config.server.reconnect_after_ms,
                reconnect_url: String::new(),
            }),
        );
        self.push_frame(&frame);
        self.close(CloseReason::GoingAway);
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            1 => State::Authenticated,
            2 => State::Closing,
            _ => State::Closed,
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    fn reason(&self) -> CloseReason {
        self.reason
            .get()
            .cloned()
            .unwrap_or(CloseReason::ClientClosed)
    }

    /// Takes `len` bytes off the queue accounting once the writer has taken frames out.
    fn release(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        self.ctx.metrics.queued_bytes.dec_by(len as i64);
    }
}

/// A request refused; each variant is one wire error code.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Room(#[from] RoomNameError),
    #[error("a session may join at most {0} rooms")]
    TooManyRooms(usize),
    #[error("not a member of room {0}")]
    NotMember(RoomName),
    #[error("payload larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("unreliable message larger than a receiver's datagram limit ({0} bytes)")]
    DatagramTooLarge(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("not allowed to {0} room {1}")]
    Forbidden(&'static str, RoomName),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("client_msg_id longer than 128 bytes")]
    ClientMsgIdTooLong,
}

impl RequestError {
    fn code(&self) -> ErrorCode {
        match self {
            RequestError::Room(e) => e.code(),
            RequestError::TooManyRooms(_) => ErrorCode::TooManyRooms,
            RequestError::NotMember(_) => ErrorCode::NotMember,
            RequestError::PayloadTooLarge(_) | RequestError::DatagramTooLarge(_) => {
                ErrorCode::PayloadTooLarge
            }
            RequestError::Bus(e) => e.code(),
            RequestError::Forbidden(..) => ErrorCode::Forbidden,
            RequestError::Auth(e) => e.code(),
            RequestError::ClientMsgIdTooLong => ErrorCode::BadFrame,
        }
    }
}

/// Runs one session to its end on the current task: handshake, then the reader loop, then
/// teardown. The writer runs on a task of its own, spawned once the session is authenticated and
/// a member of its implicit rooms.
#[tracing::instrument(name = "session", skip_all, fields(session, user, peer = %peer, transport = transport.label()))]
pub async fn run<S: FrameSource, K: FrameSink>(
    ctx: Arc<NodeContext>,
    transport: Transport,
    peer: SocketAddr,
    authenticated: Option<Principal>,
    mut source: S,
    mut sink: K,
) {
    let handshake = handshake(&ctx, transport, peer, authenticated, &mut source, &mut sink).await;
    let Some((handle, rx, principal)) = handshake else {
        linger(&mut source).await;
        return;
    };
    let span = tracing::Span::current();
    span.record("session", &*handle.id);
    span.record("user", &*handle.user);
    tracing::debug!(client = %handle.client_name, "session authenticated");

    let metrics = &ctx.metrics;
    let transport_label = [("transport", transport.label())];
    metrics.sessions.get_or_create(&transport_label).inc();
    metrics
        .sessions_opened
        .get_or_create(&transport_label)
        .inc();

    let mut session = Session {
        ctx: ctx.clone(),
        handle: handle.clone(),
        rooms: HashSet::new(),
        violations: 0,
        budget: SessionBudget::new(&ctx.config.limits),
        permissions: principal.permissions,
        expires_at: principal.expires_at,
        warned: false,
        rearm: false,
    };
    let implicit = [RoomName::for_user(&handle.user), RoomName::broadcast()];
    for room in &implicit {
        // Membership of the user's and the broadcast room; no Joined frame is sent for them.
        if let Err(error) = ctx.bus.join(room, &handle, None).await {
            tracing::warn!(%error, %room, "implicit join failed");
        }
    }
    // A drain that started after this session was authenticated but before it joined $broadcast
    // did not see it; tell it now (the drain cancels before it takes its snapshot).
    if ctx.shutdown.is_cancelled() {
        handle.go_away("node shutting down");
    }
    // Only now is the queued `Connected` written, so a client that has it is a member of its
    // implicit rooms and a message to its user published right after reaches it. (In a mesh the
    // owner of the user's room hands messages to its own members directly, never through NATS:
    // a publish there in that moment found no member here and was lost to the session.) What
    // was delivered meanwhile waits in the bounded queue behind `Connected`.
    let writer = tokio::spawn(write_loop(handle.clone(), rx, sink));
    session.read_loop(&mut source).await;

    // Teardown: no new pushes once memberships are gone; then let the writer finish.
    for room in session.rooms.iter().chain(&implicit) {
        ctx.bus.leave(room, &handle).await;
    }
    handle.close(CloseReason::ClientClosed);
    let _ = writer.await;
    linger(&mut source).await;
    handle.state.store(State::Closed as u8, Ordering::Relaxed);
    let reason = handle.reason();
    metrics.sessions.get_or_create(&transport_label).dec();
    if reason.peer_caused() {
        tracing::debug!(reason = reason.label(), "session closed");
    } else {
        tracing::info!(reason = reason.label(), "session closed");
    }
}

/// Waits for the Connect frame and authenticates it. On success the session exists: its handle
/// is registered nowhere yet, and `Connected` is already queued.
async fn handshake<S: FrameSource, K: FrameSink>(
    ctx: &Arc<NodeContext>,
    transport: Transport,
    peer: SocketAddr,
    authenticated: Option<Principal>,
    source: &mut S,
    sink: &mut K,
) -> Option<(Arc<SessionHandle>, mpsc::Receiver<Bytes>, Principal)> {
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

    let key = ctx.next_session_key();
    // A token that came with the upgrade was checked there; otherwise Connect carries it.
    let principal = match authenticated {
        Some(principal) => principal,
        None => match ctx.authenticate(&connect.token, key) {
            Ok(principal) => principal,
            Err(error) => {
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
    let (handle, rx) = SessionHandle::new(ctx, key, user, transport, peer, connect.client_name);
    if let Some(path) = sink.datagrams() {
        let _ = handle.datagrams.set(path);
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
    Some((handle, rx, principal))
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

fn count_error(ctx: &NodeContext, code: ErrorCode) {
    ctx.metrics
        .errors
        .get_or_create(&[("code", code.label())])
        .inc();
}

/// Reads until the peer answers our close frame, or a short linger passes: dropping the socket
/// with the peer's last frames (pongs) unread would reset the connection, and a reset can discard
/// the close frame before the peer read it.
async fn linger<S: FrameSource>(source: &mut S) {
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

/// What a user id may be, for error messages.
pub const USER_ID_RULE: &str = "user id must be 1-64 letters, digits or _-:@=";

/// User ids become one segment of the room name `$user.<id>`.
pub fn is_valid_user_id(user: &str) -> bool {
    user.len() <= MAX_USER_ID_BYTES && crate::room::is_name_segment(user)
}

/// An inbound event after decoding.
enum Decoded {
    Activity,
    Text,
    Frame(ClientFrame),
    Undecodable(prost::DecodeError),
    /// A WebTransport datagram, decoded by [`Session::datagram`].
    Datagram(Bytes),
}

/// The reader side's state.
struct Session {
    ctx: Arc<NodeContext>,
    handle: Arc<SessionHandle>,
    /// Rooms joined explicitly (the implicit user and broadcast rooms are not counted).
    rooms: HashSet<RoomName>,
    violations: u32,
    budget: SessionBudget,
    permissions: Permissions,
    /// Unix seconds when the token expires (None: never).
    expires_at: Option<u64>,
    /// Whether TokenExpiring was sent for the current token.
    warned: bool,
    /// Set by a Refresh: the expiry timer must be re-armed.
    rearm: bool,
}

impl Session {
    async fn read_loop<S: FrameSource>(&mut self, source: &mut S) {
        let idle = self.ctx.config.idle_timeout();
        let handle = self.handle.clone();
        let cancelled = handle.closing.wait(Waiter::Reader);
        tokio::pin!(cancelled);
        let token_timer = tokio::time::sleep_until(self.token_deadline());
        tokio::pin!(token_timer);
        loop {
            let inbound = tokio::select! {
                biased;
                _ = &mut cancelled => return,
                _ = &mut token_timer => {
                    self.on_token_timer();
                    token_timer.as_mut().reset(self.token_deadline());
                    continue;
                }
                r = timeout(idle, source.recv()) => r,
            };
            let inbound = match inbound {
                Err(_) => {
                    self.handle.close(CloseReason::IdleTimeout);
                    return;
                }
                Ok(Err(error)) => {
                    self.handle.close(error.into());
                    return;
                }
                Ok(Ok(inbound)) => inbound,
            };
            // Decoding slices the buffer (no copy), so it comes before the budget: a refused
            // request is answered with its own request id.
            let (decoded, len) = match inbound {
                Inbound::Closed => {
                    self.handle.close(CloseReason::ClientClosed);
                    return;
                }
                Inbound::Activity => (Decoded::Activity, 1),
                Inbound::Text => (Decoded::Text, 1),
                Inbound::Datagram(bytes) => {
                    let len = bytes.len();
                    (Decoded::Datagram(bytes), len)
                }
                Inbound::Frame(bytes) => {
                    let len = bytes.len();
                    (
                        ClientFrame::decode_bytes(bytes)
                            .map_or_else(Decoded::Undecodable, Decoded::Frame),
                        len,
                    )
                }
            };
            let request_id = match &decoded {
                Decoded::Frame(frame) => frame.request_id,
                _ => 0,
            };
            // Every inbound frame is charged, pings included: this is also the ping-flood limit.
            match self.budget.admit(len) {
                Admit::Accept => {}
                Admit::Refuse => {
                    self.count_in("rate_limited");
                    self.send_error(
                        request_id,
                        ErrorCode::RateLimited,
                        "rate limit exceeded; frame dropped",
                    );
                    continue;
                }
                Admit::Close => {
                    self.handle.close(CloseReason::RateLimited);
                    return;
                }
            }
            match decoded {
                Decoded::Activity => {}
                Decoded::Datagram(bytes) => self.datagram(bytes).await,
                Decoded::Text => {
                    self.count_in("text");
                    self.violation(
                        0,
                        ErrorCode::TextFrame,
                        "text messages are not part of the protocol; send binary ClientFrames",
                    );
                }
                Decoded::Frame(frame) => {
                    self.count_in(frame.kind_name());
                    self.handle_frame(frame).await;
                }
                Decoded::Undecodable(error) => {
                    self.count_in("undecodable");
                    tracing::debug!(%error, "undecodable frame");
                    self.violation(0, ErrorCode::BadFrame, "not a decodable ClientFrame");
                }
            }
            if std::mem::take(&mut self.rearm) {
                token_timer.as_mut().reset(self.token_deadline());
            }
        }
    }

    /// A datagram from the client: only an unreliable Publish is accepted this way; anything else
    /// is dropped and counted (datagrams may be lost, so there is no reply to a bad one).
    async fn datagram(&mut self, bytes: Bytes) {
        let received = &self.ctx.metrics.datagrams_received;
        match ClientFrame::decode_bytes(bytes) {
            Ok(ClientFrame {
                request_id,
                kind: Some(client_frame::Kind::Publish(publish)),
            }) if publish.unreliable => {
                received.get_or_create(&[("outcome", "publish")]).inc();
                if let Err(error) = self.publish(request_id, publish).await {
                    self.send_error(request_id, error.code(), &error.to_string());
                }
            }
            _ => {
                received.get_or_create(&[("outcome", "rejected")]).inc();
            }
        }
    }

    /// When the token timer should fire next: the warning, then the expiry.
    fn token_deadline(&self) -> tokio::time::Instant {
        // Capped so no configuration can overflow the Instant arithmetic.
        const FAR: u64 = 365 * 86_400 * 1000;
        let now = tokio::time::Instant::now();
        let Some(expires_at) = self.expires_at else {
            return now + Duration::from_millis(FAR);
        };
        let warning = self.ctx.config.auth.jwt.refresh_warning_s;
        let at_s = if self.warned {
            expires_at
        } else {
            expires_at.saturating_sub(warning)
        };
        now + Duration::from_millis(at_s.saturating_mul(1000).saturating_sub(now_ms()).min(FAR))
    }

    fn on_token_timer(&mut self) {
        let Some(expires_at) = self.expires_at else {
            return;
        };
        if self.warned || now_ms() / 1000 >= expires_at {
            self.handle.close(CloseReason::TokenExpired);
        } else {
            self.warned = true;
            self.handle.push_frame(&ServerFrame::reply(
                0,
                server_frame::Kind::TokenExpiring(proto::TokenExpiring {
                    expires_at_ms: expires_at.saturating_mul(1000),
                }),
            ));
        }
    }

    async fn refresh(&mut self, request_id: u64, token: &str) -> Result<(), RequestError> {
        // Only token sessions expire; a certificate (or development) session has nothing to
        // refresh, and a token must not graft an expiry or new permissions onto it.
        if self.expires_at.is_none() {
            return Err(RequestError::Auth(AuthError::Invalid(
                "this session was not opened with a token".into(),
            )));
        }
        let principal = self.ctx.refresh(token, &self.handle.user)?;
        self.permissions = principal.permissions;
        self.expires_at = principal.expires_at;
        // Rooms the new token no longer allows are left, each with a Left frame.
        let revoked: Vec<RoomName> = self
            .rooms
            .iter()
            .filter(|r| !self.permissions.may_join(r))
            .cloned()
            .collect();
        for room in revoked {
            self.rooms.remove(&room);
            self.ctx.bus.leave(&room, &self.handle).await;
            self.handle.push_frame(&ServerFrame::reply(
                0,
                server_frame::Kind::Left(proto::Left {
                    room: room.to_string(),
                }),
            ));
        }
        self.warned = false;
        self.rearm = true;
        self.handle.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Refreshed(proto::Refreshed {
                expires_at_ms: self.expires_at.map_or(0, |s| s.saturating_mul(1000)),
            }),
        ));
        Ok(())
    }

    fn count_in(&self, kind: &'static str) {
        self.ctx.metrics.frame_in(kind);
    }

    fn send_error(&self, request_id: u64, code: ErrorCode, message: &str) {
        self.ctx
            .metrics
            .errors
            .get_or_create(&[("code", code.label())])
            .inc();
        self.handle
            .push_frame(&ServerFrame::error(request_id, code, message));
    }

    /// A protocol violation: answered with an Error frame; too many close the session (4000).
    fn violation(&mut self, request_id: u64, code: ErrorCode, message: &str) {
        self.send_error(request_id, code, message);
        self.violations += 1;
        if self.violations >= self.ctx.config.session.max_violations {
            self.handle.close(CloseReason::ProtocolViolation);
        }
    }

    async fn handle_frame(&mut self, frame: ClientFrame) {
        use client_frame::Kind;
        let request_id = frame.request_id;
        let result = match frame.kind {
            Some(Kind::Join(join)) => self.join(request_id, &join.room).await,
            Some(Kind::Leave(leave)) => self.leave(request_id, &leave.room).await,
            Some(Kind::Publish(publish)) => self.publish(request_id, publish).await,
            Some(Kind::Refresh(refresh)) => self.refresh(request_id, &refresh.token).await,
            Some(Kind::Ping(ping)) => {
                self.handle.push_frame(&ServerFrame::reply(
                    request_id,
                    server_frame::Kind::Pong(proto::Pong { nonce: ping.nonce }),
                ));
                Ok(())
            }
            Some(Kind::Connect(_)) => {
                self.violation(request_id, ErrorCode::UnexpectedFrame, "already connected");
                Ok(())
            }
            None => {
                self.violation(request_id, ErrorCode::BadFrame, "frame has no kind");
                Ok(())
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "request refused");
            self.send_error(request_id, error.code(), &error.to_string());
        }
    }

    fn room_name(&self, name: &str) -> Result<RoomName, RequestError> {
        Ok(RoomName::parse_client(
            name,
            self.ctx.config.rooms.max_name_bytes,
        )?)
    }

    async fn join(&mut self, request_id: u64, name: &str) -> Result<(), RequestError> {
        let room = self.room_name(name)?;
        if !self.permissions.may_join(&room) {
            return Err(RequestError::Forbidden("join", room));
        }
        let max = self.ctx.config.session.max_rooms;
        if !self.rooms.contains(&room) && self.rooms.len() >= max {
            return Err(RequestError::TooManyRooms(max));
        }
        self.ctx
            .bus
            .join(&room, &self.handle, Some(request_id))
            .await?;
        self.rooms.insert(room);
        Ok(())
    }

    async fn leave(&mut self, request_id: u64, name: &str) -> Result<(), RequestError> {
        let room = self.room_name(name)?;
        if !self.rooms.remove(&room) {
            return Err(RequestError::NotMember(room));
        }
        self.ctx.bus.leave(&room, &self.handle).await;
        self.handle.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Left(proto::Left {
                room: room.to_string(),
            }),
        ));
        Ok(())
    }

    async fn publish(
        &mut self,
        request_id: u64,
        publish: proto::Publish,
    ) -> Result<(), RequestError> {
        let room = self.room_name(&publish.room)?;
        if publish.client_msg_id.len() > MAX_CLIENT_MSG_ID_BYTES {
            return Err(RequestError::ClientMsgIdTooLong);
        }
        if !self.permissions.may_publish(&room) {
            return Err(RequestError::Forbidden("publish", room));
        }
        // The transport already bounds the whole frame; this keeps the bound when a transport
        // allows larger frames (and documents it for the client).
        let max = self.ctx.config.session.max_frame_bytes;
        if publish.payload.len() > max {
            return Err(RequestError::PayloadTooLarge(max));
        }
        let publication = Publication {
            room,
            payload: publish.payload,
            publisher: self.handle.user.clone(),
            client_msg_id: publish.client_msg_id,
        };
        if publish.unreliable {
            let report = self.ctx.bus.publish_unreliable(publication).await;
            if let Some(max) = report.too_large {
                return Err(RequestError::DatagramTooLarge(max));
            }
            return Ok(());
        }
        let client_msg_id = publication.client_msg_id.clone();
        let room = publication.room.to_string();
        let sequenced = self.ctx.bus.publish(publication).await?;
        self.handle.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::PublishAck(proto::PublishAck {
                room,
                client_msg_id,
                epoch: sequenced.epoch,
                seq: sequenced.seq,
                duplicate: sequenced.duplicate,
            }),
        ));
        Ok(())
    }
}

/// The writer task: drains the send queue into the transport, one coalesced write per batch,
/// sends heartbeats, and writes the close frame when the session closes.
///
/// A batch in flight when the session starts closing is finished (within CLOSE_WRITE_TIMEOUT)
/// when the close reason keeps what was accepted, so the peer never sees a hole followed by later
/// frames; it is abandoned only for a slow consumer or a dead connection. A write that makes no
/// progress for `idle_timeout_ms` counts as a failed write.
async fn write_loop<K: FrameSink>(
    handle: Arc<SessionHandle>,
    mut rx: mpsc::Receiver<Bytes>,
    mut sink: K,
) {
    let ctx = handle.ctx.clone();
    let heartbeat = ctx.config.heartbeat_interval();
    let stall_limit = ctx.config.idle_timeout();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch: Vec<Bytes> = Vec::new();
    let cancelled = handle.closing.wait(Waiter::Writer);
    tokio::pin!(cancelled);
    // Whether everything taken from the queue so far reached the transport in order.
    let mut intact = true;
    loop {
        tokio::select! {
            biased;
            _ = &mut cancelled => break,
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    break;
                }
                let written = {
                    let send = timeout(stall_limit, sink.send_batch(&batch));
                    tokio::pin!(send);
                    tokio::select! {
                        r = &mut send => matches!(r, Ok(Ok(()))),
                        _ = &mut cancelled => {
                            if handle.reason().flushes_queue() {
                                matches!(timeout(CLOSE_WRITE_TIMEOUT, &mut send).await, Ok(Ok(Ok(()))))
                            } else {
                                false
                            }
                        }
                    }
                };
                account_written(&handle, &batch);
                batch.clear();
                if !written {
                    intact = false;
                    break;
                }
            }
            _ = ticker.tick() => {
                let sent = tokio::select! {
                    r = timeout(stall_limit, sink.heartbeat()) => matches!(r, Ok(Ok(()))),
                    _ = &mut cancelled => true,
                };
                if !sent {
                    intact = false;
                    break;
                }
            }
        }
    }
    if !intact {
        // No-op when a reason was already set (e.g. slow consumer); otherwise the write failed.
        handle.close(CloseReason::WriteFailed);
    }
    let reason = handle.reason();
    rx.close();
    if reason.flushes_queue() && intact {
        let mut rest = Vec::new();
        while let Ok(frame) = rx.try_recv() {
            rest.push(frame);
        }
        if !rest.is_empty() {
            let _ = timeout(CLOSE_WRITE_TIMEOUT, sink.send_batch(&rest)).await;
            account_written(&handle, &rest);
        }
    }
    // Whatever is left (a slow consumer's queue) is dropped, and its bytes released.
    let mut dropped = 0;
    while let Ok(frame) = rx.try_recv() {
        dropped += frame.len();
    }
    handle.release(dropped);
    if reason != CloseReason::WriteFailed {
        let _ = timeout(
            CLOSE_WRITE_TIMEOUT,
            sink.close(reason.code() as u16, &reason.text()),
        )
        .await;
    }
}

fn account_written(handle: &SessionHandle, batch: &[Bytes]) {
    let bytes: usize = batch.iter().map(Bytes::len).sum();
    handle.release(bytes);
    let metrics = &handle.ctx.metrics;
    metrics.frames_out.inc_by(batch.len() as u64);
    metrics.bytes_out.inc_by(bytes as u64);
    metrics.write_batches.inc();
}

/// Unix milliseconds of the node clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
