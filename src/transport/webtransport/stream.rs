//! A running session's transport: the session stream's length-delimited frames in and out, and
//! its datagrams.

use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use web_transport_quinn::{RecvStream, SendStream, Session, SessionError, WebTransportError};

use crate::member::{DatagramOutcome, Datagrams};
use crate::metrics::Metrics;
use crate::proto::framing::{self, Delimited};
use crate::session::{FrameSink, FrameSource, Inbound, TransportError};

/// The datagram side of a session: sends encoded frames as HTTP/3 datagrams without waiting.
/// web-transport-quinn puts the session id in front of each datagram (the CONNECT stream's id,
/// always 0 here: the CONNECT is the client's first bidirectional stream, so it equals the
/// quarter stream id RFC 9297 asks for) and strips it from received ones.
#[derive(Clone)]
pub struct DatagramPath {
    session: Arc<Session>,
    metrics: Arc<Metrics>,
}

impl DatagramPath {
    pub(super) fn new(session: Arc<Session>, metrics: Arc<Metrics>) -> Self {
        Self { session, metrics }
    }

    /// The next datagram of this session, without its prefix; `None` once the session is gone.
    async fn recv(&self) -> Option<Bytes> {
        loop {
            match self.session.read_datagram().await {
                Ok(datagram) => return Some(datagram),
                Err(SessionError::WebTransportError(WebTransportError::UnknownSession)) => {
                    self.metrics
                        .datagrams_received
                        .get_or_create(&[("outcome", "other_session")])
                        .inc();
                }
                Err(_) => return None,
            }
        }
    }
}

impl Datagrams for DatagramPath {
    /// Sends `frame` (already encoded once for every receiver) as one datagram. Never waits:
    /// when the send buffer has no room the datagram is dropped, as datagrams may be.
    fn send(&self, frame: &Bytes) -> DatagramOutcome {
        let dropped = |reason: &'static str| {
            self.metrics
                .datagrams_dropped
                .get_or_create(&[("reason", reason)])
                .inc();
        };
        // Both sizes are of the payload: the session id's prefix is already subtracted.
        let max = self.session.max_datagram_size();
        if max == 0 {
            dropped("unsupported");
            return DatagramOutcome::Dropped;
        }
        if frame.len() > max {
            dropped("too_large");
            return DatagramOutcome::TooLarge { max };
        }
        if self.session.datagram_send_buffer_space() < frame.len() {
            dropped("buffer_full");
            return DatagramOutcome::Dropped;
        }
        // The prefix is per session, so web-transport-quinn copies the frame once behind it for
        // each receiver (quinn takes one `Bytes` per datagram); the frame itself was encoded once.
        match self.session.send_datagram(frame.clone()) {
            Ok(()) => {
                self.metrics.datagrams_sent.inc();
                DatagramOutcome::Sent
            }
            Err(SessionError::SendDatagramError(quinn::SendDatagramError::TooLarge)) => {
                dropped("too_large");
                DatagramOutcome::TooLarge { max }
            }
            Err(_) => {
                dropped("connection");
                DatagramOutcome::Dropped
            }
        }
    }
}

/// The read half: the session stream's frames, and the session's datagrams.
pub struct WtSource {
    recv: RecvStream,
    buf: BytesMut,
    max_frame: usize,
    datagrams: DatagramPath,
}

impl WtSource {
    pub(super) fn new(recv: RecvStream, max_frame: usize, datagrams: DatagramPath) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            max_frame,
            datagrams,
        }
    }
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
            tokio::select! {
                chunk = self.recv.read_chunk(usize::MAX, true) => match chunk {
                    Ok(Some(chunk)) if self.buf.is_empty() => {
                        self.buf = chunk
                            .bytes
                            .try_into_mut()
                            .unwrap_or_else(|c| BytesMut::from(&c[..]));
                    }
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
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
    send: SendStream,
    buf: BytesMut,
    close: Arc<Mutex<Option<(u16, String)>>>,
    datagrams: DatagramPath,
}

impl WtSink {
    /// `close` is where the session's close code waits for the connection task.
    pub(super) fn new(
        send: SendStream,
        close: Arc<Mutex<Option<(u16, String)>>>,
        datagrams: DatagramPath,
    ) -> Self {
        Self {
            send,
            buf: BytesMut::new(),
            close,
            datagrams,
        }
    }
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
        let _ = self.send.finish();
    }

    fn datagrams(&self) -> Option<Box<dyn Datagrams>> {
        Some(Box::new(self.datagrams.clone()))
    }
}
