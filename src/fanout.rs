//! Local fan-out: which sessions on this node are members of which room, and the push of one
//! encoded frame into each member's send queue.
//!
//! The frame arrives encoded once ([`bytes::Bytes`]); each member gets a reference-counted clone,
//! never a copy. Pushing never waits: a member whose queue is full is cut off as a slow consumer
//! (see [`Member::push`]) and the others are unaffected.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use indexmap::IndexMap;

use crate::member::{CloseReason, Member, UnreliableOutcome};
use crate::metrics::Metrics;
use crate::room::RoomName;

/// Shards of the room table: joins and leaves in one shard do not wait on fan-out in another.
const SHARDS: usize = 64;
/// `$broadcast` holds every session: it gets a shard of its own, so session churn (every connect
/// and disconnect writes it) and broadcast fan-outs never stall the rooms that would share it.
const BROADCAST_SHARD: usize = SHARDS;

type Members = IndexMap<u64, Arc<Member>>;

/// The node's local membership table.
pub struct Hub {
    shards: Box<[RwLock<HashMap<RoomName, Members>>]>,
    hasher: RandomState,
    metrics: Arc<Metrics>,
}

/// What an unreliable fan-out did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnreliableReport {
    /// Members reached through their send queue (WebSocket).
    pub queued: usize,
    /// Members sent a datagram.
    pub datagrams: usize,
    /// Some member's datagram limit was below the frame: the smallest such limit, in bytes.
    pub too_large: Option<usize>,
}

/// What a removal changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub was_member: bool,
    /// The room has no member left on this node (the mesh drops its interest then).
    pub room_empty: bool,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            shards: (0..=SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            metrics,
        }
    }

    fn shard(&self, room: &RoomName) -> &RwLock<HashMap<RoomName, Members>> {
        if room.as_str() == crate::room::BROADCAST_ROOM {
            return &self.shards[BROADCAST_SHARD];
        }
        &self.shards[self.hasher.hash_one(room) as usize % SHARDS]
    }

    /// Adds a member; returns `true` when the session was not a member before.
    pub fn add(&self, room: &RoomName, session: &Arc<Member>) -> bool {
        let mut shard = self.shard(room).write().expect("hub lock poisoned");
        let members = shard.entry(room.clone()).or_insert_with(|| {
            self.metrics.local_rooms.inc();
            Members::new()
        });
        members.insert(session.key, session.clone()).is_none()
    }

    pub fn remove(&self, room: &RoomName, session_key: u64) -> Removed {
        let mut shard = self.shard(room).write().expect("hub lock poisoned");
        let Some(members) = shard.get_mut(room) else {
            return Removed {
                was_member: false,
                room_empty: true,
            };
        };
        let was_member = members.swap_remove(&session_key).is_some();
        let room_empty = members.is_empty();
        if room_empty {
            shard.remove(room);
            self.metrics.local_rooms.dec();
        }
        Removed {
            was_member,
            room_empty,
        }
    }

    /// Queues `frame` to every local member of `room`; returns how many members it reached.
    pub fn deliver(&self, room: &RoomName, frame: &Bytes) -> usize {
        let shard = self.shard(room).read().expect("hub lock poisoned");
        let Some(members) = shard.get(room) else {
            return 0;
        };
        let mut delivered = 0;
        for member in members.values() {
            if member.push_uncounted(frame.clone()) {
                delivered += 1;
            }
        }
        drop(shard);
        self.metrics.deliveries.inc_by(delivered as u64);
        self.metrics
            .queued_bytes
            .inc_by((delivered * frame.len()) as i64);
        delivered
    }

    /// Delivers an unreliable frame: as a datagram to members with a datagram path (WebTransport),
    /// into the send queue of the others (WebSocket). Never waits; lost datagrams are counted.
    pub fn deliver_unreliable(&self, room: &RoomName, frame: &Bytes) -> UnreliableReport {
        let shard = self.shard(room).read().expect("hub lock poisoned");
        let mut report = UnreliableReport::default();
        let Some(members) = shard.get(room) else {
            return report;
        };
        for member in members.values() {
            match member.push_unreliable(frame) {
                UnreliableOutcome::Queued => report.queued += 1,
                UnreliableOutcome::Datagram => report.datagrams += 1,
                UnreliableOutcome::Dropped => {}
                UnreliableOutcome::TooLarge { max } => {
                    report.too_large = Some(report.too_large.map_or(max, |m| m.min(max)));
                }
            }
        }
        drop(shard);
        self.metrics
            .deliveries
            .inc_by((report.queued + report.datagrams) as u64);
        self.metrics
            .queued_bytes
            .inc_by((report.queued * frame.len()) as i64);
        report
    }

    pub fn member_count(&self, room: &RoomName) -> usize {
        let shard = self.shard(room).read().expect("hub lock poisoned");
        shard.get(room).map_or(0, |m| m.len())
    }

    /// Closes every local session of `user` (an operator's disconnect, here or from another
    /// node); returns how many there were.
    pub fn close_user(&self, user: &str, reason: CloseReason) -> usize {
        let sessions = self.members(&RoomName::for_user(user));
        for session in &sessions {
            session.close(reason.clone());
        }
        sessions.len()
    }

    /// The local members of a room, for the HTTP API.
    pub fn members(&self, room: &RoomName) -> Vec<Arc<Member>> {
        let shard = self.shard(room).read().expect("hub lock poisoned");
        shard
            .get(room)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}
