//! Sequencing as a room's owner: a publication takes its position under the room's lock and is
//! then stored (durable rooms), published to the room's subject and acknowledged.
//!
//! Two steps, so a run of publications to one room overlaps: [`Inner::begin`] takes the position
//! and, in a durable room, sends the append to JetStream, all under the lock and in order (the
//! room's records reach the stream in sequence order); [`Inner::finish`] waits for the store
//! outside the lock and sends the message to the members once every earlier one is out (see
//! [`SentThrough`]). A run's appends are then in flight together instead of one round trip each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::OwnedMutexGuard;

use super::store::{PendingAppend, StoreError};
use super::wire::{self as room_wire, HEADER, KIND_MESSAGE, Step};
use super::{Inner, MOVED_MAX, MOVED_TTL_MS};
use crate::clock::{mono_ms, wall_ms};
use crate::cluster::BusError;
use crate::cluster::owners::{Cell, Held, SentThrough};
use crate::room::{Publication, RoomName, Sequenced, Sequencing};
use crate::telemetry::{KeyValue, Span, SpanKind, Trace, attr, position};

/// A publication that has its position; what is left to do for it.
pub(super) struct Begun {
    cell: Cell,
    generation: u64,
    epoch: u64,
    seq: u64,
    rest: Rest,
    /// The publication's `room.sequence` span (nothing when telemetry is off), ended by
    /// [`Inner::finish`].
    span: Span,
}

enum Rest {
    /// A durable room's message: its append is in flight.
    Storing {
        append: PendingAppend,
        sent: Arc<SentThrough>,
        bytes: Bytes,
    },
    /// Sent to the room's subject under the lock (a room without durable history).
    Sent,
    /// A retry of a message sequenced before, answered once that one is out (`None`: it is).
    Duplicate(Option<Arc<SentThrough>>),
}

impl Inner {
    /// Sequences a publication as the room's owner (see the module's documentation).
    pub(super) async fn sequence_here(self: &Arc<Self>, p: &Publication) -> Step<Sequenced> {
        match self.begin(p).await {
            Step::Done(begun) => self.finish(p, begun).await,
            Step::Retry(reason) => Step::Retry(reason),
            Step::Fail(error) => Step::Fail(error),
        }
    }

    /// Sequences a run of publications to one room, in order, as its owner: each begins in turn,
    /// and those begun finish together. The run stops at a publication that must be re-routed
    /// or failed for a reason other than its size (its step is the last), and once `budget` has
    /// passed before one begins (the rest are left out).
    pub(super) async fn sequence_run_here(
        self: &Arc<Self>,
        run: &[Publication],
        budget: Duration,
    ) -> Vec<Step<Sequenced>> {
        let started = Instant::now();
        let mut begun = Vec::with_capacity(run.len());
        for p in run {
            if started.elapsed() > budget && !begun.is_empty() {
                break;
            }
            let step = self.begin(p).await;
            let last = match &step {
                Step::Done(_) | Step::Fail(BusError::TooLarge(_)) => false,
                Step::Retry(_) | Step::Fail(_) => true,
            };
            begun.push((p, step));
            if last {
                break;
            }
        }
        futures_util::future::join_all(begun.into_iter().map(|(p, step)| async move {
            match step {
                Step::Done(begun) => self.finish(p, begun).await,
                Step::Retry(reason) => Step::Retry(reason),
                Step::Fail(error) => Step::Fail(error),
            }
        }))
        .await
    }

    /// [`Inner::take_position`] in the publication's `room.sequence` span: a child of the span
    /// it came with (`room.publish` here, `mesh.forward` from another node), with the room, its
    /// epoch and seq; the message goes out to the members with this span's context in its NATS
    /// headers. The span ends once the publication is finished.
    async fn begin(self: &Arc<Self>, p: &Publication) -> Step<Begun> {
        let kind = match p.trace.is_remote() {
            true => SpanKind::Server,
            false => SpanKind::Internal,
        };
        let mut span = self.telemetry.span("room.sequence", kind, &p.trace, || {
            [KeyValue::new(attr::ROOM, p.room.to_string())]
        });
        match self.take_position(p, &span.trace()).await {
            Step::Done(mut begun) => {
                let duplicate = matches!(begun.rest, Rest::Duplicate(_));
                let durable = matches!(begun.rest, Rest::Storing { .. });
                span.record(|| {
                    let [epoch, seq, duplicate] = position(begun.epoch, begun.seq, duplicate);
                    [epoch, seq, duplicate, KeyValue::new(attr::DURABLE, durable)]
                });
                begun.span = span;
                Step::Done(begun)
            }
            Step::Retry(reason) => {
                span.fail(&reason);
                Step::Retry(reason)
            }
            Step::Fail(error) => {
                span.fail(&error);
                Step::Fail(error)
            }
        }
    }

