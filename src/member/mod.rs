//! A member: the face a live session shows the rest of the node. Fan-out pushes encoded frames
//! into its bounded send queue, the mesh and the HTTP API close it, the admin API lists it; the
//! session's own tasks (in `session`) drain the queue into the transport.
//!
//! It knows nothing of the node: it holds the metrics and its queue bounds, so the layers below
//! the session (fan-out, the cluster) can hold members without holding the node.
//!
//! Slow-consumer policy: the send queue is bounded in frames (`send_queue_frames`) and bytes
//! (`send_queue_bytes`). Pushing never waits; when a push would exceed either bound the session is
//! closed with 4001 and its queue dropped, so one stuck client costs at most its bound and never
//! stalls the room or the other members.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::ids::truncate_utf8;
use crate::metrics::Metrics;
use crate::proto::{self, ServerFrame, server_frame};

mod close;
mod outbox;

pub use close::CloseReason;
use close::CloseSignal;
pub(crate) use close::Waiter;
use outbox::{Outbox, PushRefused};

/// Which transport a session arrived on (metrics label, admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    WebSocket,
    WebTransport,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::WebTransport => "webtransport",
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

/// What a transport with datagrams (WebTransport) offers for unreliable frames: a send that never
/// waits.
pub trait Datagrams: Send + Sync {
    /// Sends `frame` (encoded once for every receiver) as one datagram, or drops it.
    fn send(&self, frame: &Bytes) -> DatagramOutcome;
}

/// What became of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramOutcome {
    Sent,
    /// Dropped: the send buffer was full or the connection is gone (counted).
    Dropped,
    /// Larger than the path's datagram limit (the publisher is told).
    TooLarge {
        max: usize,
    },
}

/// What became of an unreliable frame pushed to one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreliableOutcome {
    /// Into the send queue (no datagram path: WebSocket).
    Queued,
    /// Sent as a datagram.
    Datagram,
    /// Not sent (datagram buffer full, session closing); unreliable frames may be lost.
    Dropped,
    /// Larger than this member's datagram limit (`max` bytes of frame).
    TooLarge { max: usize },
}

/// The bounds and hints a member needs from the node's configuration.
#[derive(Debug, Clone, Copy)]
pub struct MemberLimits {
    /// `session.send_queue_frames`.
    pub queue_frames: usize,
    /// `session.send_queue_bytes`.
    pub queue_bytes: usize,
    /// `server.reconnect_after_ms`, told in GoAway.
    pub reconnect_after_ms: u32,
}

/// Who a member is.
pub struct Identity {
    /// Numeric key, unique on this node (membership tables).
    pub key: u64,
    /// Printable id, unique in the cluster: `<node id>:<key in hex>`.
    pub id: Arc<str>,
    pub user: Arc<str>,
    pub transport: Transport,
    pub peer: SocketAddr,
    /// What the client calls itself (at most 64 bytes are kept).
    pub client_name: String,
}

/// The shared face of a live session.
pub struct Member {
    pub key: u64,
    pub id: Arc<str>,
    pub user: Arc<str>,
    pub transport: Transport,
    pub peer: SocketAddr,
    pub client_name: String,
    outbox: Outbox,
    limits: MemberLimits,
    state: AtomicU8,
    closing: CloseSignal,
    reason: OnceLock<CloseReason>,
    /// Set for WebTransport sessions: unreliable frames go out as datagrams.
    datagrams: OnceLock<Box<dyn Datagrams>>,
    metrics: Arc<Metrics>,
}

