//! Interest and delivery: this node's subscription to a room's subject while it has local
//! members, the room's delivery order ([`RoomOrder`]), and joining at an exact position.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Inner;
use super::link::RequestFailure;
use super::routing::Route;
use super::wire::{ORIGIN_HEADER, RoomMessage, Step};
use crate::cluster::order::{Effect, Output, RoomOrder};
use crate::cluster::{BusError, RoomInfo};
use crate::member::Member;
use crate::proto::mesh::{self as wire, reply, request};

use crate::proto::{self, ServerFrame, server_frame};
use crate::room::RoomName;

/// A join waiting for the owner's sync marker to arrive on the room subject.
struct PendingJoin {
    marker: u64,
    member: Arc<Member>,
    request_id: u64,
    done: oneshot::Sender<()>,
}

/// This node's subscription to one room, while it has local members.
pub(super) struct Interest {
    room: RoomName,
    state: Mutex<InterestState>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Wakes the room's task when a gap deadline is set from outside it (the owner's own
    /// deliveries do not come through the subscription).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
pub(super) struct InterestState {
    closed: bool,
    /// [`Link::generation`] the order was last checked against.
    generation: u64,
    pending: Vec<PendingJoin>,
    order: RoomOrder,
}

impl Inner {
    /// This node's subscription to `room`, created if needed (a join marker proves it live).
    async fn interest(self: &Arc<Self>, room: &RoomName) -> Result<Arc<Interest>, BusError> {
        if let Some(interest) = self.live_interest(room) {
            return Ok(interest);
        }
        let _one_at_a_time = self.subscribing.lock().await;
        if let Some(interest) = self.live_interest(room) {
            return Ok(interest);
        }
        // Bounded like every NATS call of the mesh: while reconnecting the client queues the
        // subscription instead of failing it.
        let bound = Duration::from_millis(self.config.request_timeout_ms);
        let subscriber =
            match tokio::time::timeout(bound, self.nats.subscribe(self.subject_room(room))).await {
                Ok(Ok(subscriber)) => subscriber,
                Ok(Err(e)) => {
                    return Err(BusError::Unavailable(format!("mesh subscribe failed: {e}")));
                }
                Err(_) => return Err(BusError::Unavailable("mesh subscribe timed out".into())),
            };
        let interest = Arc::new(Interest {
            room: room.clone(),
            state: Mutex::new(InterestState {
                generation: self.generation(),
                ..InterestState::default()
            }),
            task: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(self.clone().room_loop(interest.clone(), subscriber));
        *interest.task.lock().expect("task lock poisoned") = Some(task.abort_handle());
        let replaced = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .insert(room.clone(), interest.clone());
        // A closed interest still in the map is being removed by its leave, which will find
        // this one instead and leave the count alone.
        if replaced.is_none() {
            self.metrics.mesh_subscribed_rooms.inc();
        }
        Ok(interest)
    }

    fn live_interest(&self, room: &RoomName) -> Option<Arc<Interest>> {
        self.interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .filter(|i| !i.state.lock().expect("interest lock poisoned").closed)
            .cloned()
    }

    async fn room_loop(
        self: Arc<Self>,
        interest: Arc<Interest>,
        mut subscriber: async_nats::Subscriber,
    ) {
        loop {
            let gap_deadline = interest
                .state
                .lock()
                .expect("interest lock poisoned")
                .order
                .gap_deadline();
            let message = tokio::select! {
                message = subscriber.next() => message,
                _ = tokio::time::sleep_until(gap_deadline.unwrap_or_else(Instant::now)), if gap_deadline.is_some() => {
                    self.skip_gap(&interest);
                    continue;
                }
                // A deadline was set by a delivery from outside this task: look again.
                _ = interest.wake.notified(), if gap_deadline.is_none() => continue,
            };
            let Some(message) = message else { break };
            // This node's own unreliable messages were delivered here when they were sent.
            let own = message
                .headers
                .as_ref()
                .and_then(|h| h.get(ORIGIN_HEADER))
                .is_some_and(|origin| origin.as_str() == &*self.node_id);
            if !own {
                self.on_room_message(&interest, message.payload);
            }
        }
    }

    fn on_room_message(&self, interest: &Interest, payload: Bytes) {
        match RoomMessage::parse(&payload) {
            Some(RoomMessage::Unreliable(frame)) => {
                self.hub.deliver_unreliable(&interest.room, &frame);
            }
            Some(RoomMessage::Ordered {
                epoch,
                seq,
                frame: Some(_),
                ..
            }) if self.is_abandoned(&interest.room, epoch, seq) => {
                // This node's own unconfirmed message, echoed late: dropped like everywhere else.
                self.metrics.mesh_stale_messages.inc();
                self.metrics.mesh_stale_epoch_messages.inc();
                tracing::debug!(room = %interest.room, epoch, seq, "mesh: own unconfirmed message dropped");
            }
            Some(RoomMessage::Ordered {
                epoch,
                seq,
                frame,
                marker,
            }) => {
                self.deliver_in_order(interest, epoch, seq, frame, marker);
            }
            None => tracing::warn!(room = %interest.room, "mesh: malformed room message ignored"),
        }
    }

    /// The newest epoch of `room` delivered to this node's members, if it has any.
    pub(super) fn delivered_epoch(&self, room: &RoomName) -> Option<u64> {
        let interest = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .cloned()?;
        let state = interest.state.lock().expect("interest lock poisoned");
        state.order.epoch()
    }

    /// Hands a message (or a join marker, `marker` non-zero) to the room's [`RoomOrder`] under
    /// the delivery lock and fans out what it releases; returns the sessions reached by messages.
    fn deliver_in_order(
        &self,
        interest: &Interest,
        epoch: u64,
        seq: u64,
        frame: Option<Bytes>,
        marker: u64,
    ) -> usize {
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.closed {
            return 0;
        }
        let wait = Duration::from_millis(self.config.request_timeout_ms / 2);
        let mut stale_epoch = None;
        let delivered = self.ordered(interest, &mut state, |order, emit| {
            let effect = order.receive(epoch, seq, frame, marker, Instant::now(), wait, emit);
            if effect.stale_epoch {
                stale_epoch = order.epoch();
            }
            effect
        });
        if let Some(current) = stale_epoch {
            tracing::warn!(
                room = %interest.room,
                epoch,
                seq,
                current,
                "mesh: a message from an older epoch arrived after a newer one and was dropped (sequenced by an owner that lost the room: it was stalled or cut off while publishing, and did not acknowledge it)"
            );
        }
        if state.order.gap_deadline().is_some() {
            // The room's task sleeps until the deadline; it may be parked on NATS right now.
            interest.wake.notify_one();
        }
        delivered
    }

    /// Runs `step` on the room's order (after noticing a NATS reconnect) and carries out its
    /// output: messages and epoch notices to the local members, pending joins admitted at their
    /// marker. Counts stale messages and skipped gaps.
    fn ordered(
        &self,
        interest: &Interest,
        state: &mut InterestState,
        step: impl FnOnce(&mut RoomOrder, &mut dyn FnMut(Output)) -> Effect,
    ) -> usize {
        let mut delivered = 0;
        let room = &interest.room;
        let InterestState {
            generation,
            pending,
            order,
            ..
        } = state;
        let mut emit = |output: Output| match output {
            Output::Frame(frame) => delivered += self.hub.deliver(room, &frame),
            Output::EpochChanged {
                previous_epoch,
                previous_seq,
                epoch,
            } => {
                let notice = ServerFrame::reply(
                    0,
                    server_frame::Kind::EpochChanged(proto::EpochChanged {
                        room: room.to_string(),
                        epoch,
                        previous_epoch,
                        previous_seq,
                    }),
                );
                self.hub.deliver(room, &notice.encode_shared());
            }
            Output::Join { marker, epoch, seq } => {
                if let Some(i) = pending.iter().position(|p| p.marker == marker) {
                    let join = pending.swap_remove(i);
                    self.enter(interest, &join.member, join.request_id, epoch, seq);
                    let _ = join.done.send(());
                }
            }
        };
        let current = self.generation();
        if *generation != current {
            *generation = current;
            order.reconnected(&mut emit);
        }
        let effect = step(order, &mut emit);
        if effect.stale {
            self.metrics.mesh_stale_messages.inc();
        }
        if effect.stale_epoch {
            self.metrics.mesh_stale_epoch_messages.inc();
        }
        if effect.gap_skipped {
            self.metrics.mesh_gaps.inc();
        }
        delivered
    }

    fn skip_gap(&self, interest: &Interest) {
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.closed {
            return;
        }
        self.ordered(interest, &mut state, |order, emit| {
            let skipped = order.skip_gap(Instant::now(), emit);
            if skipped {
                tracing::debug!(room = %interest.room, "mesh: sequence gap skipped");
            }
            Effect {
                gap_skipped: skipped,
                ..Effect::default()
            }
        });
    }

    /// Queues `Joined` at `(epoch, seq)` and makes `member` a member; under the interest lock
    /// so no message of the room can fall between the two.
    fn enter(
        &self,
        interest: &Interest,
        member: &Arc<Member>,
        request_id: u64,
        epoch: u64,
        seq: u64,
    ) {
        member.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Joined(proto::Joined {
                room: interest.room.to_string(),
                epoch,
                seq,
            }),
        ));
        self.hub.add(&interest.room, member);
    }

