//! The standalone bus: this node owns every room. Sequencing and local fan-out happen under the
//! room's lock, so every member's queue receives a room's messages in sequence order, and a
//! `Joined` frame is queued exactly between the messages before and after the join.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::cluster::{Publication, RoomInfo, Sequenced};
use crate::fanout::{Hub, UnreliableReport};
use crate::metrics::Metrics;
use crate::proto::{self, ServerFrame, server_frame};
use crate::room::{EpochClock, RoomName, Sequencer};
use crate::session::{SessionHandle, now_ms};

struct OwnedRoom {
    sequencer: Sequencer,
    last_active_ms: u64,
}

pub struct LocalBus {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    rooms: Mutex<HashMap<RoomName, Arc<Mutex<OwnedRoom>>>>,
    epochs: EpochClock,
    idle_ttl_ms: u64,
}

impl LocalBus {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, idle_ttl_ms: u64) -> Self {
        Self {
            hub,
            metrics,
            rooms: Mutex::new(HashMap::new()),
            epochs: EpochClock::default(),
            idle_ttl_ms,
        }
    }

    fn owned(&self, room: &RoomName) -> Arc<Mutex<OwnedRoom>> {
        let mut rooms = self.rooms.lock().expect("rooms lock poisoned");
        rooms
            .entry(room.clone())
            .or_insert_with(|| {
                self.metrics.owned_rooms.inc();
                let now = now_ms();
                Arc::new(Mutex::new(OwnedRoom {
                    sequencer: Sequencer::new(self.epochs.next(now)),
                    last_active_ms: now,
                }))
            })
            .clone()
    }

    pub fn publish(&self, p: Publication) -> Sequenced {
        let owned = self.owned(&p.room);
        let mut state = owned.lock().expect("room lock poisoned");
        let now = now_ms();
        let (epoch, seq) = state.sequencer.assign();
        state.last_active_ms = now;
        let frame = message_frame(&p, epoch, seq, now);
        let local_deliveries = self.deliver(&p.room, &frame);
        drop(state);
        self.metrics.messages_published.inc();
        Sequenced {
            epoch,
            seq,
            local_deliveries,
        }
    }

    pub fn publish_unreliable(&self, p: Publication) -> UnreliableReport {
        let frame = message_frame(&p, 0, 0, now_ms());
        self.hub.deliver_unreliable(&p.room, &frame.encode_shared())
    }

    fn deliver(&self, room: &RoomName, frame: &ServerFrame) -> usize {
        self.hub.deliver(room, &frame.encode_shared())
    }

    pub fn join(&self, room: &RoomName, session: &Arc<SessionHandle>, request_id: Option<u64>) {
        let Some(request_id) = request_id else {
            self.hub.add(room, session);
            return;
        };
        let owned = self.owned(room);
        let mut state = owned.lock().expect("room lock poisoned");
        state.last_active_ms = now_ms();
        self.hub.add(room, session);
        let (epoch, seq) = state.sequencer.position();
        session.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Joined(proto::Joined {
                room: room.to_string(),
                epoch,
                seq,
            }),
        ));
    }

    pub fn leave(&self, room: &RoomName, session: &Arc<SessionHandle>) {
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

    pub fn sweep(&self, now_ms: u64) {
        let mut rooms = self.rooms.lock().expect("rooms lock poisoned");
        let before = rooms.len();
        rooms.retain(|room, owned| {
            let state = owned.lock().expect("room lock poisoned");
            now_ms.saturating_sub(state.last_active_ms) < self.idle_ttl_ms
                || self.hub.member_count(room) > 0
        });
        self.metrics
            .owned_rooms
            .dec_by((before - rooms.len()) as i64);
    }
}

fn message_frame(p: &Publication, epoch: u64, seq: u64, now: u64) -> ServerFrame {
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
