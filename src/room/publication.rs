//! What a publish carries to a room's owner, the checks every entry point applies to it (the
//! session and the HTTP API alike), and the position the owner gives it.

use std::sync::Arc;

use bytes::Bytes;

use super::RoomName;
use crate::ids::MAX_CLIENT_MSG_ID_BYTES;
use crate::proto::{self, ErrorCode, ServerFrame, server_frame};
use crate::telemetry::Trace;

/// A message to be sequenced into a room.
#[derive(Debug, Clone)]
pub struct Publication {
    pub room: RoomName,
    pub payload: Bytes,
    /// User id of the publisher (`$server` for the HTTP API).
    pub publisher: Arc<str>,
    pub client_msg_id: String,
    /// Where the publish belongs in a trace (its `room.publish` span, or the span that
    /// forwarded it here); empty when telemetry is off.
    pub trace: Trace,
}

/// Why a publication was refused before it reached the owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("client_msg_id longer than {MAX_CLIENT_MSG_ID_BYTES} bytes")]
    ClientMsgIdTooLong,
    #[error("payload larger than {0} bytes")]
    PayloadTooLarge(usize),
}

impl PublishError {
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::ClientMsgIdTooLong => ErrorCode::BadFrame,
            PublishError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
        }
    }
}

impl Publication {
    /// A publication that passed the checks every entry point applies: the client message id
    /// is short enough for the owner to remember, and the payload is at most `max_payload`
    /// bytes (`session.max_frame_bytes`; the WebSocket transport already bounds the whole frame,
    /// the HTTP API and other transports are held to the same bound here).
    pub fn checked(
        room: RoomName,
        payload: Bytes,
        publisher: Arc<str>,
        client_msg_id: String,
        max_payload: usize,
    ) -> Result<Self, PublishError> {
        if client_msg_id.len() > MAX_CLIENT_MSG_ID_BYTES {
            return Err(PublishError::ClientMsgIdTooLong);
        }
        if payload.len() > max_payload {
            return Err(PublishError::PayloadTooLarge(max_payload));
        }
        Ok(Self {
            room,
            payload,
            publisher,
            client_msg_id,
            trace: Trace::default(),
        })
    }

    /// The frame members receive for this publication at `(epoch, seq)` (0, 0: unreliable).
    pub fn frame(&self, epoch: u64, seq: u64, wall_ms: u64) -> ServerFrame {
        ServerFrame::reply(
            0,
            server_frame::Kind::Message(proto::Message {
                room: self.room.to_string(),
                epoch,
                seq,
                payload: self.payload.clone(),
                publisher: self.publisher.to_string(),
                server_time_ms: wall_ms,
                client_msg_id: self.client_msg_id.clone(),
            }),
        )
    }
}

/// The position the owner gave a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Sequenced {
    pub epoch: u64,
    pub seq: u64,
    /// Sessions on this node the message was queued to.
    pub local_deliveries: usize,
    /// The publish repeated an earlier (publisher, client_msg_id): nothing was delivered, and
    /// (epoch, seq) are those of the original.
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_checks_the_id_and_the_payload_alike() {
        let room = RoomName::parse_client("lobby", 128).unwrap();
        let publish = |id: &str, len: usize| {
            Publication::checked(
                room.clone(),
                Bytes::from(vec![0; len]),
                "alice".into(),
                id.into(),
                10,
            )
        };
        assert!(publish("m1", 10).is_ok());
        assert_eq!(
            publish("m1", 11).unwrap_err(),
            PublishError::PayloadTooLarge(10)
        );
        assert_eq!(
            publish(&"x".repeat(129), 1).unwrap_err(),
            PublishError::ClientMsgIdTooLong
        );
        assert_eq!(
            PublishError::ClientMsgIdTooLong.to_string(),
            "client_msg_id longer than 128 bytes"
        );
    }
}
