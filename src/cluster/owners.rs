//! The rooms this node owns: each room's state behind its own lock, the bound on how many, the
//! sweep of idle ones, and sequencing with its metrics. Used alike by the standalone bus and the
//! mesh, so a room's owner logic exists once ([`OwnedRoom`] does the numbering itself).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::cluster::BusError;
use crate::config::RoomsConfig;
use crate::metrics::Metrics;
use crate::room::{DedupeRules, OwnedRoom, Publication, RoomName, Sequencing};

/// One owned room as this node holds it.
#[derive(Debug)]
pub struct Held {
    pub room: OwnedRoom,
    /// Released to another node, or retired after a message whose fate is unknown: nothing more
    /// may be sequenced with this state (mesh).
    pub moved: bool,
    /// The NATS connection (and lease) the state was created or taken over on (mesh; always 0
    /// standalone). State from an earlier one is never used again.
    pub generation: u64,
    /// The sequence of this node's fence record in the room's durable history stream, once
    /// taken (mesh, durable rooms): appends are accepted only while it is the fence's last.
    pub fence: Option<u64>,
    /// How far the state's messages have gone out to the members, in sequence order.
    pub sent: Arc<SentThrough>,
}

impl Held {
    pub fn new(room: OwnedRoom, generation: u64) -> Self {
        let sent = Arc::new(SentThrough::new(room.position().1));
        Self {
            room,
            moved: false,
            generation,
            fence: None,
            sent,
        }
    }
}

/// How far a room's messages have gone out to its members (mesh). A durable room's appends run
/// several at a time, outside the room's lock; each message goes out only once it is stored and
/// every earlier one is out, so the room's position (taken under the lock) may be ahead of what
/// went out. Whatever reads the position to promise something about it (a join marker, a
/// hand-off, a page of history) first waits until everything up to it is out
/// ([`Self::reached`]). A message that fails stops every later one: they are never sent, and
/// the state is retired.
#[derive(Debug)]
pub struct SentThrough(tokio::sync::watch::Sender<Progress>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// Every message up to this sequence is out.
    through: u64,
    /// A message after `through` failed: nothing more goes out.
    failed: bool,
}

impl SentThrough {
    fn new(seq: u64) -> Self {
        Self(tokio::sync::watch::Sender::new(Progress {
            through: seq,
            failed: false,
        }))
    }

    /// Whether every message up to `seq` is out, waiting at most `bound` for it (`false` at
    /// once when a message up to it failed).
    pub async fn reached(&self, seq: u64, bound: std::time::Duration) -> bool {
        let mut progress = self.0.subscribe();
        let out =
            tokio::time::timeout(bound, progress.wait_for(|p| p.through >= seq || p.failed)).await;
        matches!(out, Ok(Ok(p)) if p.through >= seq)
    }

    /// Message `seq` is out (right after `seq - 1`).
    pub fn advance(&self, seq: u64) {
        self.0.send_if_modified(|p| {
            let next = !p.failed && p.through + 1 == seq;
            if next {
                p.through = seq;
            }
            next
        });
    }

    /// A message failed: no later one goes out.
    pub fn fail(&self) {
        self.0.send_modify(|p| p.failed = true);
    }
}

/// A room's state behind its lock. Sequencing happens under it, so a room's messages take their
/// positions one at a time; the fan-out follows in sequence order (under the lock standalone and
/// for rooms without durable history in the mesh; see [`SentThrough`] for durable ones). An
/// async lock: the mesh sends to NATS while holding it.
pub type Cell = Arc<tokio::sync::Mutex<Held>>;

/// What [`Owners::install`] did.
pub enum Installed {
    /// The new state is in the table.
    New(Cell),
    /// The room already had a state (installed meanwhile): that one.
    Existing(Cell),
    /// The table holds `rooms.max_owned_rooms` rooms already.
    Full,
}

/// The table of owned rooms.
pub struct Owners {
    rooms: Mutex<HashMap<RoomName, Cell>>,
    max: usize,
    idle_ttl_ms: u64,
    rules: DedupeRules,
    metrics: Arc<Metrics>,
}