    pub(super) async fn join(
        self: &Arc<Self>,
        room: &RoomName,
        member: &Arc<Member>,
        request_id: Option<u64>,
    ) -> Result<(), BusError> {
        let mut route = Route::new(&self.config);
        loop {
            let interest = self.interest(room).await?;
            let outcome = match request_id {
                None => {
                    let state = interest.state.lock().expect("interest lock poisoned");
                    if state.closed {
                        continue;
                    }
                    self.hub.add(room, member);
                    return Ok(());
                }
                Some(request_id) => {
                    self.join_at_position(&interest, member, request_id, &mut route)
                        .await
                }
            };
            match outcome {
                Ok(true) => return Ok(()),
                Ok(false) => continue, // the interest closed under us: take a fresh one
                Err(error) => {
                    // A subscription made for this join alone must not outlive it.
                    self.close_if_unused(&interest);
                    return Err(error);
                }
            }
        }
    }

    /// Joins with a `Joined` position: at once when this node receives the room with nothing
    /// missing; otherwise through a join marker at the owner's position, which the room's order
    /// releases once every message up to it has been delivered. A remote owner publishes the
    /// marker on the room subject, which also proves the subscription is live end to end.
    /// `Ok(false)`: the interest closed meanwhile.
    async fn join_at_position(
        self: &Arc<Self>,
        interest: &Arc<Interest>,
        member: &Arc<Member>,
        request_id: u64,
        route: &mut Route,
    ) -> Result<bool, BusError> {
        // Marker 0 is an epoch's start, never a join.
        let marker = crate::ids::random_u64().max(1);
        let (done, mut completed) = oneshot::channel();
        {
            let mut state = interest.state.lock().expect("interest lock poisoned");
            if state.closed {
                return Ok(false);
            }
            let generation_current = state.generation == self.generation();
            if let Some((epoch, seq)) = state.order.position().filter(|_| generation_current) {
                self.enter(interest, member, request_id, epoch, seq);
                return Ok(true);
            }
            state.pending.push(PendingJoin {
                marker,
                member: member.clone(),
                request_id,
                done,
            });
        }
        let wait = Duration::from_millis(self.config.request_timeout_ms);
        let result = loop {
            if let Err(error) = self.check_link() {
                break Err(error);
            }
            let step = match self.owner_of(&interest.room) {
                None => Step::Retry("the mesh is settling".into()),
                Some(owner) if owner == self.node_id => {
                    // This node sequences the room: its own position, as a local marker.
                    match self.lock_owned(&interest.room).await {
                        Step::Done(held) => {
                            let (epoch, seq) = held.room.position();
                            self.deliver_in_order(interest, epoch, seq, None, marker);
                            drop(held);
                            Step::Done(())
                        }
                        Step::Retry(r) => Step::Retry(r),
                        Step::Fail(e) => Step::Fail(e),
                    }
                }
                Some(owner) => {
                    let sync = request::Kind::Sync(wire::Sync {
                        room: interest.room.to_string(),
                        marker,
                    });
                    match self.request(&owner, sync).await {
                        Ok(reply::Kind::Done(_)) => Step::Done(()),
                        Ok(reply::Kind::NotOwner(reason)) => {
                            self.metrics.mesh_not_owner.inc();
                            Step::Retry(reason)
                        }
                        Ok(reply::Kind::Unavailable(reason)) => Step::Retry(reason),
                        Ok(_) => Step::Retry(format!("unexpected reply from {owner}")),
                        Err(reason) => {
                            self.metrics.mesh_unreachable.inc();
                            if let RequestFailure::NoResponders = reason {
                                self.peer_gone(&owner).await;
                            }
                            Step::Retry(format!("{owner} did not answer: {reason}"))
                        }
                    }
                }
            };
            let step = match step {
                // The marker is out: the join completes when the room's order reaches it.
                Step::Done(()) => match tokio::time::timeout(wait, &mut completed).await {
                    Ok(_) => Step::Done(()),
                    Err(_) => Step::Retry("the join marker did not arrive".into()),
                },
                other => other,
            };
            match step {
                Step::Done(()) => break Ok(()),
                Step::Fail(error) => break Err(error),
                Step::Retry(reason) => {
                    if let Err(error) = route.pause(reason).await {
                        break Err(error);
                    }
                }
            }
        };
        // No pending entry outlives this call; one that is already gone was admitted by its
        // marker, and the session is a member.
        let mut state = interest.state.lock().expect("interest lock poisoned");
        match state.pending.iter().position(|p| p.marker == marker) {
            Some(i) => {
                state.pending.swap_remove(i);
                result.map(|()| true)
            }
            None => Ok(true),
        }
    }

