//! A running session's transport: the session stream's length-delimited frames in and out, and
//! its datagrams.

use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::member::{DatagramOutcome, Datagrams};
use crate::metrics::Metrics;
use crate::proto::framing::{self, Delimited};
use crate::session::{FrameSink, FrameSource, Inbound, TransportError};

pub(super) type WtSend = h3_webtransport::stream::SendStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub(super) type WtRecv = h3_webtransport::stream::RecvStream<h3_quinn::RecvStream, Bytes>;

/// The datagram side of a session: sends encoded frames as HTTP/3 datagrams without waiting.
#[derive(Clone)]
pub struct DatagramPath {
    conn: quinn::Connection,
    /// The session's quarter stream id, QUIC-varint encoded: every datagram starts with it.
    prefix: Bytes,
    metrics: Arc<Metrics>,
}

impl DatagramPath {
    pub(super) fn new(conn: quinn::Connection, quarter_id: u64, metrics: Arc<Metrics>) -> Self {
        let mut prefix = BytesMut::new();
        quic_varint(quarter_id, &mut prefix);
        Self {
            conn,
            prefix: prefix.freeze(),
            metrics,
        }
    }

    /// The next datagram of this session, without its prefix; `None` once the connection is gone.
    async fn recv(&self) -> Option<Bytes> {
        loop {
            let mut datagram = self.conn.read_datagram().await.ok()?;
            if datagram.starts_with(&self.prefix) {
                datagram.advance(self.prefix.len());
                return Some(datagram);
            }
            self.metrics
                .datagrams_received
                .get_or_create(&[("outcome", "other_session")])
                .inc();
        }
    }
}

impl Datagrams for DatagramPath {
    /// Sends `frame` (already encoded once for every receiver) as one datagram. Never waits:
    /// when the send buffer has no room the datagram is dropped, as datagrams may be.
    fn send(&self, frame: &Bytes) -> DatagramOutcome {
        let len = self.prefix.len() + frame.len();
        let dropped = |reason: &'static str| {
            self.metrics
                .datagrams_dropped
                .get_or_create(&[("reason", reason)])
                .inc();
        };
        let Some(max) = self.conn.max_datagram_size() else {
            dropped("unsupported");
            return DatagramOutcome::Dropped;
        };
        if len > max {
            dropped("too_large");
            return DatagramOutcome::TooLarge {
                max: max.saturating_sub(self.prefix.len()),
            };
        }
        if self.conn.datagram_send_buffer_space() < len {
            dropped("buffer_full");
            return DatagramOutcome::Dropped;
        }
        // The prefix is per connection, so this one copy per receiver is the datagram framing;
        // the frame itself was encoded once.
        let mut datagram = BytesMut::with_capacity(len);
        datagram.extend_from_slice(&self.prefix);
        datagram.extend_from_slice(frame);
        match self.conn.send_datagram(datagram.freeze()) {
            Ok(()) => {
                self.metrics.datagrams_sent.inc();
                DatagramOutcome::Sent
            }
            Err(quinn::SendDatagramError::TooLarge) => {
                dropped("too_large");
                DatagramOutcome::TooLarge {
                    max: max.saturating_sub(self.prefix.len()),
                }
            }
            Err(_) => {
                dropped("connection");
                DatagramOutcome::Dropped
            }
        }
    }
}

/// QUIC variable-length integer (RFC 9000 §16), the framing of HTTP/3 datagrams.
fn quic_varint(value: u64, out: &mut BytesMut) {
    if value < 1 << 6 {
        out.extend_from_slice(&[value as u8]);
    } else if value < 1 << 14 {
        out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes());
    } else if value < 1 << 30 {
        out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// The read half: the session stream's frames, and the session's datagrams.
pub struct WtSource {
    recv: WtRecv,
    buf: BytesMut,
    max_frame: usize,
    datagrams: DatagramPath,
}

impl WtSource {
    pub(super) fn new(recv: WtRecv, max_frame: usize, datagrams: DatagramPath) -> Self {
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
            let chunk =
                std::future::poll_fn(|cx| h3::quic::RecvStream::poll_data(&mut self.recv, cx));
            tokio::select! {
                chunk = chunk => match chunk {
                    Ok(Some(chunk)) if self.buf.is_empty() => {
                        self.buf = chunk.try_into_mut().unwrap_or_else(|c| BytesMut::from(&c[..]));
                    }
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
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
    send: WtSend,
    buf: BytesMut,
    close: Arc<Mutex<Option<(u16, String)>>>,
    datagrams: DatagramPath,
}

impl WtSink {
    /// `close` is where the session's close code waits for the connection task.
    pub(super) fn new(
        send: WtSend,
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
        let _ = self.send.shutdown().await;
    }

    fn datagrams(&self) -> Option<Box<dyn Datagrams>> {
        Some(Box::new(self.datagrams.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_varints_use_the_shortest_form() {
        for (value, expected) in [
            (0u64, vec![0x00]),
            (37, vec![0x25]),
            (15293, vec![0x7b, 0xbd]),
            (494_878_333, vec![0x9d, 0x7f, 0x3e, 0x7d]),
        ] {
            let mut out = BytesMut::new();
            quic_varint(value, &mut out);
            assert_eq!(out.to_vec(), expected, "{value}");
        }
    }
}