    /// Takes the publication's position under the room's lock and starts what follows: a
    /// durable room's append is sent to JetStream; any other room's message is sent to the room's
    /// subject (with `trace` in its headers).
    async fn take_position(self: &Arc<Self>, p: &Publication, trace: &Trace) -> Step<Begun> {
        let mut held = match self.lock_owned(&p.room).await {
            Step::Done(held) => held,
            Step::Retry(r) => return Step::Retry(r),
            Step::Fail(e) => return Step::Fail(e),
        };
        let stream = match self.store.stream(&self.classes.of(&p.room)) {
            None => None,
            Some(Ok(stream)) => Some(stream),
            Some(Err(error)) => return Step::Fail(error.into()),
        };
        if let Some(stream) = &stream
            && held.fence.is_none()
        {
            match self.store.fence(stream, &p.room, &self.node_id).await {
                // The stream never holds more than the state it was pulled or pushed with.
                Ok(fenced) if fenced.last.is_none_or(|last| last <= held.room.position()) => {
                    held.fence = Some(fenced.fence);
                }
                Ok(_) | Err(StoreError::Fenced) => {
                    self.retire(held, &p.room);
                    return Step::Retry(format!("the state of {} is stale", p.room));
                }
                Err(error) => return Step::Fail(error.into()),
            }
        }
        // What cannot be published to the other nodes is refused before it takes a sequence.
        let fits = || {
            let size = HEADER
                + 64
                + p.payload.len()
                + p.room.as_str().len()
                + p.publisher.len()
                + p.client_msg_id.len();
            let max = self.nats.server_info().max_payload;
            if max > 0 && size > max {
                return Err(BusError::TooLarge(
                    max.saturating_sub(size - p.payload.len()),
                ));
            }
            Ok(())
        };
        let outcome = match self
            .owned
            .sequence(&mut held, p, mono_ms(), wall_ms(), fits)
        {
            Ok(outcome) => outcome,
            Err(error) => return Step::Fail(error),
        };
        let cell = OwnedMutexGuard::mutex(&held).clone();
        let generation = held.generation;
        let (epoch, seq, frame) = match outcome {
            Sequencing::Duplicate { epoch, seq } => {
                // The original may still be on its way (only in the state's own epoch).
                let sent = (held.room.position().0 == epoch).then(|| held.sent.clone());
                return Step::Done(Begun {
                    cell,
                    generation,
                    epoch,
                    seq,
                    rest: Rest::Duplicate(sent),
                    span: Span::default(),
                });
            }
            Sequencing::New { epoch, seq, frame } => (epoch, seq, frame),
        };
        let bytes = frame.encode_after(&room_wire::header(KIND_MESSAGE, epoch, seq));
        held.room.keep(seq, &bytes.slice(HEADER..), mono_ms());
        let begun = |rest| Begun {
            cell: cell.clone(),
            generation,
            epoch,
            seq,
            rest,
            span: Span::default(),
        };
        if let (Some(stream), Some(fence)) = (&stream, held.fence) {
            let append = self
                .store
                .start_append(
                    self,
                    (stream, fence),
                    &p.room,
                    (epoch, seq),
                    bytes.slice(HEADER..),
                )
                .await;
            return match append {
                Ok(append) => Step::Done(begun(Rest::Storing {
                    append,
                    sent: held.sent.clone(),
                    bytes,
                })),
                Err(error) => {
                    held.sent.fail();
                    self.retire(held, &p.room);
                    self.abandon(&p.room, epoch, seq);
                    Step::Fail(error.into())
                }
            };
        }
        if let Err(error) = self
            .send_traced(self.subject_room(&p.room), bytes, trace)
            .await
        {
            // The message took a position but never reached the NATS client: this state can
            // promise nothing any more (its dedupe memory names a message nobody will receive).
            // It is dropped; the room is taken over afresh, and the client retries.
            self.retire(held, &p.room);
            self.abandon(&p.room, epoch, seq);
            return Step::Fail(BusError::Unavailable(format!(
                "mesh publish failed: {error}"
            )));
        }
        held.sent.advance(seq);
        Step::Done(begun(Rest::Sent))
    }

