//! WebTransport adapter: a QUIC endpoint (quinn) with WebTransport over HTTP/3 sessions
//! (web-transport-quinn), turned into the same [`FrameSource`]/[`FrameSink`] pair as WebSocket.
//!
//! One QUIC connection carries one WebTransport session: the endpoint (our quinn configuration,
//! limits, address validation, certificates) is ours; on each accepted connection
//! web-transport-quinn exchanges the HTTP/3 SETTINGS and reads the CONNECT request
//! (`/wt?token=...` or `Authorization: Bearer`), which is checked before the session is
//! accepted: a bad token gets 401 and no session exists. The session then runs on the first
//! bidirectional stream the client opens: frames are length-delimited with a Protobuf varint
//! prefix, exactly one `ClientFrame` or `ServerFrame` each, so the protocol is the WebSocket one
//! with another framing. Further streams are reset. Unreliable messages travel as HTTP/3
//! datagrams of the session and may be dropped.
//!
//! Closing: the node writes its last frames, finishes its stream, waits (linger) for the client to
//! finish its own, then closes the session with its close code: a CLOSE_WEBTRANSPORT_SESSION
//! capsule (what a browser's `WebTransport.closed` reports), then the QUIC connection with the
//! code mapped into the HTTP/3 application error space (the WebTransport draft's mapping), so a
//! client learns the same code a WebSocket client gets in its close frame. A client
//! that closes the session (a browser's `WebTransport.close()`: a CLOSE_WEBTRANSPORT_SESSION
//! capsule and FIN on the CONNECT stream) is seen at once: web-transport-quinn reads the CONNECT
//! stream and closes the connection, which ends the session.

mod endpoint;
mod establish;
mod stream;

pub use endpoint::Listener;
