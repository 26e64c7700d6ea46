//! A session's reliable publishes between reading them and answering them.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use futures_util::FutureExt;

use crate::cluster::BusError;
use crate::context::NodeContext;
use crate::room::{Publication, RoomName, Sequenced};
use crate::telemetry::Span;

/// Publishes a session may have accepted and not yet had sequenced, in count and payload bytes;
/// past either, the session stops reading until the bus catches up (TCP pushes back).
const MAX_UNSEQUENCED_PUBLISHES: usize = 256;
const MAX_UNSEQUENCED_BYTES: usize = 1024 * 1024;

/// What the acknowledgement of a publish needs once the bus has sequenced it.
pub(super) struct Unacked {
    pub request_id: u64,
    pub room: RoomName,
    pub client_msg_id: String,
    /// The publish's `room.publish` span, ended with its answer (nothing when telemetry is off).
    pub span: Span,
}

type Sequencing = tokio::task::JoinHandle<Vec<Result<Sequenced, BusError>>>;

/// A batch at the bus that was not done at once.
struct Running {
    task: Sequencing,
    unacked: Vec<Unacked>,
    bytes: usize,
}

/// A session's reliable publishes between reading and answering.
///
/// Order is kept per room: a room has at most one batch at the bus at a time, so a session's
/// publishes to it take their positions in the order it sent them, and what is read meanwhile
/// for that room waits and goes with its next batch. Rooms do not wait for each other: while a
/// batch for a room whose owner is away (failing over) waits, publishes to other rooms go on.
/// Standalone, or for rooms this node owns, a batch is usually done at once; one that is not
/// runs on a task of its own, never left half done or unpolled while the session awaits
/// something else. Bounded by [`MAX_UNSEQUENCED_PUBLISHES`] and [`MAX_UNSEQUENCED_BYTES`]: the
/// read loop stops reading while [`Pipeline::has_room`] is false.
#[derive(Default)]
pub(super) struct Pipeline {
    running: Vec<Running>,
    in_flight: usize,
    in_flight_bytes: usize,
    waiting: Vec<(Unacked, Publication)>,
    waiting_bytes: usize,
}

/// Publishes answered, each with what the bus said.
pub(super) type Answers = Vec<(Unacked, Result<Sequenced, BusError>)>;

impl Pipeline {
    pub(super) fn has_room(&self) -> bool {
        self.waiting.len() + self.in_flight < MAX_UNSEQUENCED_PUBLISHES
            && self.waiting_bytes + self.in_flight_bytes < MAX_UNSEQUENCED_BYTES
    }

    pub(super) fn is_busy(&self) -> bool {
        !self.running.is_empty()
    }

    pub(super) fn enqueue(&mut self, request_id: u64, publication: Publication, span: Span) {
        let unacked = Unacked {
            request_id,
            room: publication.room.clone(),
            client_msg_id: publication.client_msg_id.clone(),
            span,
        };
        self.waiting_bytes += publication.payload.len();
        self.waiting.push((unacked, publication));
    }

    /// Sends every waiting publish whose room has no batch at the bus, as one batch (the rest
    /// wait for their room's batch). Standalone, or for rooms this node owns, the batch is
    /// usually done at once: its answers are returned, and no task is spawned.
    pub(super) fn start(&mut self, ctx: &Arc<NodeContext>) -> Option<Answers> {
        if self.waiting.is_empty() {
            return None;
        }
        let busy = |room: &RoomName| {
            self.running
                .iter()
                .any(|r| r.unacked.iter().any(|u| u.room == *room))
        };
        let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(unacked, _)| !busy(&unacked.room));
        self.waiting = held;
        if ready.is_empty() {
            return None;
        }
        let bytes: usize = ready.iter().map(|(_, p)| p.payload.len()).sum();
        self.waiting_bytes -= bytes;
        let (unacked, publications): (Vec<Unacked>, Vec<Publication>) = ready.into_iter().unzip();
        let bus_ctx = ctx.clone();
        let mut batch = Box::pin(async move { bus_ctx.bus.publish_batch(publications).await });
        match (&mut batch).now_or_never() {
            Some(results) => Some(pair(unacked, results)),
            None => {
                self.in_flight += unacked.len();
                self.in_flight_bytes += bytes;
                // On the node's tracker: a drain waits for it like for any session task.
                self.running.push(Running {
                    task: ctx.tracker.spawn(batch),
                    unacked,
                    bytes,
                });
                None
            }
        }
    }

    /// Resolves with the answers of the first batch at the bus to finish (polled only while
    /// [`Self::is_busy`]). A batch whose task failed answers every publish with UNAVAILABLE.
    pub(super) fn done(&mut self) -> impl Future<Output = Answers> + '_ {
        std::future::poll_fn(move |cx| {
            for i in 0..self.running.len() {
                let results = match std::pin::Pin::new(&mut self.running[i].task).poll(cx) {
                    Poll::Pending => continue,
                    Poll::Ready(Ok(results)) => results,
                    Poll::Ready(Err(error)) => {
                        tracing::error!(%error, "a publish batch failed");
                        Vec::new()
                    }
                };
                let finished = self.running.swap_remove(i);
                self.in_flight -= finished.unacked.len();
                self.in_flight_bytes -= finished.bytes;
                return Poll::Ready(pair(finished.unacked, results));
            }
            Poll::Pending
        })
    }

    /// When the session ends: the batches at the bus finish on their own tasks, and what was
    /// read after them is still sequenced, after them (a client that publishes and then closes
    /// publishes all it sent). Nobody is left to acknowledge any of it.
    pub(super) fn detach(&mut self, ctx: &Arc<NodeContext>) {
        let running = std::mem::take(&mut self.running);
        let (_, publications): (Vec<Unacked>, Vec<Publication>) =
            std::mem::take(&mut self.waiting).into_iter().unzip();
        if running.is_empty() && publications.is_empty() {
            return;
        }
        let bus_ctx = ctx.clone();
        ctx.tracker.spawn(async move {
            for batch in running {
                let _ = batch.task.await;
            }
            if !publications.is_empty() {
                bus_ctx.bus.publish_batch(publications).await;
            }
        });
    }
}

/// Pairs publishes with the bus's results (one each, in order; missing ones failed).
fn pair(unacked: Vec<Unacked>, results: Vec<Result<Sequenced, BusError>>) -> Answers {
    let failed = || {
        Err(BusError::Unavailable(
            "the publish could not complete".into(),
        ))
    };
    let results = results.into_iter().chain(std::iter::repeat_with(failed));
    unacked.into_iter().zip(results).collect()
}
