//! Owning rooms: taking a room over (pulling its state from the previous holder, or starting a
//! new epoch), releasing it, installing pushed hand-offs, and handing every room over when
//! draining (sequencing is [`super::sequencing`]). The decisions themselves are
//! [`crate::cluster::ownership`]; this module gathers the facts and does the IO.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::OwnedMutexGuard;
use xxhash_rust::xxh3::xxh3_64;

use super::link::RequestFailure;
use super::store;
use super::wire::{self as room_wire, Step};
use super::{DRAIN_PUSHES_AT_ONCE, Inner, MOVED_MAX, MOVED_TTL_MS};
use crate::clock::{mono_ms, wall_ms};
use crate::cluster::BusError;
use crate::cluster::membership::{NodeState, RingView};
use crate::cluster::owners::{Cell, Held, Installed, Owners};
use crate::cluster::ownership::{self, Facts, HandoffFacts, Pull, PullReply, Pulled, Release, Use};
use crate::proto::mesh::{self as wire, reply, request};
use crate::room::{OwnedRoom, RoomName};

impl Inner {
    /// This node is `room`'s owner now, in its own view: it is connected to NATS, holds the
    /// lease, is not draining, and the ring gives it the room. A node that has not settled yet (it is still learning the
    /// mesh) is the owner only of rooms handed to it explicitly (see [`Self::lock_owned`]).
    pub(super) fn owns(&self, room: &RoomName) -> bool {
        self.connected()
            && self.lease_valid()
            && !self.draining.load(Ordering::Acquire)
            && self
                .view()
                .ring
                .owner(room.as_str())
                .is_some_and(|o| *o == self.node_id)
    }

    /// What this node knows of `room` right now, for the ownership decisions.
    fn facts(&self, room: &RoomName) -> Facts {
        Facts {
            owns: self.owns(room),
            generation: self.generation(),
            known_epoch: self.delivered_epoch(room),
        }
    }

    /// A new epoch for `room`, after every epoch this node delivered and `stored` (the last
    /// epoch in the room's durable history; see [`ownership::fresh_epoch`]).
    fn fresh_epoch(&self, room: &RoomName, stored: u64) -> u64 {
        let known = self.delivered_epoch(room).unwrap_or(0).max(stored);
        ownership::fresh_epoch(
            &self.epochs,
            wall_ms(),
            known,
            xxh3_64(self.node_id.as_bytes()),
        )
    }

    /// The owner state of `room` on this node, taken over from its previous holder (or started
    /// in a new epoch) on first use. The take-over runs in its own task so that a caller that
    /// gives up (a closed session) cannot drop a room state released to this node.
    async fn owned_room(self: &Arc<Self>, room: &RoomName) -> Result<Cell, BusError> {
        if let Some(cell) = self.owned.get(room) {
            return Ok(cell);
        }
        let inner = self.clone();
        let room = room.clone();
        tokio::spawn(async move { inner.take_over(room).await })
            .await
            .map_err(|e| BusError::Moving(format!("room take-over failed: {e}")))?
    }

    /// One take-over per room at a time.
    async fn take_over(self: Arc<Self>, room: RoomName) -> Result<Cell, BusError> {
        let claim = self
            .claims
            .lock()
            .expect("claims lock poisoned")
            .entry(room.clone())
            .or_default()
            .clone();
        let _claimed = claim.lock().await;
        let result = self.take_over_claimed(&room).await;
        let mut claims = self.claims.lock().expect("claims lock poisoned");
        if claims.get(&room).is_some_and(|c| Arc::ptr_eq(c, &claim))
            && Arc::strong_count(&claim) <= 2
        {
            claims.remove(&room);
        }
        result
    }

