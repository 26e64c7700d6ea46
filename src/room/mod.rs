//! Rooms: validated names, what a publish carries ([`Publication`]), and the state of a room on
//! its owner ([`OwnedRoom`]: the one place that dedupes and numbers a message and builds its
//! frame, whichever bus owns the room).
//!
//! Names are dot-separated segments (`chat.eu.lobby`) so that they map one-to-one onto NATS
//! subject tokens in the mesh. A leading `$` marks the node's own rooms: `$user.<id>` (every
//! session of a user) and `$broadcast` (every session); clients cannot join or publish to those.

use std::fmt;
use std::sync::Arc;

use crate::ids::is_name_segment;
use crate::proto::ErrorCode;

mod classes;
mod owned;
mod pattern;
mod publication;
mod window;

pub use classes::{Classes, History};
pub use owned::{
    DedupeRules, EpochClock, HistoryPage, HistoryQuery, KeptMessage, OwnedRoom, Remembered,
    Sequencing,
};
pub use pattern::RoomPattern;
pub use publication::{Publication, PublishError, Sequenced};
pub use window::{Recovery, Window};

/// Room every session is a member of; a message published there reaches every session.
pub const BROADCAST_ROOM: &str = "$broadcast";
/// Prefix of the per-user rooms; `$user.alice` reaches every session of user `alice`.
pub const USER_ROOM_PREFIX: &str = "$user.";

/// A validated room name; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

/// Why a room name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomNameError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {max} bytes")]
    TooLong { max: usize },
    #[error(
        "room name must be dot-separated segments of letters, digits and _-:@= (no empty segment)"
    )]
    BadCharacters,
    #[error("room names starting with '$' are reserved for the node")]
    Reserved,
}

impl RoomNameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomNameError::Reserved => ErrorCode::ReservedRoom,
            _ => ErrorCode::InvalidRoom,
        }
    }
}

impl RoomName {
    /// Validates a name a client may use (join, publish): not reserved.
    pub fn parse_client(name: &str, max_bytes: usize) -> Result<Self, RoomNameError> {
        if name.starts_with('$') {
            return Err(RoomNameError::Reserved);
        }
        Self::parse_any(name, max_bytes)
    }

    /// Validates any name, reserved ones included (the HTTP API and the node itself use it).
    pub fn parse_any(name: &str, max_bytes: usize) -> Result<Self, RoomNameError> {
        if name.is_empty() {
            return Err(RoomNameError::Empty);
        }
        if name.len() > max_bytes {
            return Err(RoomNameError::TooLong { max: max_bytes });
        }
        let body = name.strip_prefix('$').unwrap_or(name);
        if !body.split('.').all(is_name_segment) {
            return Err(RoomNameError::BadCharacters);
        }
        Ok(Self(Arc::from(name)))
    }

    /// The room that reaches every session of `user`. User ids are validated at authentication
    /// to be one name segment, so the result is always a valid name.
    pub fn for_user(user: &str) -> Self {
        Self(Arc::from(format!("{USER_ROOM_PREFIX}{user}")))
    }

    pub fn broadcast() -> Self {
        Self(Arc::from(BROADCAST_ROOM))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(RoomName::parse_client("chat.eu.lobby", 128).is_ok());
        assert!(RoomName::parse_client("user:42@x=y_z-w", 128).is_ok());
        assert_eq!(RoomName::parse_client("", 128), Err(RoomNameError::Empty));
        assert_eq!(
            RoomName::parse_client("a.b", 2),
            Err(RoomNameError::TooLong { max: 2 })
        );
        for bad in ["a..b", ".a", "a.", "a b", "ä", "a*", "a>", "a/b", "\u{0}"] {
            assert_eq!(
                RoomName::parse_client(bad, 128),
                Err(RoomNameError::BadCharacters),
                "{bad}"
            );
        }
        assert_eq!(
            RoomName::parse_client("$user.bob", 128),
            Err(RoomNameError::Reserved)
        );
        assert!(RoomName::parse_any("$user.bob", 128).is_ok());
        assert_eq!(RoomName::for_user("bob").as_str(), "$user.bob");
    }
}
