//! Routing publishes to a room's owner: here when this node owns the room, otherwise forwarded
//! to the owner (several per request), re-routed with backoff while the ring changes; and the
//! node-to-node request loop that serves forwarded publishes, join syncs and hand-offs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use tokio::time::Instant;

use super::Inner;
use super::link::RequestFailure;
use super::wire::{KIND_UNRELIABLE, ORIGIN_HEADER, Step};
use crate::clock::wall_ms;
use crate::cluster::BusError;
use crate::config::MeshConfig;
use crate::fanout::UnreliableReport;
use crate::proto::mesh::{self as wire, reply, request};
use crate::room::{Publication, RoomName, Sequenced};
use crate::telemetry::{KeyValue, SpanKind, Trace, attr};

/// Publications sent to an owner in one request at most.
const MAX_FORWARD_BATCH: usize = 64;

/// The pause-and-retry budget of one routed request.
pub(super) struct Route {
    deadline: Instant,
    attempt: u32,
}

impl Route {
    pub(super) fn new(config: &MeshConfig) -> Self {
        Self {
            deadline: Instant::now() + Duration::from_millis(config.route_deadline_ms),
            attempt: 0,
        }
    }

    pub(super) async fn pause(&mut self, reason: String) -> Result<(), BusError> {
        let delay = Duration::from_millis((20u64 << self.attempt.min(5)).min(400));
        if Instant::now() + delay > self.deadline {
            return Err(BusError::Unavailable(reason));
        }
        self.attempt += 1;
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

impl Inner {
    /// Serves the requests other nodes send this one, each on a task of its own (at most
    /// `MAX_CONCURRENT_REQUESTS` at once).
    pub(super) async fn request_loop(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(message) = requests.next().await {
            let Ok(permit) = self.requests.clone().acquire_owned().await else {
                break;
            };
            let inner = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Some(reply_to) = message.reply else {
                    return;
                };
                // Only a forwarded publish carries a trace context; off, nothing is looked up.
                let trace = if inner.telemetry.is_on() {
                    Trace::from_nats(message.headers.as_ref())
                } else {
                    Trace::default()
                };
                let kind = match wire::Request::decode(message.payload) {
                    Ok(wire::Request { kind: Some(kind) }) => inner.serve(kind, trace).await,
                    _ => reply::Kind::Unavailable("undecodable request".into()),
                };
                let reply = wire::Reply { kind: Some(kind) }.encode_to_vec();
                if let Err(error) = inner.send(reply_to, Bytes::from(reply)).await {
                    tracing::debug!(%error, "mesh: reply not sent");
                }
            });
        }
    }

    async fn serve(self: &Arc<Self>, kind: request::Kind, trace: Trace) -> reply::Kind {
        let parse = |room: &str| RoomName::parse_any(room, self.rooms.max_name_bytes);
        match kind {
            request::Kind::Forward(f) => self.serve_forward(f, trace).await,
            request::Kind::ForwardBatch(batch) => {
                // In order, overlapping (see `sequence_run_here`). A publish that must be
                // re-routed ends the batch (its reply is the last), and so does half a
                // request's time spent here: the sender gives up on a request after
                // `request_timeout_ms` and sends it again, and a re-sent batch must not find
                // this one still sequencing.
                let budget = Duration::from_millis(self.config.request_timeout_ms / 2);
                let mut run = Vec::with_capacity(batch.publishes.len());
                let mut invalid = None;
                for f in batch.publishes {
                    match self.forwarded(f, &trace) {
                        Ok(p) => run.push(p),
                        Err(reply) => {
                            invalid = Some(reply);
                            break;
                        }
                    }
                }
                let mut replies: Vec<_> = self
                    .sequence_run_here(&run, budget)
                    .await
                    .into_iter()
                    .map(|step| wire::Reply {
                        kind: Some(forward_reply(step)),
                    })
                    .collect();
                // The refusal of an invalid publish follows the run before it, when the run was
                // not cut short (the sender reads up to the first refusal).
                if let Some(kind) = invalid.filter(|_| replies.len() == run.len()) {
                    replies.push(wire::Reply { kind: Some(kind) });
                }
                reply::Kind::Batch(wire::BatchReply { replies })
            }
            request::Kind::Sync(s) => {
                let Ok(room) = parse(&s.room) else {
                    return reply::Kind::Unavailable("invalid room name".into());
                };
                match self.sync_here(&room, s.marker).await {
                    Step::Done(()) => reply::Kind::Done(true),
                    Step::Retry(reason) => reply::Kind::NotOwner(reason),
                    Step::Fail(error) => reply::Kind::Unavailable(error.to_string()),
                }
            }
            request::Kind::Release(r) => match parse(&r.room) {
                Ok(room) => self.release(&room, &r.to_node).await,
                Err(_) => reply::Kind::Done(true),
            },
            request::Kind::Ping(_) => reply::Kind::Done(true),
            request::Kind::History(ask) => self.serve_history(ask).await,
            request::Kind::PresenceReport(report) => self.serve_presence_report(report),
            request::Kind::PresenceQuery(q) => self.serve_presence_query(q),
            request::Kind::Handoff(state) => match parse(&state.room) {
                Ok(room) => self.take_handoff(room, state),
                Err(_) => reply::Kind::Done(true),
            },
        }
    }