    /// Finishes a begun publication outside the room's lock: stored, out to the members in
    /// sequence order, acknowledged. Ends its `room.sequence` span.
    async fn finish(&self, p: &Publication, mut begun: Begun) -> Step<Sequenced> {
        let mut span = std::mem::take(&mut begun.span);
        let step = self.complete(p, begun, &span).await;
        match &step {
            Step::Done(_) => {}
            Step::Retry(reason) => span.fail(reason),
            Step::Fail(error) => span.fail(error),
        }
        step
    }

    async fn complete(&self, p: &Publication, begun: Begun, span: &Span) -> Step<Sequenced> {
        let Begun {
            cell,
            generation,
            epoch,
            seq,
            rest,
            ..
        } = begun;
        match rest {
            Rest::Sent => {
                self.acknowledge(p, cell, generation, (epoch, seq), Some(true))
                    .await
            }
            Rest::Duplicate(sent) => {
                if let Some(sent) = sent
                    && !sent.reached(seq, self.bound()).await
                {
                    return Step::Fail(BusError::Unavailable(format!(
                        "the first copy of this message in {} was not stored; retry",
                        p.room
                    )));
                }
                self.acknowledge(p, cell, generation, (epoch, seq), None)
                    .await
            }
            Rest::Storing {
                append,
                sent,
                bytes,
            } => {
                let stored = append.stored(&self.store, self).await;
                match self
                    .send_stored(p, &sent, (generation, seq), stored, (bytes, &span.trace()))
                    .await
                {
                    Ok(()) => {
                        self.acknowledge(p, cell, generation, (epoch, seq), Some(false))
                            .await
                    }
                    Err(error) => {
                        sent.fail();
                        self.retire_cell(&cell, &p.room).await;
                        self.abandon(&p.room, epoch, seq);
                        Step::Fail(error)
                    }
                }
            }
        }
    }

    /// Sends a durable room's stored message to the members once every earlier one is out (see
    /// [`SentThrough`]), unless it was not stored, an earlier one failed, or the lease ended
    /// meanwhile (a stall: a new owner may be sequencing already, so the message is not sent;
    /// it stays in the history, and the publisher's retry goes to the new owner).
    async fn send_stored(
        &self,
        p: &Publication,
        sent: &SentThrough,
        (generation, seq): (u64, u64),
        stored: Result<(), StoreError>,
        (bytes, trace): (Bytes, &Trace),
    ) -> Result<(), BusError> {
        stored?;
        if !sent.reached(seq - 1, self.bound()).await {
            return Err(BusError::Unavailable(format!(
                "an earlier message of {} was not stored; retry",
                p.room
            )));
        }
        if generation != self.generation() || !self.lease_valid() {
            return Err(BusError::Unavailable(format!(
                "{} lost its ownership lease while storing in {}; retry",
                self.node_id, p.room
            )));
        }
        if let Err(error) = self
            .send_traced(self.subject_room(&p.room), bytes, trace)
            .await
        {
            return Err(BusError::Unavailable(format!(
                "mesh publish failed: {error}"
            )));
        }
        sent.advance(seq);
        Ok(())
    }

