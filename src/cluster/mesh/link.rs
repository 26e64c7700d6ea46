//! The mesh's NATS connection: bounded publishes and requests, the subjects, and the connection
//! generation that fences state from before a reconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;

use super::Inner;
use crate::clock::mono_ms;
use crate::cluster::BusError;
use crate::proto::mesh::{self as wire, reply, request};
use crate::room::RoomName;

/// When the NATS connection last came up, on the monotonic clock (set by the client's `Connected` event, and by the
/// heartbeat tick when it sees a new connection; events can be dropped by the client).
#[derive(Default)]
pub(super) struct Link {
    pub(super) connected_at_ms: AtomicU64,
}

/// Why a node-to-node request got no reply.
#[derive(Debug)]
pub(super) enum RequestFailure {
    /// Nobody subscribes to the node's subject: it is gone (its connection closed).
    NoResponders,
    /// Timed out or failed otherwise: the node may be alive but slow, or unreachable.
    Other(String),
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestFailure::NoResponders => f.write_str("no responders"),
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
        let bound = Duration::from_millis(self.config.request_timeout_ms);
        match tokio::time::timeout(bound, self.nats.publish(subject, payload)).await {
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
    ) -> Result<async_nats::Message, RequestFailure> {
        let bound = Duration::from_millis(self.config.request_timeout_ms + 100);
        match tokio::time::timeout(bound, self.nats.request(subject, payload)).await {
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
        let payload = wire::Request { kind: Some(kind) }.encode_to_vec();
        let message = self
            .nats_request(self.subject_requests(node), Bytes::from(payload))
            .await?;
        wire::Reply::decode(message.payload)
            .ok()
            .and_then(|r| r.kind)
            .ok_or_else(|| RequestFailure::Other(format!("undecodable reply from {node}")))
    }

    /// Counts the connections made so far: owner state and delivery positions from an earlier
    /// connection are stale (another node may have owned the room meanwhile).
    pub(super) fn generation(&self) -> u64 {
        self.stats.connects.load(Ordering::Acquire)
    }

    /// Connected, and connected long enough to have heard every live node's heartbeat.
    pub(super) fn settled(&self) -> bool {
        self.connected()
            && mono_ms().saturating_sub(self.link.connected_at_ms.load(Ordering::Acquire))
                >= self.config.settle_ms
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
