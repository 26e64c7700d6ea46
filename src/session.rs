//! One client connection's life, independent of its transport.
//!
//! Life cycle: **connecting** (the transport is up; the first frame must be `Connect` within the
//! handshake timeout) → **authenticated** (`Connected` sent; the writer task runs) → **closing**
//! (a [`CloseReason`] is set: by the peer, an error, the slow-consumer policy, an operator or the
//! drain) → **closed** (memberships dropped, close code sent, tasks ended).
//!
//! Two tasks per session: the reader (this module's [`run`], on the session's task) handles
//! inbound frames; the writer drains the bounded send queue into the transport, coalescing every
//! frame waiting in the queue into one write, and sends heartbeats. Publishes whose room is
//! owned by another node are sequenced on a third, short-lived task, one batch at a time, while
//! the reader goes on reading (bounded: see `MAX_UNSEQUENCED_PUBLISHES`).
//!
//! Slow-consumer policy: the send queue is bounded in frames (`send_queue_frames`) and bytes
//! (`send_queue_bytes`). Pushing never waits; when a push would exceed either bound the session is
//! closed with 4001 and its queue dropped, so one stuck client costs at most its bound and never
//! stalls the room or the other members.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::task::AtomicWaker;
use tokio::time::{MissedTickBehavior, timeout};

use crate::auth::{AuthError, Permissions, Principal};
use crate::clock::wall_ms as now_ms;
use crate::cluster::{BusError, Publication, Sequenced};
use crate::ids::{MAX_CLIENT_MSG_ID_BYTES, truncate_utf8};
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
/// Publishes a session may have accepted and not yet had sequenced, in count and payload bytes;
/// past either, the session stops reading until the bus catches up (TCP pushes back).
const MAX_UNSEQUENCED_PUBLISHES: usize = 256;
const MAX_UNSEQUENCED_BYTES: usize = 1024 * 1024;

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

/// A session's send queue: what fan-out pushes into and the writer drains.
///
/// A mutex around a `VecDeque` rather than a channel: an idle session's queue owns no allocation
/// (tokio's bounded mpsc allocates a 32-slot block and a cache-padded channel up front, ~1.5 KB,
/// a fifth of an idle session), both bounds (frames and bytes) are checked under the one lock a
/// push takes, and the writer takes a whole batch under one lock. Nobody holds the lock across
/// anything but a few memory operations.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Queue>,
    /// The writer task, woken by the push that finds the queue empty.
    writer: AtomicWaker,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Bytes accepted and not yet written: in `frames` or in the writer's batch.
    bytes: usize,
    /// Set by the writer as it ends; later pushes are refused.
    closed: bool,
}