    async fn serve_forward(self: &Arc<Self>, f: wire::Forward, trace: Trace) -> reply::Kind {
        match self.forwarded(f, &trace) {
            Ok(publication) => forward_reply(self.sequence_here(&publication).await),
            Err(reply) => reply,
        }
    }

    /// The publication a forward carries, or the reply that refuses it. It belongs to the
    /// trace its own `traceparent` names (a batch's later publishes), else to the request's
    /// (`trace`, from its NATS headers).
    fn forwarded(&self, f: wire::Forward, trace: &Trace) -> Result<Publication, reply::Kind> {
        let Ok(room) = RoomName::parse_any(&f.room, self.rooms.max_name_bytes) else {
            return Err(reply::Kind::Unavailable("invalid room name".into()));
        };
        let trace = match f.traceparent.as_str() {
            "" => trace.clone(),
            own if self.telemetry.is_on() => Trace::from_traceparent(own, None),
            _ => Trace::default(),
        };
        Ok(Publication {
            room,
            payload: f.payload,
            publisher: Arc::from(f.publisher.as_str()),
            client_msg_id: f.client_msg_id,
            trace,
        })
    }

    /// The owner in this node's view, once settled.
    pub(super) fn owner_of(&self, room: &RoomName) -> Option<Arc<str>> {
        if !self.settled() {
            return None;
        }
        self.view().ring.owner(room.as_str()).cloned()
    }