    /// Acknowledges a sequenced message (`sent`: `Some(true)` for one sent under the room's
    /// lock, abandoned if unconfirmed; `Some(false)` for a stored one; `None` for a duplicate
    /// answered from the dedupe memory).
    ///
    /// Only once the NATS server has the message (so every node with members receives it) and
    /// the lease still held after that: a node that lost the room meanwhile (stalled, cut off)
    /// answers UNAVAILABLE, and the client's retry with the same id goes to the new owner. A
    /// retried publish answered from the dedupe memory waits the same way for its original.
    async fn acknowledge(
        &self,
        p: &Publication,
        cell: Cell,
        generation: u64,
        (epoch, seq): (u64, u64),
        sent: Option<bool>,
    ) -> Step<Sequenced> {
        if let Err(error) = self.confirm().await {
            // Whether the others got the message is unknown: the state can promise nothing
            // after it, and is retired (the room is taken over afresh). A durable room's
            // message is stored, so it is the room's: its echo is delivered here like
            // everywhere it arrives (dropped only by members already past its epoch).
            self.retire_cell(&cell, &p.room).await;
            if sent == Some(true) {
                self.abandon(&p.room, epoch, seq);
            }
            return Step::Fail(BusError::Unavailable(format!(
                "the NATS server did not confirm the message: {error}"
            )));
        }
        if self.generation() != generation || !self.lease_valid() {
            return Step::Fail(BusError::Unavailable(format!(
                "{} lost its ownership lease while sequencing in {}; retry",
                self.node_id, p.room
            )));
        }
        // This node's own members get the message the way every other node's do: from the NATS
        // server, in the order it delivers the room's subject, so members here and elsewhere
        // never see different messages (even of one sequenced just before a stall or a cut).
        let duplicate = sent.is_none();
        Step::Done(Sequenced {
            epoch,
            seq,
            local_deliveries: if duplicate {
                0
            } else {
                self.hub.member_count(&p.room)
            },
            duplicate,
        })
    }

    /// How long one step waits on another (a store round trip, an earlier message going out).
    fn bound(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// [`Self::lock_owned`] for what promises the room's position to someone (a join marker, a
    /// page of the owner's history): once everything sequenced up to it is out.
    pub(super) async fn lock_owned_out(
        self: &Arc<Self>,
        room: &RoomName,
    ) -> Step<OwnedMutexGuard<Held>> {
        match self.lock_owned(room).await {
            Step::Done(held) if !self.all_out(&held).await => {
                Step::Retry(format!("{room} has messages on their way to the store"))
            }
            step => step,
        }
    }

    /// Whether everything sequenced in `held` has gone out (see [`SentThrough`]); `false` when
    /// a message failed or it did not happen in time (the state is then being retired).
    pub(super) async fn all_out(&self, held: &Held) -> bool {
        held.sent
            .reached(held.room.position().1, self.bound())
            .await
    }

    /// Drops a state that can promise nothing any more: the room is taken over afresh.
    pub(super) fn retire(&self, mut held: OwnedMutexGuard<Held>, room: &RoomName) {
        held.moved = true;
        let cell = OwnedMutexGuard::mutex(&held).clone();
        drop(held);
        self.owned.forget(room, &cell);
    }

    /// Retires a state whose lock is not held here (see [`Self::retire`]).
    async fn retire_cell(&self, cell: &Cell, room: &RoomName) {
        cell.lock().await.moved = true;
        self.owned.forget(room, cell);
    }

    /// Remembers that this node's messages of `room` in `epoch` from `seq` on were never
    /// confirmed: their echo is dropped here (see `Inner::abandoned`).
    fn abandon(&self, room: &RoomName, epoch: u64, seq: u64) {
        tracing::debug!(%room, epoch, seq, "mesh: message not confirmed; the room's state is retired");
        let now = mono_ms();
        let mut abandoned = self.abandoned.lock().expect("abandoned lock poisoned");
        abandoned.retain(|_, (_, _, at)| now.saturating_sub(*at) < MOVED_TTL_MS);
        if abandoned.len() >= MOVED_MAX {
            return;
        }
        let entry = abandoned.entry(room.clone()).or_insert((epoch, seq, now));
        if entry.0 == epoch {
            entry.1 = entry.1.min(seq);
        } else {
            *entry = (epoch, seq, now);
        }
    }

    /// Whether `(epoch, seq)` of `room` is one of this node's abandoned messages.
    pub(super) fn is_abandoned(&self, room: &RoomName, epoch: u64, seq: u64) -> bool {
        self.abandoned
            .lock()
            .expect("abandoned lock poisoned")
            .get(room)
            .is_some_and(|(e, from, _)| *e == epoch && seq >= *from)
    }
}
