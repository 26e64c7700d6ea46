//! The standalone bus: this node owns every room. Sequencing and local fan-out happen under the
//! room's lock, so every member's queue receives a room's messages in sequence order, and a
//! `Joined` frame is queued exactly between the messages before and after the join (after the
//! replay of what a returning member missed). Rooms whose class keeps history keep it in memory
//! here (a `durable` class too: there is no JetStream without a mesh).

use std::sync::Arc;

use crate::clock::{mono_ms, wall_ms};
use crate::cluster::devices::LocalDevices;
use crate::cluster::owners::{Cell, Held, Installed, Owners};
use crate::cluster::presence::Presence;
use crate::cluster::{BusError, REPLAY_PAGE, RoomInfo, fit_to_share, joined_frame, page_size};
use crate::config::RoomsConfig;
use crate::fanout::{Hub, UnreliableReport};
use crate::member::Member;
use crate::metrics::Metrics;
use crate::room::{
    Classes, EpochClock, HistoryPage, HistoryQuery, OwnedRoom, Publication, Recovery, RoomName,
    Sequenced, Sequencing,
};
use crate::telemetry::{KeyValue, Span, SpanKind, Telemetry, attr, position};

pub struct LocalBus {
    /// This node's id: standalone, the owner of every room's presence.
    node_id: Arc<str>,
    presence: Box<Presence>,
    hub: Arc<Hub>,
    owners: Owners,
    epochs: EpochClock,
    classes: Classes,
    devices: LocalDevices,
    telemetry: Arc<Telemetry>,
}