impl Member {
    /// A new authenticated member; its session's writer drains the send queue with
    /// [`Self::take_queued`]. Benchmarks use it to stand up members without sockets.
    pub fn new(identity: Identity, limits: MemberLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Member {
            key: identity.key,
            id: identity.id,
            user: identity.user,
            transport: identity.transport,
            peer: identity.peer,
            client_name: truncate_utf8(identity.client_name, 64),
            outbox: Outbox::default(),
            limits,
            state: AtomicU8::new(State::Authenticated as u8),
            closing: CloseSignal::default(),
            reason: OnceLock::new(),
            datagrams: OnceLock::new(),
            metrics,
        })
    }

    /// Gives the member a datagram path (once, before it joins anything).
    pub fn set_datagrams(&self, datagrams: Box<dyn Datagrams>) {
        let _ = self.datagrams.set(datagrams);
    }

    /// Queues one encoded frame without waiting. Returns `false` when the frame was not queued:
    /// the session is closing, or this push found the queue full and cut the session off.
    /// Accounts the node-wide queued-bytes gauge; fan-out uses [`Self::push_uncounted`] and
    /// accounts once per fan-out instead.
    pub fn push(&self, frame: Bytes) -> bool {
        let len = frame.len() as i64;
        let queued = self.push_uncounted(frame);
        if queued {
            self.metrics.queued_bytes.inc_by(len);
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
            .push(frame, self.limits.queue_frames, self.limits.queue_bytes)
        {
            Ok(()) => true,
            Err(PushRefused::Full) => {
                self.cut_off_slow();
                false
            }
            Err(PushRefused::Closed) => false,
        }
    }

    /// Encodes and queues one frame (replies, notices: frames for this member alone).
    pub fn push_frame(&self, frame: &ServerFrame) -> bool {
        self.push(frame.encode_shared())
    }

    /// Pushes an unreliable frame without waiting: as a datagram when the member has a datagram
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

    /// Takes up to `max` queued frames, oldest first (what the writer does). Their bytes stay
    /// accounted until [`Self::written`] says they left.
    pub fn take_queued(&self, max: usize) -> VecDeque<Bytes> {
        self.outbox.take(max)
    }

    /// Takes frames that [`Self::take_queued`] handed out off the queue accounting.
    pub fn written<'a>(&self, frames: impl IntoIterator<Item = &'a Bytes>) {
        self.release(frames.into_iter().map(Bytes::len).sum());
    }

    /// The part of the send queue a replay may fill, in frames and bytes: half of it; the rest
    /// stays for what else the member receives meanwhile.
    pub fn replay_share(&self) -> (usize, usize) {
        (self.limits.queue_frames / 2, self.limits.queue_bytes / 2)
    }

    /// Resolves once the replay share of the send queue has room for `frames` more frames of
    /// `bytes` (true; one page larger than the share once the queue is empty enough), or false
    /// when the session is closing. A replay pushes page by page behind it, so catching up never
    /// trips the slow-consumer policy.
    pub async fn room_for(&self, frames: usize, bytes: usize) -> bool {
        let (max_frames, max_bytes) = self.replay_share();
        let fits =
            self.outbox
                .room_for(frames, bytes, max_frames.max(frames), max_bytes.max(bytes));
        fits.await && self.state() == State::Authenticated
    }

    /// Whether the replay share has room for `frames` more frames of `bytes` now (the last step
    /// of a join's replay, taken where it cannot wait).
    pub fn has_room(&self, frames: usize, bytes: usize) -> bool {
        let (max_frames, max_bytes) = self.replay_share();
        self.outbox.fits(frames, bytes, max_frames, max_bytes)
            && self.state() == State::Authenticated
    }

    /// Resolves with the waiting frames (up to `max`) once there is at least one (the writer).
    pub(crate) fn ready(&self, max: usize) -> impl Future<Output = VecDeque<Bytes>> + '_ {
        self.outbox.ready(max)
    }

    /// Refuses every later push and returns what is still waiting (the writer, as it ends).
    pub(crate) fn close_queue(&self) -> VecDeque<Bytes> {
        self.outbox.close()
    }

    fn cut_off_slow(&self) {
        if self.close(CloseReason::SlowConsumer) {
            self.metrics.slow_consumer_drops.inc();
        }
    }

    /// Starts closing the session; the first reason wins. Returns whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.state.store(State::Closing as u8, Ordering::Relaxed);
            self.closing.fire();
            if let Some(reason) = self.reason.get() {
                self.metrics
                    .sessions_closed
                    .get_or_create(&[("reason", reason.label())])
                    .inc();
            }
        }
        first
    }

    /// Resolves once the session started closing (for its reader and its writer, one each).
    pub(crate) fn closing(&self, who: Waiter) -> impl Future<Output = ()> + '_ {
        self.closing.wait(who)
    }

    /// Marks the session closed: its tasks have ended.
    pub(crate) fn set_closed(&self) {
        self.state.store(State::Closed as u8, Ordering::Relaxed);
    }

    /// Sends GoAway and closes with 1001 once what is queued has been written.
    pub fn go_away(&self, reason: &str) {
        let frame = ServerFrame::reply(
            0,
            server_frame::Kind::GoAway(proto::GoAway {
                reason: reason.to_string(),
                reconnect_after_ms: self.limits.reconnect_after_ms,
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
        self.outbox.queued_bytes()
    }

    /// Why the session is closing (`ClientClosed` until a reason is set).
    pub fn reason(&self) -> CloseReason {
        self.reason
            .get()
            .cloned()
            .unwrap_or(CloseReason::ClientClosed)
    }

    /// Takes `len` bytes off the queue accounting once the writer wrote (or dropped) them.
    pub(crate) fn release(&self, len: usize) {
        self.outbox.release(len);
        self.metrics.queued_bytes.dec_by(len as i64);
    }
}
