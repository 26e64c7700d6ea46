//! WebTransport adapter: a QUIC endpoint (quinn) speaking HTTP/3 (h3, h3-quinn) with WebTransport
//! sessions (h3-webtransport), turned into the same [`FrameSource`]/[`FrameSink`] pair as WebSocket.
//!
//! One QUIC connection carries one WebTransport session. The CONNECT request (`/wt?token=...` or
//! `Authorization: Bearer`) is checked before the session is accepted: a bad token gets 401 and no
//! session exists. The session then runs on the first bidirectional stream the client opens:
//! frames are length-delimited with a Protobuf varint prefix, exactly one `ClientFrame` or
//! `ServerFrame` each, so the protocol is the WebSocket one with another framing. Further streams
//! are reset. Unreliable messages travel as QUIC datagrams (HTTP/3 datagram: the session's
//! quarter stream id, then the encoded frame) and may be dropped.
//!
//! Closing: the node writes its last frames, finishes its stream, waits (linger) for the client to
//! finish its own, then closes the QUIC connection with the session's close code mapped into the
//! HTTP/3 application error space (the WebTransport draft's mapping), so a client that reads the
//! connection's close learns the same code a WebSocket client gets in its close frame.

use bytes::Bytes;
use h3_webtransport::server::WebTransportSession;

mod endpoint;
mod establish;
mod stream;

pub use endpoint::Listener;

type H3Conn = h3_quinn::Connection;
type WtSession = WebTransportSession<H3Conn, Bytes>;
