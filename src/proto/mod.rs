//! The wire contract: types generated from `proto/roomwire/v1/roomwire.proto`, and the helpers
//! that turn them into bytes. Encoding happens here and nowhere else.

use bytes::Bytes;
use prost::Message as _;

pub mod framing;

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/roomwire.v1.rs"));
}

pub use generated::*;

/// Node-to-node messages of the NATS mesh (`proto/roomwire/mesh/v1/mesh.proto`); internal.
#[allow(clippy::all, missing_docs)]
pub mod mesh {
    include!(concat!(env!("OUT_DIR"), "/roomwire.mesh.v1.rs"));
}

/// The WebSocket subprotocol a client asks for (`Sec-WebSocket-Protocol`).
pub const WS_SUBPROTOCOL: &str = "roomwire.v1";

impl ServerFrame {
    /// Encodes the frame once into shared bytes; every receiver of a fan-out gets a clone of them.
    pub fn encode_shared(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }

    /// Encodes `header` followed by the frame into one buffer (the mesh's room subject carries a
    /// small header before the frame); `bytes.slice(header.len()..)` is the encoded frame, so the
    /// owner's local fan-out and its one NATS publish share a single encoding.
    pub fn encode_after(&self, header: &[u8]) -> Bytes {
        let mut buf = Vec::with_capacity(header.len() + self.encoded_len());
        buf.extend_from_slice(header);
        self.encode(&mut buf).expect("a Vec grows as needed");
        Bytes::from(buf)
    }

    pub fn reply(request_id: u64, kind: server_frame::Kind) -> Self {
        Self {
            request_id,
            kind: Some(kind),
        }
    }

    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::room_error(request_id, code, message, String::new())
    }

    /// An error about one of the rooms a request named (see `Error.room`).
    pub fn room_error(
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        room: String,
    ) -> Self {
        Self::reply(
            request_id,
            server_frame::Kind::Error(Error {
                code: code as i32,
                message: message.into(),
                // Both mean "later": UNAVAILABLE after a moment, RATE_LIMITED at a slower pace.
                retryable: matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited),
                room,
            }),
        )
    }
}

impl ClientFrame {
    pub fn encode_bytes(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }

    /// Decodes a frame; the payload of a Publish is sliced from `bytes`, not copied.
    pub fn decode_bytes(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }

    /// A short name of the frame's kind, for metrics labels and logs.
    pub fn kind_name(&self) -> &'static str {
        use client_frame::Kind;
        match &self.kind {
            Some(Kind::Connect(_)) => "connect",
            Some(Kind::Join(_)) => "join",
            Some(Kind::Leave(_)) => "leave",
            Some(Kind::Publish(_)) => "publish",
            Some(Kind::Ping(_)) => "ping",
            Some(Kind::Refresh(_)) => "refresh",
            Some(Kind::History(_)) => "history",
            Some(Kind::Seen(_)) => "seen",
            Some(Kind::Presence(_)) => "presence",
            Some(Kind::PresenceStats(_)) => "presence_stats",
            None => "empty",
        }
    }
}

impl ErrorCode {
    /// The label used for this code in metrics (`roomwire_errors_total{code}`).
    pub fn label(self) -> &'static str {
        self.as_str_name().trim_start_matches("ERROR_CODE_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_publish_round_trips() {
        let frame = ClientFrame {
            request_id: 7,
            kind: Some(client_frame::Kind::Publish(Publish {
                room: "lobby".into(),
                payload: Bytes::from_static(b"hi"),
                client_msg_id: "m1".into(),
                unreliable: false,
            })),
        };
        assert_eq!(
            ClientFrame::decode_bytes(frame.encode_bytes()).unwrap(),
            frame
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ClientFrame::decode_bytes(Bytes::from(data));
        }
    }
}
