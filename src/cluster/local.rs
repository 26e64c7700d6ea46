//! The standalone bus: this node owns every room. Sequencing and local fan-out happen under the
//! room's lock, so every member's queue receives a room's messages in sequence order, and a
//! `Joined` frame is queued exactly between the messages before and after the join.

use std::sync::Arc;

use crate::clock::{mono_ms, wall_ms};
use crate::cluster::owners::{Cell, Held, Installed, Owners};
use crate::cluster::{BusError, RoomInfo};
use crate::config::RoomsConfig;
use crate::fanout::{Hub, UnreliableReport};
use crate::member::Member;
use crate::metrics::Metrics;
use crate::proto::{self, ServerFrame, server_frame};
use crate::room::{EpochClock, OwnedRoom, Publication, RoomName, Sequenced, Sequencing};

pub struct LocalBus {
    hub: Arc<Hub>,
    owners: Owners,
    epochs: EpochClock,
}

impl LocalBus {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, config: &RoomsConfig) -> Self {
        Self {
            hub,
            owners: Owners::new(config, metrics),
            epochs: EpochClock::default(),
        }
    }

    /// The owner state of `room`, created in a new epoch on first use. Refused (retryable) when
    /// this node already holds `rooms.max_owned_rooms`.
    fn owned(&self, room: &RoomName) -> Result<Cell, BusError> {
        if let Some(cell) = self.owners.get(room) {
            return Ok(cell);
        }
        let make = || Held::new(OwnedRoom::new(self.epochs.next(wall_ms()), mono_ms()), 0);
        match self.owners.install(room, make) {
            Installed::New(cell) | Installed::Existing(cell) => Ok(cell),
            Installed::Full => Err(Owners::full_error()),
        }
    }

    pub async fn publish(&self, p: Publication) -> Result<Sequenced, BusError> {
        let cell = self.owned(&p.room)?;
        let mut held = cell.lock().await;
        let outcome = self
            .owners
            .sequence(&mut held, &p, mono_ms(), wall_ms(), || {
                Ok::<(), BusError>(())
            })?;
        Ok(match outcome {
            Sequencing::Duplicate { epoch, seq } => Sequenced {
                epoch,
                seq,
                local_deliveries: 0,
                duplicate: true,
            },
            Sequencing::New { epoch, seq, frame } => Sequenced {
                epoch,
                seq,
                local_deliveries: self.hub.deliver(&p.room, &frame.encode_shared()),
                duplicate: false,
            },
        })
    }

    pub fn publish_unreliable(&self, p: Publication) -> UnreliableReport {
        let frame = p.frame(0, 0, wall_ms());
        self.hub.deliver_unreliable(&p.room, &frame.encode_shared())
    }

    pub async fn join(
        &self,
        room: &RoomName,
        member: &Arc<Member>,
        request_id: Option<u64>,
    ) -> Result<(), BusError> {
        let Some(request_id) = request_id else {
            self.hub.add(room, member);
            return Ok(());
        };
        let cell = self.owned(room)?;
        let mut held = cell.lock().await;
        held.room.touch(mono_ms());
        let (epoch, seq) = held.room.position();
        // Joined is queued before the session becomes a member, so nothing of the room (not even
        // an unreliable message, which takes no room lock) can overtake it.
        member.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Joined(proto::Joined {
                room: room.to_string(),
                epoch,
                seq,
            }),
        ));
        self.hub.add(room, member);
        Ok(())
    }

    pub fn leave(&self, room: &RoomName, member: &Arc<Member>) {
        self.hub.remove(room, member.key);
    }

    pub async fn room_info(&self, room: &RoomName) -> RoomInfo {
        let position = match self.owners.get(room) {
            Some(cell) => Some(cell.lock().await.room.position()),
            None => None,
        };
        RoomInfo {
            room: room.to_string(),
            epoch: position.map(|p| p.0),
            seq: position.map(|p| p.1),
            local_members: self.hub.member_count(room),
        }
    }

    /// Drops owner state of rooms idle past the TTL with no local members.
    pub fn sweep(&self) {
        self.owners
            .sweep(mono_ms(), |room| self.hub.member_count(room) > 0);
    }

    pub fn owned_rooms(&self) -> usize {
        self.owners.len()
    }
}