    /// Drops the room's subscription when no local member and no pending join needs it.
    fn close_if_unused(&self, interest: &Arc<Interest>) {
        let room = &interest.room;
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.closed || !state.pending.is_empty() || self.hub.member_count(room) > 0 {
            return;
        }
        state.closed = true;
        drop(state);
        let mut interests = self.interests.lock().expect("interests lock poisoned");
        if interests
            .get(room)
            .is_some_and(|i| Arc::ptr_eq(i, interest))
        {
            interests.remove(room);
            self.metrics.mesh_subscribed_rooms.dec();
        }
        drop(interests);
        // Dropping the subscriber (with its task) unsubscribes.
        if let Some(task) = interest.task.lock().expect("task lock poisoned").take() {
            task.abort();
        }
    }

    pub(super) fn leave(&self, room: &RoomName, member: &Arc<Member>) {
        self.hub.remove(room, member.key);
        let interest = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .cloned();
        if let Some(interest) = interest {
            self.close_if_unused(&interest);
        }
    }

    pub(super) fn room_info(&self, room: &RoomName) -> RoomInfo {
        let position = self
            .owned
            .get(room)
            .and_then(|cell| cell.try_lock().ok().map(|held| held.room.position()))
            .or_else(|| {
                let interest = self
                    .interests
                    .lock()
                    .expect("interests lock poisoned")
                    .get(room)
                    .cloned();
                interest.and_then(|i| {
                    i.state
                        .lock()
                        .expect("interest lock poisoned")
                        .order
                        .position()
                })
            });
        RoomInfo {
            room: room.to_string(),
            epoch: position.map(|p| p.0),
            seq: position.map(|p| p.1),
            local_members: self.hub.member_count(room),
        }
    }
}
