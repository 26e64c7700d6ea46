//! What a session needs of a connection: a [`FrameSource`] of inbound events and a [`FrameSink`]
//! for encoded `ServerFrame`s. The transports (`transport::ws`, `transport::webtransport`)
//! implement the two traits; the session is written against them and never learns which
//! transport it runs on.

use std::future::Future;

use bytes::Bytes;

use crate::member::{CloseReason, Datagrams};

/// One inbound event, as the session sees it.
#[derive(Debug)]
pub enum Inbound {
    /// One binary message: one encoded `ClientFrame`.
    Frame(Bytes),
    /// A text message: not part of the protocol (answered with an Error frame).
    Text,
    /// Traffic that proves the peer alive but carries no frame (pong, ping).
    Activity,
    /// The peer closed the connection.
    Closed,
    /// One datagram (WebTransport): one encoded `ClientFrame`, only an unreliable Publish is
    /// accepted this way.
    Datagram(Bytes),
}

/// Why a transport gave up on a connection; each maps onto a close reason.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("message larger than {max} bytes")]
    TooBig { max: usize },
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(String),
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

/// The read half of a connection.
pub trait FrameSource: Send + 'static {
    fn recv(&mut self) -> impl Future<Output = Result<Inbound, TransportError>> + Send;
}

/// The write half of a connection.
pub trait FrameSink: Send + 'static {
    /// Writes every frame of the batch, with as few system calls as the transport allows (the
    /// batch is coalesced into one buffered write and one flush).
    fn send_batch(
        &mut self,
        frames: &[Bytes],
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Sends the transport's heartbeat (a WebSocket ping).
    fn heartbeat(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Closes the connection with a close code and a short reason.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;

    /// Where unreliable frames go as datagrams; `None`: they take the send queue like any frame.
    fn datagrams(&self) -> Option<Box<dyn Datagrams>> {
        None
    }
}
