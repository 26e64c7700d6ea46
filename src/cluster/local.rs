//! The standalone bus: this node owns every room. Sequencing and local fan-out happen under the
//! room's lock, so every member's queue receives a room's messages in sequence order, and a
//! `Joined` frame is queued exactly between the messages before and after the join.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clock::wall_ms as now_ms;
use crate::cluster::{BusError, Publication, RoomInfo, Sequenced};
use crate::config::RoomsConfig;
use crate::fanout::{Hub, UnreliableReport};
use crate::member::Member;
use crate::metrics::Metrics;
use crate::proto::{self, ServerFrame, server_frame};
use crate::room::{Dedupe, EpochClock, RoomName, Sequencer};

struct OwnedRoom {
    sequencer: Sequencer,
    dedupe: Dedupe,
    last_active_ms: u64,
}

pub struct LocalBus {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    rooms: Mutex<HashMap<RoomName, Arc<Mutex<OwnedRoom>>>>,
    epochs: EpochClock,
    idle_ttl_ms: u64,
    dedupe_window_ms: u64,
    dedupe_max: usize,
    max_owned: usize,
}

impl LocalBus {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, config: &RoomsConfig) -> Self {
        Self {
            hub,
            metrics,
            rooms: Mutex::new(HashMap::new()),
            epochs: EpochClock::default(),
            idle_ttl_ms: config.idle_ttl_ms,
            dedupe_window_ms: config.dedupe_window_ms,
            dedupe_max: config.dedupe_max_per_room,
            max_owned: config.max_owned_rooms,
        }
    }

    /// The owner state of `room`, created on first use. Refused (retryable) when this node
    /// already holds `rooms.max_owned_rooms`, so unique room names cannot exhaust memory.
    fn owned(&self, room: &RoomName) -> Result<Arc<Mutex<OwnedRoom>>, BusError> {
        let mut rooms = self.rooms.lock().expect("rooms lock poisoned");
        if let Some(owned) = rooms.get(room) {
            return Ok(owned.clone());
        }
        if rooms.len() >= self.max_owned {
            return Err(BusError::Unavailable(
                "this node holds its maximum number of rooms".into(),
            ));
        }
        self.metrics.owned_rooms.inc();
        let now = now_ms();
        let owned = Arc::new(Mutex::new(OwnedRoom {
            dedupe: Dedupe::default(),
            sequencer: Sequencer::new(self.epochs.next(now)),
            last_active_ms: now,
        }));
        rooms.insert(room.clone(), owned.clone());
        Ok(owned)
    }

    pub fn publish(&self, p: Publication) -> Result<Sequenced, BusError> {
        let owned = self.owned(&p.room)?;
        let mut state = owned.lock().expect("room lock poisoned");
        let now = now_ms();
        state.last_active_ms = now;
        let dedupe = !p.client_msg_id.is_empty();
        if dedupe {
            let window = self.dedupe_window_ms;
            if let Some(seq) = state
                .dedupe
                .lookup(&p.publisher, &p.client_msg_id, now, window)
            {
                self.metrics.duplicate_publishes.inc();
                let epoch = state.sequencer.position().0;
                return Ok(Sequenced {
                    epoch,
                    seq,
                    local_deliveries: 0,
                    duplicate: true,
                });
            }
        }
        let (epoch, seq) = state.sequencer.assign();
        if dedupe {
            state
                .dedupe
                .record(&p.publisher, &p.client_msg_id, seq, now, self.dedupe_max);
        }
        let frame = message_frame(&p, epoch, seq, now);
        let local_deliveries = self.deliver(&p.room, &frame);
        drop(state);
        self.metrics.messages_published.inc();
        Ok(Sequenced {
            epoch,
            seq,
            local_deliveries,
            duplicate: false,
        })
    }

    pub fn publish_unreliable(&self, p: Publication) -> UnreliableReport {
        let frame = message_frame(&p, 0, 0, now_ms());
        self.hub.deliver_unreliable(&p.room, &frame.encode_shared())
    }

    fn deliver(&self, room: &RoomName, frame: &ServerFrame) -> usize {
        self.hub.deliver(room, &frame.encode_shared())
    }

    pub fn join(
        &self,
        room: &RoomName,
        session: &Arc<Member>,
        request_id: Option<u64>,
    ) -> Result<(), BusError> {
        let Some(request_id) = request_id else {
            self.hub.add(room, session);
            return Ok(());
        };
        let owned = self.owned(room)?;
        let mut state = owned.lock().expect("room lock poisoned");
        state.last_active_ms = now_ms();
        let (epoch, seq) = state.sequencer.position();
        // Joined is queued before the session becomes a member, so nothing of the room (not even
        // an unreliable message, which takes no room lock) can overtake it.
        session.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Joined(proto::Joined {
                room: room.to_string(),
                epoch,
                seq,
            }),
        ));
        self.hub.add(room, session);
        Ok(())
    }

    pub fn leave(&self, room: &RoomName, session: &Arc<Member>) {
        self.hub.remove(room, session.key);
    }

    pub fn room_info(&self, room: &RoomName) -> RoomInfo {
        let position = self
            .rooms
            .lock()
            .expect("rooms lock poisoned")
            .get(room)
            .cloned();
        let position = position.map(|owned| {
            owned
                .lock()
                .expect("room lock poisoned")
                .sequencer
                .position()
        });
        RoomInfo {
            room: room.to_string(),
            epoch: position.map(|p| p.0),
            seq: position.map(|p| p.1),
            local_members: self.hub.member_count(room),
        }
    }

    /// Drops owner state of rooms idle past the TTL with no local members. A room whose state
    /// someone else holds right now (a publish or join between `owned()` and its lock) is kept:
    /// clones are only taken under the map lock, so `strong_count == 1` means nobody can be
    /// sequencing on it, and removing it cannot leave two sequencers for one room.
    pub fn sweep(&self, now_ms: u64) {
        let mut rooms = self.rooms.lock().expect("rooms lock poisoned");
        let before = rooms.len();
        rooms.retain(|room, owned| {
            if Arc::strong_count(owned) > 1 {
                return true;
            }
            let Ok(state) = owned.try_lock() else {
                return true;
            };
            now_ms.saturating_sub(state.last_active_ms) < self.idle_ttl_ms
                || self.hub.member_count(room) > 0
        });
        self.metrics
            .owned_rooms
            .dec_by((before - rooms.len()) as i64);
    }
}

pub(crate) fn message_frame(p: &Publication, epoch: u64, seq: u64, now: u64) -> ServerFrame {
    ServerFrame::reply(
        0,
        server_frame::Kind::Message(proto::Message {
            room: p.room.to_string(),
            epoch,
            seq,
            payload: p.payload.clone(),
            publisher: p.publisher.to_string(),
            server_time_ms: now,
            client_msg_id: p.client_msg_id.clone(),
        }),
    )
}
