//! Where a publish goes and who sequences it.
//!
//! [`Bus`] is the interface between sessions and the room owners. Every room has exactly one
//! owner, which assigns `(epoch, seq)` and then fans the encoded message out to every node with
//! members. Standalone (no NATS configured), this node owns every room and the "mesh" is the
//! in-process [`local::LocalBus`]; the NATS mesh ([`mesh::MeshBus`], membership in
//! [`membership`], owners from [`ring`]) implements the same operations across nodes.

use std::sync::Arc;

use bytes::Bytes;

use crate::member::Member;
use crate::proto::ErrorCode;
use crate::room::RoomName;

pub mod local;
pub mod membership;
pub mod mesh;
pub mod order;
pub mod ring;

/// A message to be sequenced into a room.
#[derive(Debug, Clone)]
pub struct Publication {
    pub room: RoomName,
    pub payload: Bytes,
    /// User id of the publisher (`$server` for the HTTP API).
    pub publisher: Arc<str>,
    pub client_msg_id: String,
}

/// The position the owner gave a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Sequenced {
    pub epoch: u64,
    pub seq: u64,
    /// Sessions on this node the message was queued to.
    pub local_deliveries: usize,
    /// The publish repeated an earlier (publisher, client_msg_id): nothing was delivered, and
    /// (epoch, seq) are those of the original.
    pub duplicate: bool,
}

/// What the node knows of a room.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomInfo {
    pub room: String,
    /// `None` when no owner state exists (no publish or join since the idle TTL).
    pub epoch: Option<u64>,
    pub seq: Option<u64>,
    pub local_members: usize,
}

/// A routing failure; the client may retry a publish with the same client message id.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("room owner unavailable: {0}")]
    Unavailable(String),
    /// The message cannot cross the mesh (larger than the NATS server's max_payload allows for
    /// the payload: this many bytes at most).
    #[error("message too large for the mesh: payload at most {0} bytes")]
    TooLarge(usize),
    /// The room is changing owner (mesh); retried by the bus until its deadline.
    #[error("room changing owner: {0}")]
    Moving(String),
}

impl BusError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BusError::Unavailable(_) | BusError::Moving(_) => ErrorCode::Unavailable,
            BusError::TooLarge(_) => ErrorCode::PayloadTooLarge,
        }
    }
}

/// The routing layer of a node: standalone now, NATS mesh when configured.
pub enum Bus {
    Standalone(local::LocalBus),
    Mesh(mesh::MeshBus),
}

impl Bus {
    /// Sequences a message at the room's owner and fans it out to every member.
    pub async fn publish(&self, publication: Publication) -> Result<Sequenced, BusError> {
        self.publish_batch(vec![publication])
            .await
            .pop()
            .expect("one result per publication")
    }

    /// Sequences several messages, one result each, in order: messages to one room take
    /// positions in the order given. In a mesh, messages to a room owned elsewhere travel to
    /// the owner together, so a session publishing faster than one round trip is not held to
    /// one message per round trip.
    pub async fn publish_batch(
        &self,
        publications: Vec<Publication>,
    ) -> Vec<Result<Sequenced, BusError>> {
        match self {
            Bus::Standalone(bus) => publications.into_iter().map(|p| bus.publish(p)).collect(),
            Bus::Mesh(bus) => bus.publish_batch(publications).await,
        }
    }

    /// Fans a message out without sequencing it (epoch and seq 0, no acknowledgement).
    pub async fn publish_unreliable(
        &self,
        publication: Publication,
    ) -> crate::fanout::UnreliableReport {
        match self {
            Bus::Standalone(bus) => bus.publish_unreliable(publication),
            Bus::Mesh(bus) => bus.publish_unreliable(publication).await,
        }
    }

    /// Makes `session` a member of `room`. With a request id, a `Joined` frame carrying the
    /// room's current position is queued to the session before any message that follows it.
    pub async fn join(
        &self,
        room: &RoomName,
        session: &Arc<Member>,
        request_id: Option<u64>,
    ) -> Result<(), BusError> {
        match self {
            Bus::Standalone(bus) => bus.join(room, session, request_id),
            Bus::Mesh(bus) => bus.join(room, session, request_id).await,
        }
    }

    pub async fn leave(&self, room: &RoomName, session: &Arc<Member>) {
        match self {
            Bus::Standalone(bus) => bus.leave(room, session),
            Bus::Mesh(bus) => bus.leave(room, session),
        }
    }

    pub async fn room_info(&self, room: &RoomName) -> RoomInfo {
        match self {
            Bus::Standalone(bus) => bus.room_info(room),
            Bus::Mesh(bus) => bus.room_info(room),
        }
    }

    /// Drops owner state of rooms idle longer than the TTL; called periodically.
    pub fn sweep(&self, now_ms: u64) {
        match self {
            Bus::Standalone(bus) => bus.sweep(now_ms),
            Bus::Mesh(bus) => bus.sweep(now_ms),
        }
    }

    /// Ready to serve: always standalone; in the mesh, connected to NATS, settled, not draining.
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Standalone(_) => true,
            Bus::Mesh(bus) => bus.is_ready(),
        }
    }

    /// First step of a graceful shutdown: leave the ring and hand the owned rooms over.
    pub async fn drain(&self) {
        if let Bus::Mesh(bus) = self {
            bus.drain().await
        }
    }

    /// Last step of a graceful shutdown, after the sessions have gone.
    pub async fn shut_down(&self) {
        if let Bus::Mesh(bus) = self {
            bus.leave_mesh().await
        }
    }

    /// Asks the other nodes of the mesh to close the sessions of `user`; `Ok(false)` standalone.
    pub async fn disconnect_user_elsewhere(&self, user: &str) -> Result<bool, BusError> {
        match self {
            Bus::Standalone(_) => Ok(false),
            Bus::Mesh(bus) => bus.disconnect_user_elsewhere(user).await.map(|()| true),
        }
    }

    /// The cluster status (`/api/v1/cluster`), with the owner of `room` when given.
    pub fn status(
        &self,
        node_id: &str,
        region: &str,
        room: Option<&RoomName>,
    ) -> serde_json::Value {
        match self {
            Bus::Mesh(bus) => bus.status(room),
            Bus::Standalone(_) => {
                let mut status = serde_json::json!({
                    "mode": "standalone",
                    "node": {"id": node_id, "region": region},
                    "ready": true,
                    "ring": {"nodes": [{"id": node_id, "region": region, "state": "active"}]},
                });
                if let Some(room) = room {
                    status["owner"] = serde_json::json!({"room": room.as_str(), "node": node_id, "region": region});
                }
                status
            }
        }
    }
}