    async fn take_over_claimed(&self, room: &RoomName) -> Result<Cell, BusError> {
        if let Some(cell) = self.owned.get(room) {
            return Ok(cell);
        }
        if self.owned.is_full() {
            return Err(Owners::full_error());
        }
        let generation = self.generation();
        // A durable room is taken only with its stream at hand (a state pulled without it
        // could not be used, and would be lost to everyone). Its new epoch begins with taking
        // its fence and storing its epoch record after the last one stored; a pulled state is
        // fenced at its first message.
        let stream = match self.store.stream(&self.classes.of(room)) {
            None => None,
            Some(Ok(stream)) => Some(stream),
            Some(Err(error)) => return Err(BusError::Moving(error.to_string())),
        };
        let pulled = match self.pull(room).await {
            Pulled::State(state) => Some(state),
            // Only a settled node starts rooms: one still learning the mesh may not have heard
            // of the node that holds this one. (It takes rooms handed to it explicitly.)
            Pulled::Nowhere if !self.settled() => {
                return Err(BusError::Moving("the mesh is settling".into()));
            }
            Pulled::Nowhere => None,
            Pulled::Busy(reason) => return Err(BusError::Moving(reason)),
        };
        let fenced = match (&pulled, &stream) {
            (None, Some(stream)) => Some(
                self.store
                    .fence(stream, room, &self.node_id)
                    .await
                    .map_err(|e| BusError::Moving(e.to_string()))?,
            ),
            _ => None,
        };
        let stored = fenced.as_ref().and_then(|f| f.last);
        let mut fresh = None;
        let installed = self.owned.install(room, || match &pulled {
            Some(state) => {
                let state = room_wire::import(state, mono_ms(), wall_ms());
                Held::new(self.classes.attach(room, state), generation)
            }
            None => {
                let epoch = self.fresh_epoch(room, stored.map_or(0, |(epoch, _)| epoch));
                fresh = Some(epoch);
                let state = OwnedRoom::new(epoch, mono_ms());
                Held::new(self.classes.attach(room, state), generation)
            }
        });
        let cell = match installed {
            // Pushed here by a draining node while the pull was under way.
            Installed::Existing(cell) => return Ok(cell),
            Installed::Full => return Err(Owners::full_error()),
            Installed::New(cell) => cell,
        };
        match fresh {
            None => {
                self.metrics
                    .mesh_handoffs
                    .get_or_create(&[("direction", "in"), ("how", "pulled")])
                    .inc();
            }
            Some(epoch) => {
                // Nothing is sequenced in the new epoch before its marker is out, so members
                // (here too: this node hears its own room messages like every other node) learn
                // of it now (EpochChanged), not at the next message.
                let mut held = cell.lock().await;
                if let (Some(stream), Some(fenced)) = (&stream, &fenced) {
                    held.fence = Some(fenced.fence);
                    let record = store::epoch_record(room, epoch, stored.unwrap_or((0, 0)));
                    let appended = self
                        .store
                        .append(self, (stream, fenced.fence), room, (epoch, 0), record)
                        .await;
                    if let Err(error) = appended {
                        held.moved = true;
                        drop(held);
                        self.owned.forget(room, &cell);
                        return Err(BusError::Moving(error.to_string()));
                    }
                }
                self.metrics.mesh_epochs_started.inc();
                let marker = room_wire::epoch_marker(epoch);
                if let Err(error) = self.send(self.subject_room(room), marker).await {
                    tracing::debug!(%error, "mesh: epoch marker not sent");
                }
            }
        }
        Ok(cell)
    }

    /// Asks the nodes that may hold `room` to release it to this node (see [`Pull`]).
    async fn pull(&self, room: &RoomName) -> Pulled<wire::RoomState> {
        let view = self.view();
        let mut pull = Pull::new(self.node_id.clone());
        while let Some(candidate) = pull.next_candidate(room.as_str(), &view.holders) {
            let release = request::Kind::Release(wire::Release {
                room: room.to_string(),
                to_node: self.node_id.to_string(),
            });
            let reply = match self.request(&candidate, release).await {
                Ok(reply::Kind::State(state)) => PullReply::State(state),
                // Given to that node; if it is this one, the push has been installed.
                Ok(reply::Kind::MovedTo(node)) => PullReply::MovedTo(node),
                Ok(reply::Kind::Done(_)) => PullReply::Nothing,
                // It holds the room and does not see this node as its owner yet.
                Ok(reply::Kind::NotOwner(reason) | reply::Kind::Unavailable(reason)) => {
                    PullReply::Busy(reason)
                }
                Ok(_) => PullReply::Busy(format!("unexpected reply from {candidate}")),
                Err(RequestFailure::NoResponders) => {
                    self.peer_gone(&candidate).await;
                    PullReply::Gone
                }
                Err(RequestFailure::Left) => PullReply::Gone,
                Err(RequestFailure::Other(reason)) => PullReply::Silent(reason),
            };
            if let Some(pulled) = pull.answer(candidate, reply) {
                return pulled;
            }
        }
        Pulled::Nowhere
    }

