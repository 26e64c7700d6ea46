//! Why and how a session ends: its [`CloseReason`] (one close code each) and the lock-free signal
//! that tells its reader and writer tasks.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::ids::truncate_utf8;
use crate::proto::CloseCode;

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
    pub fn flushes_queue(&self) -> bool {
        !matches!(
            self,
            CloseReason::SlowConsumer | CloseReason::WriteFailed | CloseReason::ClientClosed
        )
    }

    /// Peer-caused reasons log at debug; the node's own at info.
    pub fn peer_caused(&self) -> bool {
        !matches!(
            self,
            CloseReason::GoingAway | CloseReason::Disconnected | CloseReason::WriteFailed
        )
    }
}

/// The signal that a session is closing, for its two tasks. Lock-free on every path: a flag and
/// one waker per waiting task. (A `CancellationToken` takes a mutex on every poll of its wait
/// future; polled in the reader's and writer's select loops it cost ~5% of a fan-out node's CPU
/// under perf.)
#[derive(Default)]
pub(crate) struct CloseSignal {
    fired: AtomicBool,
    reader: AtomicWaker,
    writer: AtomicWaker,
}

#[derive(Clone, Copy)]
pub(crate) enum Waiter {
    Reader,
    Writer,
}

impl CloseSignal {
    pub(crate) fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.reader.wake();
        self.writer.wake();
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves once the signal fired. Each waiter kind has at most one waiting future, polled by
    /// one task only (the session's reader or writer), whose waker never changes: it registers
    /// once, and every later poll is a single atomic load.
    pub(crate) fn wait(&self, who: Waiter) -> impl Future<Output = ()> + '_ {
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
