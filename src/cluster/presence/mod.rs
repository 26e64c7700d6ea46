//! Presence: who is in a room, across the mesh. Two halves, both used by the standalone bus and
//! the mesh alike:
//!
//! - [`LocalPresence`], on every node: its own members of rooms that keep presence, merged per
//!   user, reported to each room's owner once per interval (what changed, or everything when
//!   the owner is new to it), and the sessions that asked for the rooms' diffs;
//! - [`OwnedPresence`], on the owner: each room's [`RoomPresence`] (the nodes' reports merged,
//!   leaves held for the grace period), one encoded `PresenceDiff` per room and interval for
//!   every node with members, and the pages and counts clients and the HTTP API ask for.
//!
//! The owner's state is rebuilt, not handed over, when a room moves: a new owner collects the
//! nodes' reports for a few intervals, then tells the subscribers to fetch the presence again
//! (`reset`). Time is monotonic milliseconds, passed in.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::config::RoomsConfig;
use crate::member::Member;
use crate::metrics::Metrics;
use crate::proto::mesh::{
    PresenceAck, PresenceEntry, PresenceQuery, PresenceReply, RoomPresenceReport,
};
use crate::proto::{ServerFrame, server_frame};
use crate::room::{Classes, RoomName};

mod owner;

pub use owner::RoomPresence;

/// Entries of one room's report at most (a full report of a larger room goes in chunks).
pub const REPORT_CHUNK: usize = 1_000;
/// Estimated bytes of one report request at most (NATS's default max_payload is 1 MiB; an
/// entry is at most 64 bytes of user id and `presence_info_max_bytes` ≤ 4 KiB of info, so a
/// chunk of the default 256-byte infos stays well under it).
pub const REQUEST_BYTES: usize = 512 * 1024;

/// Cuts one owner's reports into requests of at most [`REQUEST_BYTES`] (estimated), in order:
/// the chunks of a room follow one another, so each request is sent after the previous one
/// was answered.
pub fn requests(reports: Vec<RoomPresenceReport>) -> Vec<Vec<RoomPresenceReport>> {
    let size = |r: &RoomPresenceReport| {
        r.room.len()
            + 16
            + r.entries
                .iter()
                .map(|e| e.user.len() + e.info.len() + 8)
                .sum::<usize>()
    };
    let mut out: Vec<Vec<RoomPresenceReport>> = Vec::new();
    let mut bytes = 0;
    for report in reports {
        let n = size(&report);
        match out.last_mut() {
            Some(last) if bytes + n <= REQUEST_BYTES => {
                bytes += n;
                last.push(report);
            }
            _ => {
                bytes = n;
                out.push(vec![report]);
            }
        }
    }
    out
}

/// Users a presence page lists at most, and by default.
pub const PAGE_MAX: usize = 1_000;
pub const PAGE_DEFAULT: usize = 100;

/// A node's presence: its members (reported to the owners) and the rooms it owns.
pub struct Presence {
    pub local: LocalPresence,
    pub owned: OwnedPresence,
    classes: Classes,
    metrics: Arc<Metrics>,
    pub interval: std::time::Duration,
    pub info_max_bytes: usize,
}

impl Presence {
    /// `warm_ms`: how long a new owner state collects reports before its first diff (nothing
    /// to wait for standalone; a few intervals in a mesh).
    pub fn new(config: &RoomsConfig, metrics: Arc<Metrics>, warm_ms: u64) -> Self {
        Self {
            local: LocalPresence::default(),
            owned: OwnedPresence::new(config.presence_grace_ms, warm_ms),
            classes: Classes::new(&config.classes),
            metrics,
            interval: std::time::Duration::from_millis(config.presence_interval_ms),
            info_max_bytes: config.presence_info_max_bytes,
        }
    }

    /// The users `room`'s presence lists at most; `None`: its class keeps no presence.
    pub fn list_max(&self, room: &RoomName) -> Option<usize> {
        self.classes.presence_of(room)
    }

    /// `member` joined `room`: present when the room keeps presence.
    pub fn joined(&self, room: &RoomName, member: &Arc<Member>, info: Bytes, events: bool) {
        if self.list_max(room).is_some() {
            self.local.joined(room, member, info, events);
        }
    }

    pub fn left(&self, room: &RoomName, key: u64) {
        if self.list_max(room).is_some() {
            self.local.left(room, key);
        }
    }

