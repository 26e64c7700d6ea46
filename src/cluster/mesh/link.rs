//! The mesh's NATS connection: bounded publishes and requests, the subjects, and the connection
//! generation that fences state from before a reconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;

use super::Inner;
use super::lease::Lease;
use crate::clock::mono_ms;
use crate::cluster::BusError;
use crate::proto::mesh::{self as wire, reply, request};
use crate::room::RoomName;
use crate::telemetry::Trace;

/// The node's standing on its NATS connection.
#[derive(Default)]
pub(super) struct Link {
    /// Monotonic ms since which the node has been learning the mesh: when the NATS connection
    /// last came up (set by the client's `Connected` event, and by the heartbeat tick when it
    /// sees a new connection; events can be dropped by the client) or the lease last lapsed.
    pub(super) connected_at_ms: AtomicU64,
    /// The ownership lease.
    pub(super) lease: Lease,
    /// Round trips to the server asked for (tickets) and the highest ticket a completed round
    /// trip covers; one round trip at a time answers every ticket issued before it started.
    confirm_asked: AtomicU64,
    confirm_done: AtomicU64,
    confirming: tokio::sync::Mutex<()>,
    confirmed: tokio::sync::Notify,
}

/// Why a node-to-node request got no reply.
#[derive(Debug)]
pub(super) enum RequestFailure {
    /// Nobody subscribes to the node's subject: it is gone (its connection closed).
    NoResponders,
    /// The node left this node's ring while the request waited (it was found gone): its answer
    /// will not come, and the caller re-routes at once instead of waiting for the timeout.
    Left,
    /// Timed out or failed otherwise: the node may be alive but slow, or unreachable.
    Other(String),
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestFailure::NoResponders => f.write_str("no responders"),
            RequestFailure::Left => f.write_str("left the ring"),
            RequestFailure::Other(reason) => f.write_str(reason),
        }
    }
}

impl Inner {
    pub(super) fn subject_heartbeat(&self) -> String {
        format!("{}.hb", self.prefix)
    }

    pub(super) fn subject_requests(&self, node: &str) -> String {
        format!("{}.req.{node}", self.prefix)
    }

    pub(super) fn subject_disconnect(&self) -> String {
        format!("{}.ctl.disconnect", self.prefix)
    }

    pub(super) fn subject_gone(&self) -> String {
        format!("{}.gone", self.prefix)
    }

    /// Presence diffs from rooms' owners to `node` (see `mesh::presence`).
    pub(super) fn subject_presence(&self, node: &str) -> String {
        format!("{}.presence.{node}", self.prefix)
    }

    pub(super) fn subject_room(&self, room: &RoomName) -> String {
        format!("{}.room.{room}", self.prefix)
    }

    pub(super) fn connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes with a bound: the NATS client queues while reconnecting and would block once
    /// its queue is full; nothing in the mesh waits longer than a request may take.
    pub(super) async fn send(
        &self,
        subject: impl async_nats::subject::ToSubject,
        payload: Bytes,
    ) -> Result<(), String> {
        self.send_traced(subject, payload, &Trace::default()).await
    }