/// Why a push was refused.
#[derive(Debug)]
enum PushRefused {
    /// Over the frame or byte bound: the slow-consumer policy applies.
    Full,
    /// The writer has ended.
    Closed,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("send queue lock poisoned")
    }

    fn push(&self, frame: Bytes, max_frames: usize, max_bytes: usize) -> Result<(), PushRefused> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(PushRefused::Closed);
        }
        if queue.frames.len() >= max_frames || queue.bytes + frame.len() > max_bytes {
            return Err(PushRefused::Full);
        }
        let was_empty = queue.frames.is_empty();
        queue.bytes += frame.len();
        queue.frames.push_back(frame);
        drop(queue);
        // Only the push that makes the queue non-empty wakes the writer: it takes every frame
        // waiting when it runs, and re-registers before it looks again.
        if was_empty {
            self.writer.wake();
        }
        Ok(())
    }

    /// Takes up to `max` waiting frames, oldest first. Usually the whole queue is taken, buffer
    /// and all, so an empty queue owns no memory: an idle session does not keep the buffer of
    /// its last burst.
    fn take(&self, max: usize) -> VecDeque<Bytes> {
        let mut queue = self.lock();
        if queue.frames.len() <= max {
            std::mem::take(&mut queue.frames)
        } else {
            queue.frames.drain(..max).collect()
        }
    }

    /// Resolves with the waiting frames (up to `max`) once there is at least one.
    fn ready(&self, max: usize) -> impl Future<Output = VecDeque<Bytes>> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before looking, so a push in between finds the waker.
            self.writer.register(cx.waker());
            let batch = self.take(max);
            if batch.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(batch)
            }
        })
    }

    /// Takes `bytes` off the accounting once written (or dropped).
    fn release(&self, bytes: usize) {
        let mut queue = self.lock();
        queue.bytes = queue.bytes.saturating_sub(bytes);
    }

    /// Refuses every later push and returns what is still waiting.
    fn close(&self) -> VecDeque<Bytes> {
        let mut queue = self.lock();
        queue.closed = true;
        std::mem::take(&mut queue.frames)
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
    outbox: Outbox,
    max_queued_frames: usize,
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
    /// A new authenticated session; its writer drains the send queue with [`Self::take_queued`].
    /// Benchmarks use it to stand up sessions without sockets.
    pub fn new(
        ctx: &Arc<NodeContext>,
        key: u64,
        user: Arc<str>,
        transport: Transport,
        peer: SocketAddr,
        client_name: String,
    ) -> Arc<Self> {
        let config = &ctx.config.session;
        Arc::new(SessionHandle {
            key,
            id: format!("{}:{key:x}", ctx.node_id).into(),
            user,
            transport,
            peer,
            client_name: truncate_utf8(client_name, 64),
            outbox: Outbox::default(),
            max_queued_frames: config.send_queue_frames,
            max_queued_bytes: config.send_queue_bytes,
            state: AtomicU8::new(State::Authenticated as u8),
            closing: CloseSignal::default(),
            reason: OnceLock::new(),
            datagrams: OnceLock::new(),
            ctx: ctx.clone(),
        })
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
        match self
            .outbox
            .push(frame, self.max_queued_frames, self.max_queued_bytes)
        {
            Ok(()) => true,
            Err(PushRefused::Full) => {
                self.cut_off_slow();
                false
            }
            Err(PushRefused::Closed) => false,
        }
    }

    /// Takes up to `max` queued frames, oldest first (what the writer does). Their bytes stay
    /// accounted until [`Self::written`] says they left.
    pub fn take_queued(&self, max: usize) -> VecDeque<Bytes> {
        self.outbox.take(max)
    }

    /// Takes frames that [`Self::take_queued`] handed out off the queue accounting.
    pub fn written<'a>(&self, frames: impl IntoIterator<Item = &'a Bytes>) {
        self.release(frames.into_iter().map(Bytes::len).sum());
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
        self.outbox.lock().bytes
    }

    fn reason(&self) -> CloseReason {
        self.reason
            .get()
            .cloned()
            .unwrap_or(CloseReason::ClientClosed)
    }

    /// Takes `len` bytes off the queue accounting once the writer wrote (or dropped) them.
    fn release(&self, len: usize) {
        self.outbox.release(len);
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

/// Runs one session to its end on the task that polls it: handshake, then the reader loop, then
/// teardown. The writer runs on a task of its own, spawned once the session is authenticated and
/// a member of its implicit rooms.
///
/// The span is attached by hand rather than with `#[tracing::instrument]`, whose wrapper future
/// keeps a second copy of every argument for the session's whole life.
pub fn run<S: FrameSource, K: FrameSink>(
    ctx: Arc<NodeContext>,
    transport: Transport,
    peer: SocketAddr,
    authenticated: Option<Principal>,
    source: S,
    sink: K,
) -> impl Future<Output = ()> + Send {
    let span = tracing::info_span!(
        "session",
        session = tracing::field::Empty,
        user = tracing::field::Empty,
        peer = %peer,
        transport = transport.label(),
    );
    tracing::Instrument::instrument(
        serve(ctx, transport, peer, authenticated, source, sink),
        span,
    )
}

/// The session's body. A plain function returning an `async move` block rather than an
/// `async fn`: an `async fn` keeps its arguments twice in its state (as captured and as moved
/// locals), and every byte of this state is held by each idle session.
#[allow(clippy::manual_async_fn)]
fn serve<S: FrameSource, K: FrameSink>(
    ctx: Arc<NodeContext>,
    transport: Transport,
    peer: SocketAddr,
    authenticated: Option<Principal>,
    mut source: S,
    mut sink: K,
) -> impl Future<Output = ()> + Send {
    async move {
        // The handshake, the implicit joins, each request and the teardown are boxed: they run
        // briefly, and inline they would make every idle session's task as large as the largest
        // of them (the mesh's join and publish futures are kilobytes).
        let handshake = handshake(&ctx, transport, peer, authenticated, &mut source, &mut sink);
        let Some(mut session) = Box::pin(handshake).await else {
            Box::pin(linger(&mut source)).await;
            return;
        };
        let handle = session.handle.clone();
        tracing::Span::current()
            .record("session", &*handle.id)
            .record("user", &*handle.user);
        tracing::debug!(client = %handle.client_name, "session authenticated");
        let metrics = &ctx.metrics;
        metrics
            .sessions
            .get_or_create(&[("transport", transport.label())])
            .inc();
        metrics
            .sessions_opened
            .get_or_create(&[("transport", transport.label())])
            .inc();

        let implicit = [RoomName::for_user(&handle.user), RoomName::broadcast()];
        for room in &implicit {
            // Membership of the user's and the broadcast room; no Joined frame is sent for them.
            // A session that could not become a member would silently miss what is sent to its
            // user: it is told to reconnect (elsewhere) instead.
            if let Err(error) = Box::pin(ctx.bus.join(room, &handle, None)).await {
                tracing::warn!(%error, %room, "implicit join failed; sending the session away");
                handle.go_away("this node cannot serve the session now; reconnect");
                break;
            }
        }
        // A drain that started after this session was authenticated but before it joined
        // $broadcast did not see it; tell it now (the drain cancels before it takes its snapshot).
        if ctx.shutdown.is_cancelled() {
            handle.go_away("node shutting down");
        }
        // Only now is the queued `Connected` written, so a client that has it is a member of its
        // implicit rooms and a message to its user published right after reaches it. (In a mesh
        // the owner of the user's room hands messages to its own members directly, never through
        // NATS: a publish there in that moment found no member here and was lost to the session.)
        // What was delivered meanwhile waits in the bounded queue behind `Connected`.
        let writer = tokio::spawn(write_loop(handle.clone(), sink));
        session.read_loop(&mut source).await;
        session.publishes.detach(&ctx);

        // Teardown: no new pushes once memberships are gone; then let the writer finish.
        for room in session.rooms.iter().chain(&implicit) {
            Box::pin(ctx.bus.leave(room, &handle)).await;
        }
        handle.close(CloseReason::ClientClosed);
        let _ = writer.await;
        Box::pin(linger(&mut source)).await;
        handle.state.store(State::Closed as u8, Ordering::Relaxed);
        let reason = handle.reason();
        metrics
            .sessions
            .get_or_create(&[("transport", transport.label())])
            .dec();
        if reason.peer_caused() {
            tracing::debug!(reason = reason.label(), "session closed");
        } else {
            tracing::info!(reason = reason.label(), "session closed");
        }
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
) -> Option<Session> {
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
    let handle = SessionHandle::new(ctx, key, user, transport, peer, connect.client_name);
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
    Some(Session {
        ctx: ctx.clone(),
        budget: SessionBudget::new(&ctx.config.limits),
        handle,
        rooms: HashSet::new(),
        violations: 0,
        permissions: principal.permissions,
        expires_at: principal.expires_at,
        warned: false,
        rearm: false,
        publishes: Pipeline::default(),
    })
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
    /// Reliable publishes read and not yet answered.
    publishes: Pipeline,
}

/// A request that awaits the bus, boxed (see [`Session::handle_frame`]).
type BoxedRequest<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What the acknowledgement of a publish needs once the bus has sequenced it.
struct Unacked {
    request_id: u64,
    room: RoomName,
    client_msg_id: String,
}

impl Session {
    async fn read_loop<S: FrameSource>(&mut self, source: &mut S) {
        let idle = self.ctx.config.idle_timeout();
        let handle = self.handle.clone();
        let cancelled = handle.closing.wait(Waiter::Reader);
        tokio::pin!(cancelled);
        // One timer for both deadlines (silence for `idle`, the token's warning or expiry),
        // re-armed only when it fires: an inbound frame just notes the time, so a busy session
        // does not touch the timer wheel per frame, and an idle one holds a single timer.
        let mut last_inbound = tokio::time::Instant::now();
        let timer = tokio::time::sleep_until(self.next_deadline(last_inbound + idle));
        tokio::pin!(timer);
        loop {
            let reading = self.publishes.has_room();
            let inbound = tokio::select! {
                biased;
                _ = &mut cancelled => return,
                answers = self.publishes.done(), if self.publishes.is_busy() => {
                    self.acknowledge(answers);
                    if let Some(answers) = self.publishes.start(&self.ctx) {
                        self.acknowledge(answers);
                    }
                    continue;
                }
                _ = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if !reading {
                        // The node, not the peer, is why nothing was read.
                        last_inbound = now;
                    }
                    if now >= last_inbound + idle {
                        self.handle.close(CloseReason::IdleTimeout);
                        return;
                    }
                    if self.token_due_in_ms() == 0 {
                        self.on_token_timer();
                    }
                    timer.as_mut().reset(self.next_deadline(last_inbound + idle));
                    continue;
                }
                r = source.recv(), if reading => r,
            };
            last_inbound = tokio::time::Instant::now();
            let inbound = match inbound {
                Err(error) => {
                    self.handle.close(error.into());
                    return;
                }
                Ok(inbound) => inbound,
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
                Decoded::Datagram(bytes) => Box::pin(self.datagram(bytes)).await,
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
                    if let Some(request) = self.handle_frame(frame) {
                        request.await;
                    }
                }
                Decoded::Undecodable(error) => {
                    self.count_in("undecodable");
                    tracing::debug!(%error, "undecodable frame");
                    self.violation(0, ErrorCode::BadFrame, "not a decodable ClientFrame");
                }
            }
            // Time spent handling the frame (a join in a mesh may wait for the owner) is not
            // the peer's silence.
            last_inbound = tokio::time::Instant::now();
            if std::mem::take(&mut self.rearm) {
                timer
                    .as_mut()
                    .reset(self.next_deadline(last_inbound + idle));
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
                let result = match self.publication(publish) {
                    Ok((publication, _)) => self.publish_unreliable(publication).await,
                    Err(error) => Err(error),
                };
                self.answer(request_id, result);
            }
            _ => {
                received.get_or_create(&[("outcome", "rejected")]).inc();
            }
        }
    }

    /// Milliseconds until the token's next event (the warning, then the expiry); 0 when due.
    fn token_due_in_ms(&self) -> u64 {
        // Capped so no configuration can overflow the Instant arithmetic.
        const FAR: u64 = 365 * 86_400 * 1000;
        let Some(expires_at) = self.expires_at else {
            return FAR;
        };
        let warning = self.ctx.config.auth.jwt.refresh_warning_s;
        let at_s = if self.warned {
            expires_at
        } else {
            expires_at.saturating_sub(warning)
        };
        at_s.saturating_mul(1000).saturating_sub(now_ms()).min(FAR)
    }

    /// When the read loop's timer fires next: the token's next event or the idle deadline.
    fn next_deadline(&self, idle_at: tokio::time::Instant) -> tokio::time::Instant {
        let token_at = tokio::time::Instant::now() + Duration::from_millis(self.token_due_in_ms());
        token_at.min(idle_at)
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

    /// Handles one request. What completes at once (a reliable publish is only queued for the
    /// bus, a ping, a refusal) is done here; a request that awaits the bus (join, leave,
    /// refresh, an unreliable publish) is returned boxed for the read loop to await, so its
    /// future (kilobytes in a mesh) is not part of every idle session's state and the common
    /// frames cost no allocation.
    fn handle_frame(&mut self, frame: ClientFrame) -> Option<BoxedRequest<'_>> {
        use client_frame::Kind;
        let request_id = frame.request_id;
        let result = match frame.kind {
            Some(Kind::Join(join)) => {
                return Some(Box::pin(async move {
                    let result = self.join(request_id, &join.room).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Leave(leave)) => {
                return Some(Box::pin(async move {
                    let result = self.leave(request_id, &leave.room).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Refresh(refresh)) => {
                return Some(Box::pin(async move {
                    let result = self.refresh(request_id, &refresh.token).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Publish(publish)) => match self.publication(publish) {
                Ok((publication, true)) => {
                    return Some(Box::pin(async move {
                        let result = self.publish_unreliable(publication).await;
                        self.answer(request_id, result);
                    }));
                }
                Ok((publication, false)) => {
                    self.publish(request_id, publication);
                    Ok(())
                }
                Err(error) => Err(error),
            },
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
        self.answer(request_id, result);
        None
    }

    /// A refused request gets its error frame.
    fn answer(&self, request_id: u64, result: Result<(), RequestError>) {
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

    /// A checked Publish, and whether it is unreliable.
    fn publication(&self, publish: proto::Publish) -> Result<(Publication, bool), RequestError> {
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
        Ok((publication, publish.unreliable))
    }

    async fn publish_unreliable(&self, publication: Publication) -> Result<(), RequestError> {
        let report = self.ctx.bus.publish_unreliable(publication).await;
        match report.too_large {
            Some(max) => Err(RequestError::DatagramTooLarge(max)),
            None => Ok(()),
        }
    }

    /// Queues a reliable publish for the bus; its ack (or error) follows once it is sequenced.
    fn publish(&mut self, request_id: u64, publication: Publication) {
        self.publishes.push(request_id, publication);
        if let Some(answers) = self.publishes.start(&self.ctx) {
            self.acknowledge(answers);
        }
    }

    /// Answers sequenced publishes: an ack, or an error, each, in order.
    fn acknowledge(&self, answers: Vec<(Unacked, Result<Sequenced, BusError>)>) {
        for (unacked, result) in answers {
            match result {
                Ok(sequenced) => {
                    self.handle.push_frame(&ServerFrame::reply(
                        unacked.request_id,
                        server_frame::Kind::PublishAck(proto::PublishAck {
                            room: unacked.room.to_string(),
                            client_msg_id: unacked.client_msg_id,
                            epoch: sequenced.epoch,
                            seq: sequenced.seq,
                            duplicate: sequenced.duplicate,
                        }),
                    ));
                }
                Err(error) => {
                    let error = RequestError::from(error);
                    tracing::debug!(%error, "publish refused");
                    self.send_error(unacked.request_id, error.code(), &error.to_string());
                }
            }
        }
    }
}

type Sequencing = tokio::task::JoinHandle<Vec<Result<Sequenced, BusError>>>;

/// A session's reliable publishes between reading and answering. One batch is at the bus at a
/// time, so a session's publishes take their positions in the order it sent them; what is read
/// meanwhile waits and goes as the next batch. A batch that is not done at once (its room's
/// owner is another node) runs on a task of its own, never left half done or unpolled while the
/// session awaits something else. Bounded by [`MAX_UNSEQUENCED_PUBLISHES`] and
/// [`MAX_UNSEQUENCED_BYTES`]: the read loop stops reading while [`Pipeline::has_room`] is false.
#[derive(Default)]
struct Pipeline {
    /// The batch at the bus, when it was not done at once.
    sequencing: Option<Sequencing>,
    in_flight: Vec<Unacked>,
    in_flight_bytes: usize,
    waiting: Vec<(Unacked, Publication)>,
    waiting_bytes: usize,
}

impl Pipeline {
    fn has_room(&self) -> bool {
        self.waiting.len() + self.in_flight.len() < MAX_UNSEQUENCED_PUBLISHES
            && self.waiting_bytes + self.in_flight_bytes < MAX_UNSEQUENCED_BYTES
    }

    fn is_busy(&self) -> bool {
        self.sequencing.is_some()
    }

    fn push(&mut self, request_id: u64, publication: Publication) {
        let unacked = Unacked {
            request_id,
            room: publication.room.clone(),
            client_msg_id: publication.client_msg_id.clone(),
        };
        self.waiting_bytes += publication.payload.len();
        self.waiting.push((unacked, publication));
    }

    /// Sends what is waiting to the bus as one batch, unless a batch is out already (it goes
    /// when that one is done). Standalone, or for rooms this node owns, the batch is usually
    /// done at once: its answers are returned, and no task is spawned.
    fn start(
        &mut self,
        ctx: &Arc<NodeContext>,
    ) -> Option<Vec<(Unacked, Result<Sequenced, BusError>)>> {
        if self.sequencing.is_some() || self.waiting.is_empty() {
            return None;
        }
        let (unacked, publications): (Vec<Unacked>, Vec<Publication>) =
            std::mem::take(&mut self.waiting).into_iter().unzip();
        self.in_flight = unacked;
        self.in_flight_bytes = std::mem::take(&mut self.waiting_bytes);
        let bus_ctx = ctx.clone();
        let mut batch = Box::pin(async move { bus_ctx.bus.publish_batch(publications).await });
        match (&mut batch).now_or_never() {
            Some(results) => Some(self.answers(results)),
            None => {
                // On the node's tracker: a drain waits for it like for any session task.
                self.sequencing = Some(ctx.tracker.spawn(batch));
                None
            }
        }
    }

    /// Resolves with the answers of the batch at the bus (polled only while [`Self::is_busy`]).
    /// A batch whose task failed answers every publish with UNAVAILABLE.
    fn done(&mut self) -> impl Future<Output = Vec<(Unacked, Result<Sequenced, BusError>)>> + '_ {
        std::future::poll_fn(move |cx| {
            let Some(batch) = self.sequencing.as_mut() else {
                return Poll::Pending;
            };
            let results = match std::pin::Pin::new(batch).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(results)) => results,
                Poll::Ready(Err(error)) => {
                    tracing::error!(%error, "a publish batch failed");
                    Vec::new()
                }
            };
            self.sequencing = None;
            Poll::Ready(self.answers(results))
        })
    }

    /// Pairs the publishes in flight with the bus's results.
    fn answers(
        &mut self,
        results: Vec<Result<Sequenced, BusError>>,
    ) -> Vec<(Unacked, Result<Sequenced, BusError>)> {
        self.in_flight_bytes = 0;
        let failed = || {
            Err(BusError::Unavailable(
                "the publish could not complete".into(),
            ))
        };
        let results = results.into_iter().chain(std::iter::repeat_with(failed));
        std::mem::take(&mut self.in_flight)
            .into_iter()
            .zip(results)
            .collect()
    }

    /// When the session ends: the batch at the bus finishes on its own task, and what was read
    /// after it is still sequenced, after it (a client that publishes and then closes publishes
    /// all it sent). Nobody is left to acknowledge either.
    fn detach(&mut self, ctx: &Arc<NodeContext>) {
        let sequencing = self.sequencing.take();
        let (_, publications): (Vec<Unacked>, Vec<Publication>) =
            std::mem::take(&mut self.waiting).into_iter().unzip();
        if sequencing.is_none() && publications.is_empty() {
            return;
        }
        let bus_ctx = ctx.clone();
        ctx.tracker.spawn(async move {
            if let Some(batch) = sequencing {
                let _ = batch.await;
            }
            if !publications.is_empty() {
                bus_ctx.bus.publish_batch(publications).await;
            }
        });
    }
}

/// The writer task: drains the send queue into the transport, one coalesced write per batch,
/// sends heartbeats, and writes the close frame when the session closes.
///
/// A batch in flight when the session starts closing is finished (within CLOSE_WRITE_TIMEOUT)
/// when the close reason keeps what was accepted, so the peer never sees a hole followed by later
/// frames; it is abandoned only for a slow consumer or a dead connection. A write that makes no
/// progress for `idle_timeout_ms` counts as a failed write.
///
/// What waits between batches is kept small (it is most of an idle session's writer); each
/// write, heartbeat and the close run boxed, since their futures are several times larger.
async fn write_loop<K: FrameSink>(handle: Arc<SessionHandle>, mut sink: K) {
    let heartbeat = handle.ctx.config.heartbeat_interval();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let cancelled = handle.closing.wait(Waiter::Writer);
    tokio::pin!(cancelled);
    // Whether everything taken from the queue so far reached the transport in order.
    let intact = loop {
        let written = tokio::select! {
            biased;
            _ = &mut cancelled => break true,
            mut batch = handle.outbox.ready(MAX_BATCH) => {
                let written =
                    Box::pin(write_batch(&handle, &mut sink, batch.make_contiguous(), cancelled.as_mut()))
                        .await;
                account_written(&handle, batch.make_contiguous());
                written
            }
            _ = ticker.tick() => Box::pin(send_heartbeat(&handle, &mut sink, cancelled.as_mut())).await,
        };
        if !written {
            break false;
        }
    };
    Box::pin(finish_writing(&handle, &mut sink, intact)).await;
}

/// Writes one batch; `false` when it failed or stalled past `idle_timeout_ms`.
async fn write_batch<K: FrameSink>(
    handle: &SessionHandle,
    sink: &mut K,
    batch: &[Bytes],
    cancelled: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let send = timeout(handle.ctx.config.idle_timeout(), sink.send_batch(batch));
    tokio::pin!(send);
    tokio::select! {
        r = &mut send => matches!(r, Ok(Ok(()))),
        _ = cancelled => {
            if handle.reason().flushes_queue() {
                matches!(timeout(CLOSE_WRITE_TIMEOUT, &mut send).await, Ok(Ok(Ok(()))))
            } else {
                false
            }
        }
    }
}

/// Sends the transport's heartbeat; `false` when it failed or stalled.
async fn send_heartbeat<K: FrameSink>(
    handle: &SessionHandle,
    sink: &mut K,
    cancelled: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    tokio::select! {
        r = timeout(handle.ctx.config.idle_timeout(), sink.heartbeat()) => matches!(r, Ok(Ok(()))),
        _ = cancelled => true,
    }
}

/// The writer's end: what is still queued is written (or dropped, for a slow consumer or a dead
/// connection), then the close frame.
async fn finish_writing<K: FrameSink>(handle: &SessionHandle, sink: &mut K, intact: bool) {
    if !intact {
        // No-op when a reason was already set (e.g. slow consumer); otherwise the write failed.
        handle.close(CloseReason::WriteFailed);
    }
    let reason = handle.reason();
    let mut rest = handle.outbox.close();
    if reason.flushes_queue() && intact && !rest.is_empty() {
        let _ = timeout(CLOSE_WRITE_TIMEOUT, sink.send_batch(rest.make_contiguous())).await;
        account_written(handle, rest.make_contiguous());
    } else {
        // A slow consumer's queue (or one behind a dead connection) is dropped, its bytes
        // released.
        handle.written(&rest);
    }
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


#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    #[test]
    fn the_send_queue_refuses_past_either_bound_and_after_close() {
        let outbox = Outbox::default();
        assert!(outbox.push(frame(10), 2, 25).is_ok());
        assert!(outbox.push(frame(10), 2, 25).is_ok());
        // Third frame: over the frame bound.
        assert!(matches!(
            outbox.push(frame(1), 2, 25),
            Err(PushRefused::Full)
        ));
        let batch = outbox.take(1);
        assert_eq!(batch.len(), 1);
        // Taken but not yet written: its bytes still count against the byte bound.
        assert!(matches!(
            outbox.push(frame(10), 2, 25),
            Err(PushRefused::Full)
        ));
        outbox.release(10);
        assert!(outbox.push(frame(10), 2, 25).is_ok());
        let rest = outbox.close();
        assert_eq!(rest.len(), 2);
        assert!(matches!(
            outbox.push(frame(1), 2, 25),
            Err(PushRefused::Closed)
        ));
    }

    #[test]
    fn an_emptied_send_queue_keeps_no_buffer() {
        let outbox = Outbox::default();
        for _ in 0..100 {
            outbox.push(frame(8), 1024, 1 << 20).unwrap();
        }
        assert_eq!(outbox.take(usize::MAX).len(), 100);
        assert_eq!(outbox.lock().frames.capacity(), 0);
        // A partial take keeps the rest, in order.
        for i in 0..10u8 {
            outbox.push(Bytes::from(vec![i]), 1024, 1 << 20).unwrap();
        }
        let first: Vec<u8> = outbox.take(4).iter().map(|b| b[0]).collect();
        let rest: Vec<u8> = outbox.take(100).iter().map(|b| b[0]).collect();
        assert_eq!(first, [0, 1, 2, 3]);
        assert_eq!(rest, [4, 5, 6, 7, 8, 9]);
    }
}