    pub(super) async fn publish_batch(
        self: &Arc<Self>,
        publications: Vec<Publication>,
    ) -> Vec<Result<Sequenced, BusError>> {
        // One run per room, in the order given; runs of different rooms proceed concurrently.
        let total = publications.len();
        let mut runs: Vec<(Vec<usize>, Vec<Publication>)> = Vec::new();
        for (i, p) in publications.into_iter().enumerate() {
            match runs.iter_mut().find(|(_, run)| run[0].room == p.room) {
                Some((indices, run)) => {
                    indices.push(i);
                    run.push(p);
                }
                None => runs.push((vec![i], vec![p])),
            }
        }
        let outcomes =
            futures_util::future::join_all(runs.iter().map(|(_, run)| self.publish_run(run))).await;
        let mut results: Vec<Option<Result<Sequenced, BusError>>> =
            std::iter::repeat_with(|| None).take(total).collect();
        for ((indices, _), outcome) in runs.iter().zip(outcomes) {
            for (&i, result) in indices.iter().zip(outcome) {
                results[i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every publication has a result"))
            .collect()
    }

    /// Sequences publications to one room, in order: here when this node owns the room,
    /// otherwise at the owner, as many per request as fit. Whatever must be re-routed (the owner
    /// changed, the mesh is settling, the owner did not answer) is retried in order until
    /// `route_deadline_ms`; then it fails with the retryable UNAVAILABLE.
    pub(super) async fn publish_run(
        self: &Arc<Self>,
        run: &[Publication],
    ) -> Vec<Result<Sequenced, BusError>> {
        let mut results = Vec::with_capacity(run.len());
        let mut route = Route::new(&self.config);
        let mut settled = 0;
        while results.len() < run.len() {
            // Each publication gets the whole re-routing budget from where the previous one
            // settled, as a single publish would.
            if results.len() > settled {
                settled = results.len();
                route = Route::new(&self.config);
            }
            let rest = &run[results.len()..];
            // Done: progress (the results say which); Retry: pause, then re-route; Fail: the
            // rest of the run fails with it.
            let step = match self.check_link() {
                Err(error) => Step::Fail(error),
                Ok(()) => match self.owner_of(&rest[0].room) {
                    None => Step::Retry("the mesh is settling".to_string()),
                    Some(owner) if owner == self.node_id => {
                        // Each failed publication is its own answer (too large, say); one to
                        // re-route ends the run's steps.
                        let mut next = Step::Done(());
                        for step in self.sequence_run_here(rest, Duration::MAX).await {
                            match step {
                                Step::Done(sequenced) => results.push(Ok(sequenced)),
                                Step::Fail(error) => results.push(Err(error)),
                                Step::Retry(reason) => next = Step::Retry(reason),
                            }
                        }
                        next
                    }
                    Some(owner) => {
                        let (done, retry) = self.forward(&owner, rest).await;
                        results.extend(done);
                        retry.map_or(Step::Done(()), Step::Retry)
                    }
                },
            };
            let failed = match step {
                Step::Done(()) => continue,
                Step::Fail(error) => error,
                Step::Retry(reason) => match route.pause(reason).await {
                    Ok(()) => continue,
                    Err(error) => error,
                },
            };
            results.extend(std::iter::repeat_n(Err(failed), run.len() - results.len()));
        }
        results
    }

    /// Sends the first publications of `rest` (as many as fit one request the owner
    /// understands) to `owner`. Returns the results of those it settled, in order, and, when the
    /// rest must be re-routed after a pause, why. Fewer results and no reason: send the rest at
    /// once.
    ///
    /// Traced (telemetry on), the request is one `mesh.forward` span, a child of the first
    /// publication's `room.publish` span, and its context travels in the request's NATS
    /// headers: the owner's `room.sequence` of that publication is its child. Each publication
    /// is a trace of its own, though, and a batch carries several: the later ones carry their
    /// own context in their `Forward.traceparent`, so their sequencing joins their own trace,
    /// and the forward span links to them. (One header for the whole request would put every
    /// later publication's sequencing and delivery into the first one's trace.)
    pub(super) async fn forward(
        &self,
        owner: &str,
        rest: &[Publication],
    ) -> (Vec<Result<Sequenced, BusError>>, Option<String>) {
        let traced = self.telemetry.is_on();
        let wire_forward = |(i, p): (usize, &Publication)| wire::Forward {
            room: p.room.to_string(),
            payload: p.payload.clone(),
            publisher: p.publisher.to_string(),
            client_msg_id: p.client_msg_id.clone(),
            traceparent: if traced && i > 0 {
                p.trace.traceparent()
            } else {
                String::new()
            },
        };
        // Half the server's max_payload per request, so a batch never nears it; a publication
        // larger than that goes alone (the owner refuses what cannot cross the mesh).
        let budget = match self.nats.server_info().max_payload {
            0 => 512 * 1024,
            max => max / 2,
        };
        let mut bytes = 0;
        let fits = rest
            .iter()
            .take(MAX_FORWARD_BATCH)
            .take_while(|p| {
                bytes += p.payload.len()
                    + p.room.as_str().len()
                    + p.publisher.len()
                    + p.client_msg_id.len()
                    + 32;
                bytes <= budget
            })
            .count()
            .max(1);
        let batches = self.view().protocol_of(owner) >= 2;
        let sent = if batches { fits } else { 1 };
        self.metrics.mesh_forwarded_publishes.inc_by(sent as u64);
        self.metrics.mesh_forward_requests.inc();
        let request = if sent == 1 {
            request::Kind::Forward(wire_forward((0, &rest[0])))
        } else {
            request::Kind::ForwardBatch(wire::ForwardBatch {
                publishes: rest[..sent].iter().enumerate().map(wire_forward).collect(),
            })
        };
        let links: Vec<&Trace> = match traced {
            true => rest[1..sent].iter().map(|p| &p.trace).collect(),
            false => Vec::new(),
        };
        let mut span = self.telemetry.span_linked(
            "mesh.forward",
            SpanKind::Client,
            &rest[0].trace,
            &links,
            || {
                [
                    KeyValue::new(attr::ROOM, rest[0].room.to_string()),
                    KeyValue::new(attr::OWNER, owner.to_string()),
                    KeyValue::new(attr::PUBLISHES, sent as i64),
                ]
            },
        );
        let replies = match self.request_traced(owner, request, &span.trace()).await {
            Ok(reply::Kind::Batch(batch)) => batch.replies,
            Ok(single) => vec![wire::Reply { kind: Some(single) }],
            Err(reason) => {
                span.fail(&reason);
                self.metrics.mesh_unreachable.inc();
                if let RequestFailure::NoResponders = reason {
                    self.peer_gone(owner).await;
                }
                return (
                    Vec::new(),
                    Some(format!("{owner} did not answer: {reason}")),
                );
            }
        };
        let mut done = Vec::with_capacity(sent);
        for reply in replies.into_iter().take(sent) {
            match reply.kind {
                Some(reply::Kind::Sequenced(s)) => done.push(Ok(Sequenced {
                    epoch: s.epoch,
                    seq: s.seq,
                    local_deliveries: 0,
                    duplicate: s.duplicate,
                })),
                Some(reply::Kind::TooLarge(max)) => {
                    done.push(Err(BusError::TooLarge(max as usize)))
                }
                Some(reply::Kind::NotOwner(reason)) => {
                    self.metrics.mesh_not_owner.inc();
                    span.fail(&reason);
                    return (done, Some(reason));
                }
                Some(reply::Kind::Unavailable(reason)) => {
                    span.fail(&reason);
                    return (done, Some(reason));
                }
                _ => return (done, Some(format!("unexpected reply from {owner}"))),
            }
        }
        // A batch the owner cut short for time: the rest goes again at once.
        (done, None)
    }

    pub(super) async fn publish_unreliable(self: &Arc<Self>, p: Publication) -> UnreliableReport {
        let frame = p.frame(0, 0, wall_ms());
        let bytes = frame.encode_after(&[KIND_UNRELIABLE]);
        let report = self.hub.deliver_unreliable(&p.room, &bytes.slice(1..));
        if report.too_large.is_none() && self.connected() {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(ORIGIN_HEADER, &*self.node_id);
            let bound = Duration::from_millis(self.config.request_timeout_ms);
            let sending =
                self.nats
                    .publish_with_headers(self.subject_room(&p.room), headers, bytes);
            match tokio::time::timeout(bound, sending).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "mesh: unreliable message not sent"),
                Err(_) => tracing::debug!("mesh: unreliable message not taken in time"),
            }
        }
        report
    }
}

/// A forwarded publication's reply for how sequencing it went.
fn forward_reply(step: Step<Sequenced>) -> reply::Kind {
    match step {
        Step::Done(s) => reply::Kind::Sequenced(wire::Sequenced {
            epoch: s.epoch,
            seq: s.seq,
            duplicate: s.duplicate,
        }),
        Step::Retry(reason) => reply::Kind::NotOwner(reason),
        Step::Fail(BusError::TooLarge(max)) => reply::Kind::TooLarge(max as u64),
        Step::Fail(error) => reply::Kind::Unavailable(error.to_string()),
    }
}
