//! The errors a session's request can end with, each one wire error code.

use crate::auth::AuthError;
use crate::cluster::BusError;
use crate::proto::ErrorCode;
use crate::room::{PublishError, RoomName, RoomNameError};

/// A request refused; each variant is one wire error code.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error(transparent)]
    Room(#[from] RoomNameError),
    #[error("a session may join at most {0} rooms")]
    TooManyRooms(usize),
    #[error("not a member of room {0}")]
    NotMember(RoomName),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("unreliable message larger than a receiver's datagram limit ({0} bytes)")]
    DatagramTooLarge(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("not allowed to {0} room {1}")]
    Forbidden(&'static str, RoomName),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("a History request names either after or before, not both")]
    BothDirections,
    #[error("seen needs a Connect.device_id and names the session's own user room")]
    SeenWithoutDevice,
    #[error("presence_info longer than {0} bytes")]
    InfoTooLarge(usize),
    #[error("the token's info claim is longer than {0} bytes (rooms.presence_info_max_bytes)")]
    TokenInfoTooLarge(usize),
    #[error("room {0} keeps no presence (its class has presence = false)")]
    PresenceOff(RoomName),
    #[error("room {0} has {1} users, more than its class lists: ask for PresenceStats")]
    PresenceTooLarge(RoomName, u32),
}

impl RequestError {
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            RequestError::Room(e) => e.code(),
            RequestError::TooManyRooms(_) => ErrorCode::TooManyRooms,
            RequestError::NotMember(_) => ErrorCode::NotMember,
            RequestError::Publish(e) => e.code(),
            RequestError::DatagramTooLarge(_) => ErrorCode::PayloadTooLarge,
            RequestError::Bus(e) => e.code(),
            RequestError::Forbidden(..) => ErrorCode::Forbidden,
            RequestError::Auth(e) => e.code(),
            RequestError::BothDirections | RequestError::SeenWithoutDevice => ErrorCode::BadFrame,
            RequestError::InfoTooLarge(_) | RequestError::TokenInfoTooLarge(_) => {
                ErrorCode::PayloadTooLarge
            }
            RequestError::PresenceOff(_) => ErrorCode::PresenceOff,
            RequestError::PresenceTooLarge(..) => ErrorCode::PresenceTooLarge,
        }
    }
}