    /// Answers a request to release `room` to `to` (see [`ownership::on_release`]).
    pub(super) async fn release(&self, room: &RoomName, to: &str) -> reply::Kind {
        let Some(cell) = self.owned.get(room) else {
            return self.moved_to(room);
        };
        let mut held = cell.lock().await;
        match ownership::on_release(Some(&held), &self.facts(room)) {
            // Given to another node while this request waited (a drain's push).
            Release::NotHere => self.moved_to(room),
            Release::ForgetStale => {
                drop(held);
                self.owned.forget(room, &cell);
                reply::Kind::Done(true)
            }
            Release::Refuse => reply::Kind::NotOwner(format!(
                "{} still owns {room} in its view of the ring",
                self.node_id
            )),
            // Messages still on their way to the store would be missing from the state given.
            Release::Give if !self.all_out(&held).await => {
                reply::Kind::Unavailable(format!("{room} has messages on their way to the store"))
            }
            Release::Give => {
                held.moved = true;
                self.owned.forget(room, &cell);
                self.remember_moved(room, to);
                // Everything this node published for the room reaches the NATS server before
                // the new owner can publish the next message.
                let _ = tokio::time::timeout(
                    Duration::from_millis(self.config.request_timeout_ms / 2),
                    self.nats.flush(),
                )
                .await;
                self.metrics
                    .mesh_handoffs
                    .get_or_create(&[("direction", "out"), ("how", "pulled")])
                    .inc();
                tracing::debug!(%room, %to, "mesh: room released");
                reply::Kind::State(room_wire::export(room, &held.room, mono_ms(), wall_ms()))
            }
        }
    }

    /// Where `room` went, if this node gave it away recently.
    fn moved_to(&self, room: &RoomName) -> reply::Kind {
        match self.moved.lock().expect("moved lock poisoned").get(room) {
            Some((node, _)) => reply::Kind::MovedTo(node.to_string()),
            None => reply::Kind::Done(true),
        }
    }

    fn remember_moved(&self, room: &RoomName, to: &str) {
        let mut moved = self.moved.lock().expect("moved lock poisoned");
        if moved.len() >= self.owned.capacity().min(MOVED_MAX) {
            // Bounded: forget the oldest half (a late puller then starts a new epoch).
            let mut ages: Vec<u64> = moved.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            moved.retain(|_, (_, at)| *at > cut);
        }
        moved.insert(room.clone(), (Arc::from(to), mono_ms()));
    }

    /// Installs a room pushed by a draining node (see [`ownership::may_take_handoff`]).
    pub(super) fn take_handoff(&self, room: RoomName, state: wire::RoomState) -> reply::Kind {
        let facts = HandoffFacts {
            draining: self.draining.load(Ordering::Acquire),
            lease: self.lease_valid(),
            holds: self.owned.get(&room).is_some(),
            full: self.owned.is_full(),
            known_epoch: self.delivered_epoch(&room),
        };
        if !ownership::may_take_handoff(state.epoch, &facts) {
            return reply::Kind::Done(false);
        }
        let generation = self.generation();
        let installed = self.owned.install(&room, || {
            let state = room_wire::import(&state, mono_ms(), wall_ms());
            Held::new(self.classes.attach(&room, state), generation)
        });
        if !matches!(installed, Installed::New(_)) {
            return reply::Kind::Done(false);
        }
        self.metrics
            .mesh_handoffs
            .get_or_create(&[("direction", "in"), ("how", "pushed")])
            .inc();
        reply::Kind::Done(true)
    }

    /// Locks the owner state of `room` if this node may sequence it now.
    ///
    /// Bounded by most of a request's time: a forwarding node gives up after
    /// `request_timeout_ms` and re-sends, and the re-sent publish must not find the first one
    /// still waiting to be sequenced. (Dropping this wait is harmless: a take-over runs in its
    /// own task.)
    pub(super) async fn lock_owned(
        self: &Arc<Self>,
        room: &RoomName,
    ) -> Step<OwnedMutexGuard<Held>> {
        let bound = Duration::from_millis(self.config.request_timeout_ms * 4 / 5);
        match tokio::time::timeout(bound, self.lock_owned_unbounded(room)).await {
            Ok(step) => step,
            Err(_) => Step::Retry(format!("{room} is still being taken over")),
        }
    }