impl Owners {
    pub fn new(config: &RoomsConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            max: config.max_owned_rooms,
            idle_ttl_ms: config.idle_ttl_ms,
            rules: DedupeRules {
                window_ms: config.dedupe_window_ms,
                max: config.dedupe_max_per_room,
            },
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, Cell>> {
        self.rooms.lock().expect("owners lock poisoned")
    }

    pub fn get(&self, room: &RoomName) -> Option<Cell> {
        self.lock().get(room).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The most rooms this node owns at once (`rooms.max_owned_rooms`).
    pub fn capacity(&self) -> usize {
        self.max
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.max
    }

    /// The refusal when the table is full: retryable, so unique room names cannot exhaust memory.
    pub fn full_error() -> BusError {
        BusError::Unavailable("this node holds its maximum number of rooms".into())
    }

    /// Installs the state `make` builds for `room`, unless the room has one or the table is full.
    pub fn install(&self, room: &RoomName, make: impl FnOnce() -> Held) -> Installed {
        let mut rooms = self.lock();
        if let Some(cell) = rooms.get(room) {
            return Installed::Existing(cell.clone());
        }
        if rooms.len() >= self.max {
            return Installed::Full;
        }
        let cell = Arc::new(tokio::sync::Mutex::new(make()));
        rooms.insert(room.clone(), cell.clone());
        self.metrics.owned_rooms.inc();
        Installed::New(cell)
    }

    /// Removes `room` if `cell` is still its state (a newer one is left alone).
    pub fn forget(&self, room: &RoomName, cell: &Cell) {
        let mut rooms = self.lock();
        if rooms.get(room).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            rooms.remove(room);
            self.metrics.owned_rooms.dec();
        }
    }

    /// Every owned room (a drain hands them all over).
    pub fn all(&self) -> Vec<(RoomName, Cell)> {
        self.lock()
            .iter()
            .map(|(room, cell)| (room.clone(), cell.clone()))
            .collect()
    }

    /// Drops the state of rooms idle past `rooms.idle_ttl_ms` and not `in_use` (local members).
    /// A state someone holds right now (between looking it up and locking it) is kept: clones
    /// are only taken under the table's lock, so a strong count of 1 means nobody can be
    /// sequencing on it, and removing it cannot leave two sequencers for one room.
    pub fn sweep(&self, now_ms: u64, in_use: impl Fn(&RoomName) -> bool) {
        let mut rooms = self.lock();
        let before = rooms.len();
        rooms.retain(|room, cell| {
            if Arc::strong_count(cell) > 1 {
                return true;
            }
            let Ok(mut held) = cell.try_lock() else {
                return true;
            };
            !held.room.is_idle(now_ms, self.idle_ttl_ms) || in_use(room)
        });
        self.metrics
            .owned_rooms
            .dec_by((before - rooms.len()) as i64);
    }

    /// Sequences `p` in a held room (see [`OwnedRoom::sequence`]) and counts what happened.
    pub fn sequence<E>(
        &self,
        held: &mut Held,
        p: &Publication,
        now_ms: u64,
        wall_ms: u64,
        admit: impl FnOnce() -> Result<(), E>,
    ) -> Result<Sequencing, E> {
        let outcome = held.room.sequence(p, now_ms, wall_ms, &self.rules, admit)?;
        match outcome {
            Sequencing::Duplicate { .. } => self.metrics.duplicate_publishes.inc(),
            Sequencing::New { .. } => self.metrics.messages_published.inc(),
        };
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn owners(max: usize) -> Owners {
        let config = RoomsConfig {
            max_owned_rooms: max,
            idle_ttl_ms: 1_000,
            ..RoomsConfig::default()
        };
        Owners::new(&config, Arc::new(Metrics::new()))
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse_client(name, 128).unwrap()
    }

    #[tokio::test]
    async fn messages_go_out_in_order_and_a_failure_stops_the_later_ones() {
        let bound = std::time::Duration::from_millis(200);
        let sent = Arc::new(SentThrough::new(4));
        assert!(sent.reached(4, bound).await, "out when the state was made");
        // Message 6 is stored first: it waits for 5.
        let waiting = tokio::spawn({
            let sent = sent.clone();
            async move { sent.reached(5, std::time::Duration::from_secs(10)).await }
        });
        sent.advance(6);
        assert!(!sent.reached(6, bound).await, "6 cannot go out before 5");
        sent.advance(5);
        assert!(waiting.await.unwrap(), "5 is out");
        sent.advance(6);
        assert!(sent.reached(6, bound).await);
        sent.fail();
        assert!(
            sent.reached(6, bound).await,
            "what went out before stays out"
        );
        sent.advance(7);
        assert!(
            !sent.reached(7, bound).await,
            "nothing goes out after a failure"
        );
    }

    #[test]
    fn the_table_is_bounded_and_keeps_the_first_state() {
        let owners = owners(1);
        let Installed::New(first) =
            owners.install(&room("a"), || Held::new(OwnedRoom::new(1, 0), 0))
        else {
            panic!("installed");
        };
        assert!(matches!(
            owners.install(&room("a"), || Held::new(OwnedRoom::new(2, 0), 0)),
            Installed::Existing(cell) if Arc::ptr_eq(&cell, &first)
        ));
        assert!(matches!(
            owners.install(&room("b"), || Held::new(OwnedRoom::new(3, 0), 0)),
            Installed::Full
        ));
        // Forgetting a state that is no longer the room's leaves the room alone.
        let other = Arc::new(tokio::sync::Mutex::new(Held::new(OwnedRoom::new(4, 0), 0)));
        owners.forget(&room("a"), &other);
        assert_eq!(owners.len(), 1);
        owners.forget(&room("a"), &first);
        assert_eq!(owners.len(), 0);
    }

    #[test]
    fn the_sweep_keeps_used_held_and_recent_rooms() {
        let owners = owners(10);
        for name in ["idle", "members", "held", "recent"] {
            owners.install(&room(name), || Held::new(OwnedRoom::new(1, 0), 0));
        }
        let held = owners.get(&room("held")).unwrap();
        {
            let recent = owners.get(&room("recent")).unwrap();
            recent.try_lock().unwrap().room.touch(900);
        }
        owners.sweep(1_500, |r| r.as_str() == "members");
        let mut left: Vec<String> = owners.all().iter().map(|(r, _)| r.to_string()).collect();
        left.sort();
        assert_eq!(left, ["held", "members", "recent"]);
        drop(held);
    }

    #[test]
    fn sequencing_is_counted() {
        let owners = owners(10);
        let mut held = Held::new(OwnedRoom::new(1, 0), 0);
        let p = Publication {
            room: room("a"),
            payload: Bytes::from_static(b"x"),
            publisher: "alice".into(),
            client_msg_id: "m".into(),
            trace: Default::default(),
        };
        for _ in 0..2 {
            owners
                .sequence(&mut held, &p, 0, 0, || Ok::<(), ()>(()))
                .unwrap();
        }
        assert_eq!(owners.metrics.messages_published.get(), 1);
        assert_eq!(owners.metrics.duplicate_publishes.get(), 1);
    }
}
