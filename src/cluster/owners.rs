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
}

impl Held {
    pub fn new(room: OwnedRoom, generation: u64) -> Self {
        Self {
            room,
            moved: false,
            generation,
            fence: None,
        }
    }
}

/// A room's state behind its lock. Sequencing and the fan-out that follows happen under it, so
/// every member receives a room's messages in sequence order. An async lock: the mesh publishes
/// to NATS while holding it.
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