    /// Takes reports as the rooms' owner (`owns`: whether this node owns a room now).
    pub fn apply(
        &self,
        node: &Arc<str>,
        reports: &[RoomPresenceReport],
        now: u64,
        owns: impl Fn(&RoomName) -> bool,
    ) -> PresenceAck {
        self.owned
            .apply(node, reports, now, |r| self.list_max(r), owns)
    }

    /// The owner's diffs due now (see [`OwnedPresence::tick`]), counted.
    pub fn due(
        &self,
        now: u64,
        owns: impl Fn(&RoomName) -> bool,
        alive: impl Fn(&str) -> bool,
    ) -> Vec<Due> {
        let due = self.owned.tick(now, owns, alive);
        self.metrics.presence_diffs.inc_by(due.len() as u64);
        self.metrics.presence_rooms.set(self.owned.len() as i64);
        due
    }

    /// Pushes a diff to this node's sessions that asked for the room's diffs.
    pub fn deliver(&self, room: &RoomName, frame: &Bytes) {
        let n = self.local.deliver(room, frame);
        self.metrics.presence_deliveries.inc_by(n as u64);
    }

    /// Standalone: this node reports to itself and owns every room.
    pub fn tick_alone(&self, node: &Arc<str>, now: u64) {
        let reports = self.local.reports(|_| Some(node.clone()), false);
        for (owner, rooms) in reports {
            let ack = self.apply(node, &rooms, now, |_| true);
            self.local.answered(&owner, &ack);
        }
        for due in self.due(now, |_| true, |_| true) {
            self.deliver(&due.room, &due.frame);
        }
    }
}

/// A user's sessions on this node in one room.
#[derive(Debug, Default)]
struct LocalUser {
    sessions: u32,
    info: Bytes,
}

#[derive(Default)]
struct LocalRoom {
    /// Member key → user, so a leave counts once whatever calls it.
    members: HashMap<u64, Arc<str>>,
    users: HashMap<Arc<str>, LocalUser>,
    /// Users whose sessions here changed since the last report (each once: bounded by the
    /// users, however long the owner stays unknown).
    dirty: HashSet<Arc<str>>,
    /// The sessions that receive the room's diffs.
    subscribers: HashMap<u64, Arc<Member>>,
    /// The owner the last report went to, and that report's `seq`.
    owner: Option<Arc<str>>,
    seq: u64,
    /// The next report names everything (the owner has nothing of this node, or lost track).
    full: bool,
}

#[derive(Default)]
struct Rooms {
    rooms: HashMap<RoomName, LocalRoom>,
    /// Rooms with something to report (changed, to report whole, or whose owner was unknown):
    /// a report looks at these only, unless the ring changed.
    pending: HashSet<RoomName>,
}

/// This node's members of rooms that keep presence.
#[derive(Default)]
pub struct LocalPresence {
    inner: Mutex<Rooms>,
}

/// Reports due, by owner node.
pub type Reports = HashMap<Arc<str>, Vec<RoomPresenceReport>>;

