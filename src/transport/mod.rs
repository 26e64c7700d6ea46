//! Transport adapters. Each turns its connection into the session's
//! [`FrameSource`](crate::session::FrameSource) of inbound events and
//! [`FrameSink`](crate::session::FrameSink) for encoded `ServerFrame`s; nothing else knows the wire.

pub mod webtransport;
pub mod ws;