impl LocalBus {
    pub fn new(
        node_id: Arc<str>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        config: &RoomsConfig,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            node_id,
            presence: Box::new(Presence::new(config, metrics.clone(), 0)),
            hub,
            owners: Owners::new(config, metrics),
            epochs: EpochClock::default(),
            classes: Classes::new(&config.classes),
            devices: LocalDevices::default(),
            telemetry,
        }
    }

    /// The owner state of `room`, created in a new epoch on first use (keeping history in memory
    /// when its class keeps any). Refused (retryable) when this node already holds
    /// `rooms.max_owned_rooms`.
    fn owned(&self, room: &RoomName) -> Result<Cell, BusError> {
        if let Some(cell) = self.owners.get(room) {
            return Ok(cell);
        }
        let make = || {
            let state = OwnedRoom::new(self.epochs.next(wall_ms()), mono_ms());
            Held::new(self.classes.attach(room, state), 0)
        };
        match self.owners.install(room, make) {
            Installed::New(cell) | Installed::Existing(cell) => Ok(cell),
            Installed::Full => Err(Owners::full_error()),
        }
    }

    /// Sequences `p` and delivers it to the room's members, in a `room.sequence` span (with a
    /// `room.deliver` child for the fan-out) when telemetry is on.
    pub async fn publish(&self, p: Publication) -> Result<Sequenced, BusError> {
        let mut span = self
            .telemetry
            .span("room.sequence", SpanKind::Internal, &p.trace, || {
                [KeyValue::new(attr::ROOM, p.room.to_string())]
            });
        let result = self.sequence(&p, &span).await;
        match &result {
            Ok(s) => span.record(|| position(s.epoch, s.seq, s.duplicate)),
            Err(error) => span.fail(error),
        }
        result
    }

    async fn sequence(&self, p: &Publication, span: &Span) -> Result<Sequenced, BusError> {
        let cell = self.owned(&p.room)?;
        let mut held = cell.lock().await;
        let now = mono_ms();
        let outcome = self
            .owners
            .sequence(&mut held, p, now, wall_ms(), || Ok::<(), BusError>(()))?;
        Ok(match outcome {
            Sequencing::Duplicate { epoch, seq } => Sequenced {
                epoch,
                seq,
                local_deliveries: 0,
                duplicate: true,
            },
            Sequencing::New { epoch, seq, frame } => {
                let bytes = frame.encode_shared();
                held.room.keep(seq, &bytes, now);
                let mut delivery =
                    self.telemetry
                        .span("room.deliver", SpanKind::Internal, &span.trace(), || {
                            position(epoch, seq, false)
                        });
                let local_deliveries = self.hub.deliver(&p.room, &bytes);
                delivery.record(|| [KeyValue::new(attr::DELIVERIES, local_deliveries as i64)]);
                Sequenced {
                    epoch,
                    seq,
                    local_deliveries,
                    duplicate: false,
                }
            }
        })
    }

    pub fn publish_unreliable(&self, p: Publication) -> UnreliableReport {
        let frame = p.frame(0, 0, wall_ms());
        self.hub.deliver_unreliable(&p.room, &frame.encode_shared())
    }

    /// Makes `member` a member of `room`; with a request id, queues `Joined` first. With `since`
    /// (the member's last message), the messages after it are replayed before `Joined`: page by
    /// page, each waiting for room in the member's queue, and the last page under the room's
    /// lock, right before `Joined` and the membership, so nothing is missed or repeated.
    pub async fn join(
        &self,
        room: &RoomName,
        member: &Arc<Member>,
        request_id: Option<u64>,
        since: Option<(u64, u64)>,
    ) -> Result<(), BusError> {
        let Some(request_id) = request_id else {
            self.hub.add(room, member);
            return Ok(());
        };
        let cell = self.owned(room)?;
        let mut since = since;
        let mut replayed = 0u64;
        loop {
            let mut held = cell.lock().await;
            let now = mono_ms();
            held.room.touch(now);
            let recovery = since.map(|s| held.room.recovery(s, now));
            if let (Some(Recovery::Recovered { to_seq, .. }), Some((epoch, seq))) =
                (&recovery, since)
            {
                let query = HistoryQuery::After(epoch, seq);
                let mut page = held.room.history(query, REPLAY_PAGE, now).messages;
                fit_to_share(member, &mut page);
                let (frames, bytes) = page_size(&page);
                let last = frames as u64 == to_seq - seq;
                if !(last && member.has_room(frames, bytes)) {
                    // Far behind, or the queue is full: one page, then the lock goes back to
                    // the room's publishers while the page waits for room.
                    drop(held);
                    let Some(end) = page.last() else {
                        continue;
                    };
                    since = Some((end.epoch, end.seq));
                    if !member.room_for(frames, bytes).await {
                        return Ok(()); // the session is closing
                    }
                    replayed += frames as u64;
                    for message in page {
                        member.push(message.frame);
                    }
                    continue;
                }
                replayed += frames as u64;
                for message in page {
                    member.push(message.frame);
                }
            }
            let (epoch, seq) = held.room.position();
            // Joined is queued before the session becomes a member, so nothing of the room (not
            // even an unreliable message, which takes no room lock) can overtake it.
            member.push_frame(&joined_frame(
                request_id, room, epoch, seq, recovery, replayed,
            ));
            self.hub.add(room, member);
            return Ok(());
        }
    }

    pub fn leave(&self, room: &RoomName, member: &Arc<Member>) {
        self.hub.remove(room, member.key);
    }

    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// One presence interval: this node is every room's owner.
    pub fn presence_tick(&self) {
        self.presence.tick_alone(&self.node_id, mono_ms());
    }

    /// A page of `room`'s history (nothing kept: an empty page at the room's position).
    /// Where `device` of `user` has read the user's room to (kept in memory, like the history).
    pub fn device_position(&self, user: &str, device: &str) -> Option<(u64, u64)> {
        self.devices.position(user, device)
    }

    pub fn device_seen(&self, user: &str, device: &str, position: (u64, u64)) {
        self.devices.seen(user, device, position, wall_ms());
    }

    pub async fn history(
        &self,
        room: &RoomName,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<HistoryPage, BusError> {
        let Some(cell) = self.owners.get(room) else {
            return Ok(HistoryPage::default());
        };
        let mut held = cell.lock().await;
        Ok(held.room.history(query, limit, mono_ms()))
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