    async fn lock_owned_unbounded(
        self: &Arc<Self>,
        room: &RoomName,
    ) -> Step<OwnedMutexGuard<Held>> {
        if !self.owns(room) {
            return Step::Retry(format!("{} is not the owner of {room}", self.node_id));
        }
        let cell = match self.owned_room(room).await {
            Ok(cell) => cell,
            Err(BusError::Moving(reason)) => return Step::Retry(reason),
            Err(error) => return Step::Fail(error),
        };
        let held = cell.clone().lock_owned().await;
        // Fencing, under the room's lock: the ring, the connection or the room may have changed
        // while waiting for it.
        match ownership::may_use(&held, &self.facts(room)) {
            Use::Sequence => Step::Done(held),
            Use::Moved => Step::Retry(format!("state of {room} moved")),
            Use::Forget => {
                drop(held);
                self.owned.forget(room, &cell);
                Step::Retry(format!("state of {room} is stale"))
            }
            Use::NotOwner => Step::Retry(format!("{} is not the owner of {room}", self.node_id)),
        }
    }

    /// Publishes a join marker (`marker`) at the room's current position for a joining node.
    pub(super) async fn sync_here(self: &Arc<Self>, room: &RoomName, marker: u64) -> Step<()> {
        // The marker goes after every message up to the position it names.
        let held = match self.lock_owned_out(room).await {
            Step::Done(held) => held,
            Step::Retry(r) => return Step::Retry(r),
            Step::Fail(e) => return Step::Fail(e),
        };
        let (epoch, seq) = held.room.position();
        match self
            .send(
                self.subject_room(room),
                room_wire::join_marker(epoch, seq, marker),
            )
            .await
        {
            Ok(()) => Step::Done(()),
            Err(error) => Step::Fail(BusError::Unavailable(format!(
                "mesh publish failed: {error}"
            ))),
        }
    }

    /// Drops owner state idle past the TTL with no local members (members on other nodes do
    /// not keep a room's state alive: its next message starts a new epoch, which they are told),
    /// and forgets old "moved to" pointers.
    pub(super) fn sweep(&self, now_ms: u64) {
        self.moved
            .lock()
            .expect("moved lock poisoned")
            .retain(|_, (_, at)| now_ms.saturating_sub(*at) < MOVED_TTL_MS);
        self.owned
            .sweep(now_ms, |room| self.hub.member_count(room) > 0);
    }

    pub(super) async fn drain(self: &Arc<Self>) {
        self.draining.store(true, Ordering::Release);
        self.membership
            .lock()
            .expect("membership lock poisoned")
            .set_self_state(NodeState::Draining);
        self.publish_view();
        self.send_heartbeat().await;
        // Hand every room to its next owner; nodes that pull first get it from `release`.
        let rooms = self.owned.all();
        let view = self.view();
        let handed = AtomicU64::new(0);
        let hand_overs = futures_util::stream::iter(rooms).for_each_concurrent(
            DRAIN_PUSHES_AT_ONCE,
            |(room, cell)| {
                let view = &view;
                let handed = &handed;
                async move {
                    if self.hand_over(view, &room, &cell).await {
                        handed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        );
        let bound = Duration::from_millis(self.config.route_deadline_ms);
        if tokio::time::timeout(bound, hand_overs).await.is_err() {
            tracing::warn!(
                "mesh: draining, hand-offs not finished in time; the rest will be pulled"
            );
        }
        let handed = handed.into_inner();
        tracing::info!(rooms = handed, "mesh: draining, rooms handed over");
    }

    /// Pushes one room to its next owner, under the room's lock with the room still listed here:
    /// a release request meanwhile waits, then learns where the room went. A failed hand-over
    /// leaves the room here for a pull.
    async fn hand_over(&self, view: &RingView, room: &RoomName, cell: &Cell) -> bool {
        let Some(target) = view.ring.owner(room.as_str()).cloned() else {
            return false;
        };
        let mut held = cell.lock().await;
        if held.moved || held.generation != self.generation() || !self.all_out(&held).await {
            return false;
        }
        let timeout = Duration::from_millis(self.config.request_timeout_ms / 2);
        let _ = tokio::time::timeout(timeout, self.nats.flush()).await;
        let state = room_wire::export(room, &held.room, mono_ms(), wall_ms());
        if !matches!(
            self.request(&target, request::Kind::Handoff(state)).await,
            Ok(reply::Kind::Done(true))
        ) {
            return false;
        }
        held.moved = true;
        self.owned.forget(room, cell);
        self.remember_moved(room, &target);
        self.metrics
            .mesh_handoffs
            .get_or_create(&[("direction", "out"), ("how", "pushed")])
            .inc();
        true
    }

    pub(super) async fn leave_mesh(&self) {
        if self.connected() {
            let _ = self
                .send(self.subject_heartbeat(), self.heartbeat(NodeState::Leaving))
                .await;
            let _ = tokio::time::timeout(
                Duration::from_millis(self.config.request_timeout_ms),
                self.nats.flush(),
            )
            .await;
        }
    }
}
