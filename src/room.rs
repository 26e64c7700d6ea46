//! Rooms: validated names, and the owner's sequencer state.
//!
//! Names are dot-separated segments (`chat.eu.lobby`) so that they map one-to-one onto NATS
//! subject tokens in the mesh. A leading `$` marks the node's own rooms: `$user.<id>` (every
//! session of a user) and `$broadcast` (every session); clients cannot join or publish to those.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ids::is_name_segment;
use crate::proto::ErrorCode;

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

/// The owner's per-room ordering state: an epoch and the last sequence number it assigned.
///
/// Pure state, no clock: the caller passes the epoch in when the room comes into being on this
/// owner (see [`EpochClock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequencer {
    epoch: u64,
    last_seq: u64,
}

impl Sequencer {
    pub fn new(epoch: u64) -> Self {
        Self { epoch, last_seq: 0 }
    }

    /// Continues a room handed over by its previous owner at the position it reached.
    pub fn resume(epoch: u64, last_seq: u64) -> Self {
        Self { epoch, last_seq }
    }

    /// Assigns the next position; sequence numbers start at 1 and grow by one.
    pub fn assign(&mut self) -> (u64, u64) {
        self.last_seq += 1;
        (self.epoch, self.last_seq)
    }

    /// The current position: the epoch and the last sequence assigned (0 before the first).
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.last_seq)
    }
}

/// Hands out epochs that only grow on this node, even across a backwards clock step.
///
/// An epoch is a Unix-millisecond value (so a restarted node's epochs are later than the previous
/// run's), bumped by one when two rooms start within the same millisecond.
#[derive(Debug, Default)]
pub struct EpochClock {
    last: AtomicU64,
}

impl EpochClock {
    pub fn next(&self, now_ms: u64) -> u64 {
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = now_ms.max(prev + 1);
            match self.last.compare_exchange_weak(
                prev,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return candidate,
                Err(actual) => prev = actual,
            }
        }
    }
}

/// The owner's memory of recent (publisher, client message id) pairs, so a retried Publish is
/// acknowledged with its original sequence instead of being delivered twice. Bounded in time
/// (`window_ms`) and count (`max`, oldest forgotten first). Pure: the caller passes the clock.
#[derive(Debug, Default)]
pub struct Dedupe {
    seen: std::collections::HashMap<(Arc<str>, String), u64>,
    order: std::collections::VecDeque<((Arc<str>, String), u64)>,
}

impl Dedupe {
    /// The sequence this pair was given, if it was seen within the window.
    pub fn lookup(
        &mut self,
        publisher: &Arc<str>,
        client_msg_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Option<u64> {
        while let Some(((_, _), at)) = self.order.front() {
            if now_ms.saturating_sub(*at) < window_ms {
                break;
            }
            let (key, _) = self.order.pop_front().expect("front exists");
            self.seen.remove(&key);
        }
        self.seen
            .get(&(publisher.clone(), client_msg_id.to_string()))
            .copied()
    }

    /// The remembered pairs as (publisher, client_msg_id, seq, recorded at), oldest first: what a
    /// graceful hand-off carries to the room's next owner.
    pub fn entries(&self) -> impl Iterator<Item = (&Arc<str>, &str, u64, u64)> {
        self.order.iter().filter_map(|((publisher, id), at)| {
            let seq = *self.seen.get(&(publisher.clone(), id.clone()))?;
            Some((publisher, id.as_str(), seq, *at))
        })
    }

    pub fn record(
        &mut self,
        publisher: &Arc<str>,
        client_msg_id: &str,
        seq: u64,
        now_ms: u64,
        max: usize,
    ) {
        if max == 0 {
            return;
        }
        while self.order.len() >= max {
            let (key, _) = self.order.pop_front().expect("non-empty");
            self.seen.remove(&key);
        }
        let key = (publisher.clone(), client_msg_id.to_string());
        self.seen.insert(key.clone(), seq);
        self.order.push_back((key, now_ms));
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

    #[test]
    fn sequencer_counts_from_one_within_its_epoch() {
        let mut s = Sequencer::new(9);
        assert_eq!(s.position(), (9, 0));
        assert_eq!(s.assign(), (9, 1));
        assert_eq!(s.assign(), (9, 2));
        assert_eq!(s.position(), (9, 2));
    }

    #[test]
    fn epochs_only_grow() {
        let clock = EpochClock::default();
        assert_eq!(clock.next(100), 100);
        assert_eq!(clock.next(100), 101);
        assert_eq!(clock.next(50), 102);
        assert_eq!(clock.next(500), 500);
    }

    #[test]
    fn dedupe_remembers_pairs_within_its_window_and_bound() {
        let mut d = Dedupe::default();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        d.record(&alice, "m1", 7, 1_000, 2);
        assert_eq!(d.lookup(&alice, "m1", 1_500, 1_000), Some(7));
        assert_eq!(
            d.lookup(&bob, "m1", 1_500, 1_000),
            None,
            "ids are per publisher"
        );
        assert_eq!(
            d.lookup(&alice, "m1", 2_000, 1_000),
            None,
            "forgotten after the window"
        );
        d.record(&alice, "a", 1, 3_000, 2);
        d.record(&alice, "b", 2, 3_000, 2);
        d.record(&alice, "c", 3, 3_000, 2);
        assert_eq!(
            d.lookup(&alice, "a", 3_000, 1_000),
            None,
            "oldest forgotten at the bound"
        );
        assert_eq!(d.lookup(&alice, "c", 3_000, 1_000), Some(3));
    }
}
