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
use super::recovery::{Comeback, Recent};
use super::routing::Route;
use super::wire::{ORIGIN_HEADER, RoomMessage, Step};
use crate::cluster::order::{Effect, Output, RoomOrder};
use crate::cluster::{BusError, RoomInfo, joined_frame};
use crate::member::Member;
use crate::proto::mesh::{self as wire, reply, request};

use crate::proto::{self, ServerFrame, server_frame};
use crate::room::{Recovery, RoomName};
use crate::telemetry::{KeyValue, Span, SpanKind, Trace, attr, position};

/// A join waiting for the owner's sync marker to arrive on the room subject.
struct PendingJoin {
    marker: u64,
    member: Arc<Member>,
    request_id: u64,
    comeback: Comeback,
    done: oneshot::Sender<Admission>,
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
    /// What this node delivered last, for admitting members that come back.
    recent: Recent,
}

/// How a join at a position ended.
enum Entered {
    Yes,
    /// The interest closed meanwhile: take a fresh one.
    Closed,
    /// The member came back and is not admitted yet (see [`Admission`]).
    Behind(Admission),
}

/// What became of a member at its join position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Admitted,
    /// It came back and messages it misses are no longer among this node's recent ones: it is
    /// caught up from the owner again.
    Missing,
    /// It came back and the messages it misses do not fit its send queue now: these frames and
    /// bytes wait for room, then it is caught up again.
    NoRoom(usize, usize),
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
                // The owner's `room.sequence` context, on a sequenced message (telemetry on).
                let trace = if self.telemetry.is_on() {
                    Trace::from_nats(message.headers.as_ref())
                } else {
                    Trace::default()
                };
                self.on_room_message(&interest, message.payload, trace);
            }
        }
    }

    /// Delivers what the room's subject brought. A sequenced message with a trace context is
    /// delivered in a `room.deliver` span (one per node and message, not per member), a child
    /// of the owner's `room.sequence`: it covers handing the message to the room's order and
    /// the fan-out that releases, and counts the sessions reached (those of messages the order
    /// held back and releases now included).
    fn on_room_message(&self, interest: &Interest, payload: Bytes, trace: Trace) {
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
                let mut span = match trace.is_some() {
                    true => self
                        .telemetry
                        .span("room.deliver", SpanKind::Consumer, &trace, || {
                            let [epoch, seq, _] = position(epoch, seq, false);
                            [
                                KeyValue::new(attr::ROOM, interest.room.to_string()),
                                epoch,
                                seq,
                            ]
                        }),
                    false => Span::default(),
                };
                let delivered = self.deliver_in_order(interest, epoch, seq, frame, marker);
                span.record(|| [KeyValue::new(attr::DELIVERIES, delivered as i64)]);
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
            recent,
            ..
        } = state;
        let mut emit = |output: Output| match output {
            Output::Frame { epoch, seq, frame } => {
                delivered += self.hub.deliver(room, &frame);
                recent.push(epoch, seq, frame);
            }
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
                    let admitted = self.enter(
                        interest,
                        recent,
                        (&join.member, join.request_id, join.comeback),
                        epoch,
                        seq,
                    );
                    let _ = join.done.send(admitted);
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
    ///
    /// A member that came back with a position first gets the messages it still misses from
    /// what this node delivered last; when some of them are no longer here, or do not fit its
    /// send queue now, it is not admitted, and its join catches it up again.
    fn enter(
        &self,
        interest: &Interest,
        recent: &Recent,
        (member, request_id, comeback): (&Arc<Member>, u64, Comeback),
        epoch: u64,
        seq: u64,
    ) -> Admission {
        let (recovery, replayed) = match comeback {
            Comeback::Fresh => (None, 0),
            Comeback::Reset {
                epoch,
                oldest_seq,
                replayed,
            } => (Some(Recovery::Reset { epoch, oldest_seq }), replayed),
            Comeback::Recover { since, replayed } => {
                if since > (epoch, seq) {
                    return Admission::Missing;
                }
                let tail = if since.0 == epoch {
                    recent.between(epoch, since.1, seq)
                } else {
                    None
                };
                let Some(tail) = tail else {
                    return Admission::Missing;
                };
                let bytes = tail.iter().map(Bytes::len).sum();
                if !member.has_room(tail.len(), bytes) {
                    return Admission::NoRoom(tail.len(), bytes);
                }
                let count = tail.len() as u64;
                for frame in tail {
                    member.push(frame);
                }
                let recovered = Recovery::Recovered {
                    from_seq: since.1 + 1,
                    to_seq: seq,
                };
                (Some(recovered), replayed + count)
            }
        };
        member.push_frame(&joined_frame(
            request_id,
            &interest.room,
            epoch,
            seq,
            recovery,
            replayed,
        ));
        self.hub.add(&interest.room, member);
        Admission::Admitted
    }

    pub(super) async fn join(
        self: &Arc<Self>,
        room: &RoomName,
        member: &Arc<Member>,
        request_id: Option<u64>,
        since: Option<(u64, u64)>,
    ) -> Result<(), BusError> {
        let mut route = Route::new(&self.config);
        let mut comeback = Comeback::Fresh;
        loop {
            // Subscribed before any catching up, so every message after the owner's last page
            // reaches this node (and `Recent`).
            let interest = self.interest(room).await?;
            if let (Some(since), Comeback::Fresh) = (since, comeback) {
                comeback = match self.catch_up(room, member, since, 0).await {
                    Ok(comeback) => comeback,
                    Err(error) => {
                        self.close_if_unused(&interest);
                        return Err(error);
                    }
                };
            }
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
                    self.join_at_position(&interest, member, request_id, comeback, &mut route)
                        .await
                }
            };
            match outcome {
                Ok(Entered::Yes) => return Ok(()),
                Ok(Entered::Closed) => continue, // the interest closed under us: take a fresh one
                Ok(Entered::Behind(admission)) => {
                    if let Admission::NoRoom(frames, bytes) = admission
                        && !member.room_for(frames, bytes).await
                    {
                        self.close_if_unused(&interest);
                        return Err(BusError::Unavailable("the session is closing".into()));
                    }
                    // More went by meanwhile than this node keeps: catch up from the owner.
                    if let Comeback::Recover { since, replayed } = comeback {
                        comeback = match self.catch_up(room, member, since, replayed).await {
                            Ok(comeback) => comeback,
                            Err(error) => {
                                self.close_if_unused(&interest);
                                return Err(error);
                            }
                        };
                    }
                    continue;
                }
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
        comeback: Comeback,
        route: &mut Route,
    ) -> Result<Entered, BusError> {
        // Marker 0 is an epoch's start, never a join.
        let marker = crate::ids::random_u64().max(1);
        let (done, mut completed) = oneshot::channel();
        {
            let mut state = interest.state.lock().expect("interest lock poisoned");
            if state.closed {
                return Ok(Entered::Closed);
            }
            let generation_current = state.generation == self.generation();
            // A member that already has more than this node delivered (it came from a node
            // that was ahead) waits for the marker: admitted here now, it would get the
            // messages in between again.
            let at_once = state
                .order
                .position()
                .filter(|_| generation_current)
                .filter(|&at| !matches!(comeback, Comeback::Recover { since, .. } if since > at));
            if let Some((epoch, seq)) = at_once {
                return Ok(
                    match self.enter(
                        interest,
                        &state.recent,
                        (member, request_id, comeback),
                        epoch,
                        seq,
                    ) {
                        Admission::Admitted => Entered::Yes,
                        other => Entered::Behind(other),
                    },
                );
            }
            state.pending.push(PendingJoin {
                marker,
                member: member.clone(),
                request_id,
                comeback,
                done,
            });
        }
        let mut admitted = None;
        let wait = Duration::from_millis(self.config.request_timeout_ms);
        let result = loop {
            if let Err(error) = self.check_link() {
                break Err(error);
            }
            let step = match self.owner_of(&interest.room) {
                None => Step::Retry("the mesh is settling".into()),
                Some(owner) if owner == self.node_id => {
                    // This node sequences the room: its own position, as a local marker.
                    match self.lock_owned_out(&interest.room).await {
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
                    Ok(Ok(entered)) => {
                        admitted = Some(entered);
                        Step::Done(())
                    }
                    Ok(Err(_)) => Step::Retry("the join was dropped".into()),
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
        if let Some(i) = state.pending.iter().position(|p| p.marker == marker) {
            state.pending.swap_remove(i);
            result?;
        }
        // Gone while the wait gave up: its marker decided just then.
        let admitted = admitted.or_else(|| completed.try_recv().ok());
        Ok(match admitted {
            Some(Admission::Admitted) | None => Entered::Yes,
            Some(other) => Entered::Behind(other),
        })
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