    /// [`Inner::send`] with the message's trace context in its NATS headers (none when `trace`
    /// is empty, as it always is with telemetry off).
    pub(super) async fn send_traced(
        &self,
        subject: impl async_nats::subject::ToSubject,
        payload: Bytes,
        trace: &Trace,
    ) -> Result<(), String> {
        let bound = Duration::from_millis(self.config.request_timeout_ms);
        let publishing = async {
            match trace.nats_headers() {
                Some(headers) => {
                    self.nats
                        .publish_with_headers(subject, headers, payload)
                        .await
                }
                None => self.nats.publish(subject, payload).await,
            }
        };
        match tokio::time::timeout(bound, publishing).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("the NATS client did not take the message in time".into()),
        }
    }

    /// A request with the same bound around the whole call (the client's own timeout starts
    /// only once the request is queued).
    pub(super) async fn nats_request(
        &self,
        subject: String,
        payload: Bytes,
        trace: &Trace,
    ) -> Result<async_nats::Message, RequestFailure> {
        let bound = Duration::from_millis(self.config.request_timeout_ms + 100);
        let asking = async {
            match trace.nats_headers() {
                Some(headers) => {
                    self.nats
                        .request_with_headers(subject, headers, payload)
                        .await
                }
                None => self.nats.request(subject, payload).await,
            }
        };
        match tokio::time::timeout(bound, asking).await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                Err(RequestFailure::NoResponders)
            }
            Ok(Err(error)) => Err(RequestFailure::Other(error.to_string())),
            Err(_) => Err(RequestFailure::Other("timed out".into())),
        }
    }

    pub(super) async fn request(
        &self,
        node: &str,
        kind: request::Kind,
    ) -> Result<reply::Kind, RequestFailure> {
        self.request_traced(node, kind, &Trace::default()).await
    }

    /// [`Inner::request`] with the request's trace context in its NATS headers.
    pub(super) async fn request_traced(
        &self,
        node: &str,
        kind: request::Kind,
        trace: &Trace,
    ) -> Result<reply::Kind, RequestFailure> {
        let payload = wire::Request { kind: Some(kind) }.encode_to_vec();
        let mut views = self.view_changes.subscribe();
        let asking = self.nats_request(self.subject_requests(node), Bytes::from(payload), trace);
        tokio::pin!(asking);
        let message = loop {
            tokio::select! {
                reply = &mut asking => break reply?,
                changed = views.changed() => {
                    let known = self.view().nodes.iter().any(|n| *n.id == *node);
                    if changed.is_err() || !known {
                        return Err(RequestFailure::Left);
                    }
                }
            }
        };
        wire::Reply::decode(message.payload)
            .ok()
            .and_then(|r| r.kind)
            .ok_or_else(|| RequestFailure::Other(format!("undecodable reply from {node}")))
    }

    /// The connections made so far (high bits) and the lease's lapses (low bits): owner state
    /// and delivery positions from an earlier connection or lease are stale (another node may
    /// have owned the room meanwhile).
    pub(super) fn generation(&self) -> u64 {
        (self.stats.connects.load(Ordering::Acquire) << 32)
            | (self.link.lease.lapses() & 0xffff_ffff)
    }

    /// The ownership lease holds now.
    pub(super) fn lease_valid(&self) -> bool {
        self.link.lease.is_valid(mono_ms())
    }

    /// Resolves once the NATS server has everything this node published before the call: a
    /// round trip (a request nobody answers, so the server itself replies "no responders"),
    /// shared by every caller waiting at the time (one round trip covers them all), bounded by
    /// `request_timeout_ms`.
    pub(super) async fn confirm(&self) -> Result<(), String> {
        let link = &self.link;
        let ticket = link.confirm_asked.fetch_add(1, Ordering::AcqRel) + 1;
        let bound = Duration::from_millis(self.config.request_timeout_ms);
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            // Registered before looking, so a round trip that ends in between still wakes it.
            let waiting = link.confirmed.notified();
            tokio::pin!(waiting);
            waiting.as_mut().enable();
            if link.confirm_done.load(Ordering::Acquire) >= ticket {
                return Ok(());
            }
            if let Ok(_leading) = link.confirming.try_lock() {
                // Every ticket issued so far was taken after its publishes were queued, and the
                // round trip is queued after this read: it covers them.
                let covers = link.confirm_asked.load(Ordering::Acquire);
                let subject = format!("{}.confirm.{}", self.prefix, self.node_id);
                let reply =
                    tokio::time::timeout_at(deadline, self.nats.request(subject, Bytes::new()))
                        .await;
                let outcome = match reply {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error))
                        if error.kind() == async_nats::RequestErrorKind::NoResponders =>
                    {
                        Ok(())
                    }
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("the NATS server did not answer in time".to_string()),
                };
                if outcome.is_ok() {
                    link.confirm_done.fetch_max(covers, Ordering::AcqRel);
                }
                link.confirmed.notify_waiters();
                outcome?;
                continue;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                return Err("the NATS server did not answer in time".to_string());
            }
        }
    }

    /// Connected, and connected (and holding the lease) long enough to have heard every live
    /// node's heartbeat.
    pub(super) fn settled(&self) -> bool {
        let since = self
            .link
            .connected_at_ms
            .load(Ordering::Acquire)
            .max(self.link.lease.lapsed_at());
        self.connected() && mono_ms().saturating_sub(since) >= self.config.settle_ms
    }

    pub(super) fn check_link(&self) -> Result<(), BusError> {
        if self.connected() {
            Ok(())
        } else {
            Err(BusError::Unavailable(
                "this node lost its connection to the mesh (NATS); retry".into(),
            ))
        }
    }
}

/// A NATS URL without its credentials (`nats://user:pass@host` → `nats://host`).
pub(super) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => "(unparsable url)".to_string(),
    }
}