impl LocalPresence {
    fn lock(&self) -> std::sync::MutexGuard<'_, Rooms> {
        self.inner.lock().expect("presence lock poisoned")
    }

    /// `member` joined `room` (a room that keeps presence); with `events`, it receives the
    /// room's diffs.
    pub fn joined(&self, room: &RoomName, member: &Arc<Member>, info: Bytes, events: bool) {
        let mut inner = self.lock();
        let local = inner
            .rooms
            .entry(room.clone())
            .or_insert_with(|| LocalRoom {
                full: true,
                ..LocalRoom::default()
            });
        if events {
            local.subscribers.insert(member.key, member.clone());
        } else {
            local.subscribers.remove(&member.key);
        }
        let user = member.user.clone();
        let entry = local.users.entry(user.clone()).or_default();
        if !info.is_empty() {
            entry.info = info;
        }
        if local.members.insert(member.key, user.clone()).is_none() {
            entry.sessions += 1;
        }
        local.dirty.insert(user);
        inner.pending.insert(room.clone());
    }

    /// The member with `key` left `room` (or its session ended).
    pub fn left(&self, room: &RoomName, key: u64) {
        let mut inner = self.lock();
        let Some(local) = inner.rooms.get_mut(room) else {
            return;
        };
        local.subscribers.remove(&key);
        let Some(user) = local.members.remove(&key) else {
            return;
        };
        if let Some(entry) = local.users.get_mut(&user) {
            entry.sessions -= 1;
            if entry.sessions == 0 {
                local.users.remove(&user);
            }
        }
        local.dirty.insert(user);
        inner.pending.insert(room.clone());
    }

    /// The reports due now, each for its room's owner in `owner_of` (`None`: unknown now, kept
    /// for later): the rooms with something to report, or every room when `ring_changed`
    /// (an owner may be new to a room: it gets the room whole). Rooms with nothing left here
    /// are forgotten once their last report is out.
    pub fn reports(
        &self,
        owner_of: impl Fn(&RoomName) -> Option<Arc<str>>,
        ring_changed: bool,
    ) -> Reports {
        let mut due = Reports::new();
        let mut inner = self.lock();
        let Rooms { rooms, pending } = &mut *inner;
        let look_at: Vec<RoomName> = if ring_changed {
            pending.clear();
            rooms.keys().cloned().collect()
        } else {
            pending.drain().collect()
        };
        for room in look_at {
            let Some(local) = rooms.get_mut(&room) else {
                continue;
            };
            let Some(owner) = owner_of(&room) else {
                pending.insert(room);
                continue;
            };
            if local.owner.as_ref() != Some(&owner) {
                local.owner = Some(owner.clone());
                local.full = true;
            }
            let dirty = std::mem::take(&mut local.dirty);
            let named: Vec<&Arc<str>> = if local.full {
                local.users.keys().collect()
            } else {
                dirty.iter().collect()
            };
            let entries: Vec<PresenceEntry> = named
                .into_iter()
                .map(|user| {
                    let found = local.users.get(user);
                    PresenceEntry {
                        user: user.to_string(),
                        sessions: found.map_or(0, |u| u.sessions),
                        info: found.map(|u| u.info.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            if !entries.is_empty() || local.full {
                // In chunks that follow one another (each its own seq; only the first says
                // `full`), so no NATS message outgrows the server's max_payload.
                let mut full = std::mem::take(&mut local.full);
                let mut entries = entries;
                loop {
                    let rest = entries.split_off(entries.len().min(REPORT_CHUNK));
                    local.seq += 1;
                    due.entry(owner.clone())
                        .or_default()
                        .push(RoomPresenceReport {
                            room: room.to_string(),
                            seq: local.seq,
                            full,
                            entries,
                        });
                    full = false;
                    if rest.is_empty() {
                        break;
                    }
                    entries = rest;
                }
            }
            if local.users.is_empty() && local.subscribers.is_empty() {
                rooms.remove(&room);
            }
        }
        due
    }

    /// What `owner` answered to reports: the rooms to report whole next time, and the rooms it
    /// does not own (asked of the ring again).
    pub fn answered(&self, owner: &Arc<str>, ack: &PresenceAck) {
        let mut inner = self.lock();
        let Rooms { rooms, pending } = &mut *inner;
        for name in ack.resync.iter().chain(&ack.not_owner) {
            let Ok(room) = RoomName::parse_any(name, usize::MAX) else {
                continue;
            };
            if let Some(local) = rooms.get_mut(&room)
                && local.owner.as_ref() == Some(owner)
            {
                local.full = true;
                if ack.not_owner.contains(name) {
                    local.owner = None;
                }
                pending.insert(room);
            }
        }
    }

    /// Reports to `owner` that never arrived: those rooms are reported whole next time.
    pub fn lost(&self, owner: &Arc<str>, reports: &[RoomPresenceReport]) {
        let ack = PresenceAck {
            resync: reports.iter().map(|r| r.room.clone()).collect(),
            not_owner: Vec::new(),
        };
        self.answered(owner, &ack);
    }

    /// Pushes a diff to the room's sessions that asked for diffs; how many.
    pub fn deliver(&self, room: &RoomName, frame: &Bytes) -> usize {
        let inner = self.lock();
        let Some(local) = inner.rooms.get(room) else {
            return 0;
        };
        local
            .subscribers
            .values()
            .filter(|m| m.push(frame.clone()))
            .count()
    }
}

/// A diff due: the room, its encoded frame, and the nodes that have members in it.
pub struct Due {
    pub room: RoomName,
    pub frame: Bytes,
    pub nodes: Vec<Arc<str>>,
}

/// The presence of the rooms this node owns.
pub struct OwnedPresence {
    rooms: Mutex<HashMap<RoomName, RoomPresence>>,
    grace_ms: u64,
    /// How long a new state collects reports before its first diff.
    warm_ms: u64,
}

impl OwnedPresence {
    pub fn new(grace_ms: u64, warm_ms: u64) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            grace_ms,
            warm_ms,
        }
    }

    /// Takes `node`'s reports. `presence_of` is the room's list cap (`None`: its class keeps
    /// no presence), `owns` whether this node owns it now.
    pub fn apply(
        &self,
        node: &Arc<str>,
        reports: &[RoomPresenceReport],
        now: u64,
        presence_of: impl Fn(&RoomName) -> Option<usize>,
        owns: impl Fn(&RoomName) -> bool,
    ) -> PresenceAck {
        let mut ack = PresenceAck::default();
        let mut rooms = self.rooms.lock().expect("presence lock poisoned");
        for report in reports {
            let Ok(room) = RoomName::parse_any(&report.room, usize::MAX) else {
                continue;
            };
            let Some(list_max) = presence_of(&room) else {
                continue;
            };
            if !owns(&room) {
                ack.not_owner.push(report.room.clone());
                continue;
            }
            let state = rooms
                .entry(room)
                .or_insert_with(|| RoomPresence::new(new_epoch(), now, self.warm_ms, list_max));
            if !state.apply(node, report, now, self.grace_ms) {
                ack.resync.push(report.room.clone());
            }
        }
        ack
    }

    /// The diffs due at `now`. Rooms this node does not own any more are dropped, members of
    /// nodes that are not `alive` leave (after the grace), and empty rooms are forgotten.
    pub fn tick(
        &self,
        now: u64,
        owns: impl Fn(&RoomName) -> bool,
        alive: impl Fn(&str) -> bool,
    ) -> Vec<Due> {
        let mut due = Vec::new();
        let mut rooms = self.rooms.lock().expect("presence lock poisoned");
        rooms.retain(|room, state| {
            if !owns(room) {
                return false;
            }
            let dead: Vec<Arc<str>> = state.nodes().filter(|n| !alive(n)).cloned().collect();
            for node in dead {
                state.node_gone(&node, now, self.grace_ms);
            }
            if let Some(diff) = state.tick(room.as_str(), now) {
                due.push(Due {
                    room: room.clone(),
                    frame: ServerFrame::reply(0, server_frame::Kind::PresenceDiff(diff))
                        .encode_shared(),
                    nodes: state.nodes().cloned().collect(),
                });
            }
            !state.is_empty()
        });
        due
    }

    /// A page of the room's presence, or its counts (see [`RoomPresence::page`]); a room with
    /// no state here is empty.
    pub fn query(&self, room: &RoomName, q: &PresenceQuery) -> PresenceReply {
        let rooms = self.rooms.lock().expect("presence lock poisoned");
        let limit = match q.limit as usize {
            0 => PAGE_DEFAULT,
            n => n.min(PAGE_MAX),
        };
        rooms
            .get(room)
            .map_or_else(PresenceReply::default, |state| {
                state.page(&q.after, limit, q.stats_only, q.uncapped)
            })
    }

    /// Rooms whose presence this node holds.
    pub fn len(&self) -> usize {
        self.rooms.lock().expect("presence lock poisoned").len()
    }
}

/// A new presence epoch: unique per owner state (wall time names it; nothing is timed by it).
fn new_epoch() -> u64 {
    crate::clock::wall_ms() * 1_000 + crate::ids::random_u64() % 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::member::{Identity, MemberLimits, Transport};

    fn member(key: u64, user: &str) -> Arc<Member> {
        let identity = Identity {
            key,
            id: Arc::from(format!("n:{key}")),
            user: Arc::from(user),
            transport: Transport::WebSocket,
            peer: "127.0.0.1:1".parse().unwrap(),
            client_name: String::new(),
        };
        let limits = MemberLimits {
            queue_frames: 16,
            queue_bytes: 1 << 16,
            reconnect_after_ms: 0,
        };
        Member::new(identity, limits, Arc::new(Metrics::default()))
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse_any(name, 128).unwrap()
    }

    /// (room, seq, full, [(user, sessions)]) of one report.
    type Summary = (String, u64, bool, Vec<(String, u32)>);

    /// The reports to `owner`, summarized, in room order.
    fn summary(reports: &Reports, owner: &str) -> Vec<Summary> {
        let mut out: Vec<_> = reports
            .get(owner)
            .into_iter()
            .flatten()
            .map(|r| {
                let mut entries: Vec<_> = r
                    .entries
                    .iter()
                    .map(|e| (e.user.clone(), e.sessions))
                    .collect();
                entries.sort();
                (r.room.clone(), r.seq, r.full, entries)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_node_reports_what_changed_once_and_everything_to_a_new_owner() {
        let local = LocalPresence::default();
        let a: Arc<str> = Arc::from("a");
        let owner_a = |_: &RoomName| Some(a.clone());
        let (r, s) = (room("chat.r"), room("chat.s"));
        let (alice1, alice2, bob) = (member(1, "alice"), member(2, "alice"), member(3, "bob"));
        local.joined(&r, &alice1, Bytes::new(), false);
        local.joined(&r, &alice2, Bytes::new(), true);
        local.joined(&s, &bob, Bytes::new(), false);
        let first = local.reports(owner_a, false);
        assert_eq!(
            summary(&first, "a"),
            [
                ("chat.r".into(), 1, true, vec![("alice".into(), 2)]),
                ("chat.s".into(), 1, true, vec![("bob".into(), 1)]),
            ]
        );
        assert!(local.reports(owner_a, false).is_empty(), "nothing changed");
        // A leave is reported as the user's sessions left here.
        local.left(&r, alice1.key);
        local.left(&r, alice1.key);
        assert_eq!(
            summary(&local.reports(owner_a, false), "a"),
            [("chat.r".into(), 2, false, vec![("alice".into(), 1)])]
        );
        // The ring changed and s moved to b: b gets s whole; a hears nothing new of r.
        let b: Arc<str> = Arc::from("b");
        let moved = |room: &RoomName| {
            Some(if room.as_str() == "chat.s" {
                b.clone()
            } else {
                a.clone()
            })
        };
        let after = local.reports(moved, true);
        assert!(!after.contains_key("a"));
        assert_eq!(
            summary(&after, "b"),
            [("chat.s".into(), 2, true, vec![("bob".into(), 1)])]
        );
        // The owner lost track of r: reported whole next time.
        let ack = PresenceAck {
            resync: vec!["chat.r".into()],
            not_owner: Vec::new(),
        };
        local.answered(&a, &ack);
        assert_eq!(
            summary(&local.reports(moved, false), "a"),
            [("chat.r".into(), 3, true, vec![("alice".into(), 1)])]
        );
        // Only the subscriber gets diffs, and an emptied room is forgotten after its report.
        assert_eq!(local.deliver(&r, &Bytes::from_static(b"diff")), 1);
        local.left(&r, alice2.key);
        assert_eq!(
            summary(&local.reports(moved, false), "a"),
            [("chat.r".into(), 4, false, vec![("alice".into(), 0)])]
        );
        assert_eq!(local.deliver(&r, &Bytes::from_static(b"diff")), 0);
    }

    #[test]
    fn a_large_room_is_reported_in_chunks_that_follow_one_another() {
        let local = LocalPresence::default();
        let r = room("chat.big");
        for key in 0..2_500u64 {
            local.joined(
                &r,
                &member(key, &format!("user-{key:05}")),
                Bytes::new(),
                false,
            );
        }
        let a: Arc<str> = Arc::from("a");
        let mut reports = local.reports(|_| Some(a.clone()), false);
        let chunks = reports.remove("a").unwrap();
        let shape: Vec<(u64, bool, usize)> = chunks
            .iter()
            .map(|c| (c.seq, c.full, c.entries.len()))
            .collect();
        assert_eq!(
            shape,
            [(1, true, 1_000), (2, false, 1_000), (3, false, 500)]
        );
        // The owner takes them in order as one whole report.
        let mut owner = RoomPresence::new(1, 0, 0, 10_000);
        for chunk in &chunks {
            assert!(owner.apply(&a, chunk, 0, 1_000));
        }
        assert_eq!(owner.counts(), (2_500, 2_500));
        // Requests stay under the size bound, in order.
        let big: Vec<RoomPresenceReport> = (0..40).map(|_| chunks[0].clone()).collect();
        let requests = requests(big);
        assert!(requests.len() > 1);
        assert_eq!(requests.iter().map(Vec::len).sum::<usize>(), 40);
    }

    #[test]
    fn an_unknown_owner_keeps_the_report_for_later() {
        let local = LocalPresence::default();
        let r = room("chat.r");
        local.joined(&r, &member(1, "alice"), Bytes::new(), false);
        assert!(local.reports(|_| None, false).is_empty());
        let a: Arc<str> = Arc::from("a");
        let later = local.reports(|_| Some(a.clone()), false);
        assert_eq!(
            summary(&later, "a"),
            [("chat.r".into(), 1, true, vec![("alice".into(), 1)])]
        );
    }
}
