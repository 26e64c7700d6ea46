//! A session's reliable publishes between reading them and answering them.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use futures_util::FutureExt;

use crate::cluster::BusError;
use crate::context::NodeContext;
use crate::room::{Publication, RoomName, Sequenced};

/// Publishes a session may have accepted and not yet had sequenced, in count and payload bytes;
/// past either, the session stops reading until the bus catches up (TCP pushes back).
const MAX_UNSEQUENCED_PUBLISHES: usize = 256;
const MAX_UNSEQUENCED_BYTES: usize = 1024 * 1024;

/// What the acknowledgement of a publish needs once the bus has sequenced it.
pub(super) struct Unacked {
    pub request_id: u64,
    pub room: RoomName,
    pub client_msg_id: String,
}

type Sequencing = tokio::task::JoinHandle<Vec<Result<Sequenced, BusError>>>;

/// A session's reliable publishes between reading and answering. One batch is at the bus at a
/// time, so a session's publishes take their positions in the order it sent them; what is read
/// meanwhile waits and goes as the next batch. A batch that is not done at once (its room's
/// owner is another node) runs on a task of its own, never left half done or unpolled while the
/// session awaits something else. Bounded by [`MAX_UNSEQUENCED_PUBLISHES`] and
/// [`MAX_UNSEQUENCED_BYTES`]: the read loop stops reading while [`Pipeline::has_room`] is false.
#[derive(Default)]
pub(super) struct Pipeline {
    /// The batch at the bus, when it was not done at once.
    sequencing: Option<Sequencing>,
    in_flight: Vec<Unacked>,
    in_flight_bytes: usize,
    waiting: Vec<(Unacked, Publication)>,
    waiting_bytes: usize,
}

impl Pipeline {
    pub(super) fn has_room(&self) -> bool {
        self.waiting.len() + self.in_flight.len() < MAX_UNSEQUENCED_PUBLISHES
            && self.waiting_bytes + self.in_flight_bytes < MAX_UNSEQUENCED_BYTES
    }

    pub(super) fn is_busy(&self) -> bool {
        self.sequencing.is_some()
    }

    pub(super) fn enqueue(&mut self, request_id: u64, publication: Publication) {
        let unacked = Unacked {
            request_id,
            room: publication.room.clone(),
            client_msg_id: publication.client_msg_id.clone(),
        };
        self.waiting_bytes += publication.payload.len();
        self.waiting.push((unacked, publication));
    }

    /// Sends what is waiting to the bus as one batch, unless a batch is out already (it goes
    /// when that one is done). Standalone, or for rooms this node owns, the batch is usually
    /// done at once: its answers are returned, and no task is spawned.
    pub(super) fn start(
        &mut self,
        ctx: &Arc<NodeContext>,
    ) -> Option<Vec<(Unacked, Result<Sequenced, BusError>)>> {
        if self.sequencing.is_some() || self.waiting.is_empty() {
            return None;
        }
        let (unacked, publications): (Vec<Unacked>, Vec<Publication>) =
            std::mem::take(&mut self.waiting).into_iter().unzip();
        self.in_flight = unacked;
        self.in_flight_bytes = std::mem::take(&mut self.waiting_bytes);
        let bus_ctx = ctx.clone();
        let mut batch = Box::pin(async move { bus_ctx.bus.publish_batch(publications).await });
        match (&mut batch).now_or_never() {
            Some(results) => Some(self.answers(results)),
            None => {
                // On the node's tracker: a drain waits for it like for any session task.
                self.sequencing = Some(ctx.tracker.spawn(batch));
                None
            }
        }
    }

    /// Resolves with the answers of the batch at the bus (polled only while [`Self::is_busy`]).
    /// A batch whose task failed answers every publish with UNAVAILABLE.
    pub(super) fn done(
        &mut self,
    ) -> impl Future<Output = Vec<(Unacked, Result<Sequenced, BusError>)>> + '_ {
        std::future::poll_fn(move |cx| {
            let Some(batch) = self.sequencing.as_mut() else {
                return Poll::Pending;
            };
            let results = match std::pin::Pin::new(batch).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(results)) => results,
                Poll::Ready(Err(error)) => {
                    tracing::error!(%error, "a publish batch failed");
                    Vec::new()
                }
            };
            self.sequencing = None;
            Poll::Ready(self.answers(results))
        })
    }

    /// Pairs the publishes in flight with the bus's results.
    fn answers(
        &mut self,
        results: Vec<Result<Sequenced, BusError>>,
    ) -> Vec<(Unacked, Result<Sequenced, BusError>)> {
        self.in_flight_bytes = 0;
        let failed = || {
            Err(BusError::Unavailable(
                "the publish could not complete".into(),
            ))
        };
        let results = results.into_iter().chain(std::iter::repeat_with(failed));
        std::mem::take(&mut self.in_flight)
            .into_iter()
            .zip(results)
            .collect()
    }

    /// When the session ends: the batch at the bus finishes on its own task, and what was read
    /// after it is still sequenced, after it (a client that publishes and then closes publishes
    /// all it sent). Nobody is left to acknowledge either.
    pub(super) fn detach(&mut self, ctx: &Arc<NodeContext>) {
        let sequencing = self.sequencing.take();
        let (_, publications): (Vec<Unacked>, Vec<Publication>) =
            std::mem::take(&mut self.waiting).into_iter().unzip();
        if sequencing.is_none() && publications.is_empty() {
            return;
        }
        let bus_ctx = ctx.clone();
        ctx.tracker.spawn(async move {
            if let Some(batch) = sequencing {
                let _ = batch.await;
            }
            if !publications.is_empty() {
                bus_ctx.bus.publish_batch(publications).await;
            }
        });
    }
}
