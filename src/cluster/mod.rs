//! Where a publish goes and who sequences it.
//!
//! [`Bus`] is the interface between sessions and the room owners. Every room has exactly one
//! owner, which assigns `(epoch, seq)` and then fans the encoded message out to every node with
//! members. Standalone (no NATS configured), this node owns every room and the "mesh" is the
//! in-process [`local::LocalBus`]; the NATS mesh ([`mesh::MeshBus`], membership in
//! [`membership`], owners from [`ring`]) implements the same operations across nodes.

use std::sync::Arc;

use crate::fanout::UnreliableReport;
use crate::member::Member;
use crate::proto::{self, ErrorCode, ServerFrame, server_frame};
use crate::room::{
    HistoryPage, HistoryQuery, KeptMessage, Publication, Recovery, RoomName, Sequenced,
};

pub mod devices;
pub mod local;
pub mod membership;
pub mod mesh;
pub mod order;
pub mod owners;
pub mod ownership;
pub mod presence;
pub mod ring;

use membership::{NodeState, NodeView};
pub use mesh::TokenClaim;

/// Messages replayed to a returning member per step at most (and the largest History page):
/// between steps the replay waits for room in the member's send queue, and the room's
/// publishers are not held up.
pub const REPLAY_PAGE: usize = 128;

/// Cuts a page of replayed messages to what one replay step pushes to `member`: its replay
/// share of the send queue (at least one message).
pub(crate) fn fit_to_share(member: &Member, messages: &mut Vec<KeptMessage>) {
    let (max_frames, max_bytes) = member.replay_share();
    let mut bytes = 0;
    let fitting = messages
        .iter()
        .take(max_frames)
        .take_while(|m| {
            bytes += m.frame.len();
            bytes <= max_bytes
        })
        .count();
    messages.truncate(fitting.max(1));
}

/// The frames and bytes of a page.
pub(crate) fn page_size(messages: &[KeptMessage]) -> (usize, usize) {
    (messages.len(), messages.iter().map(|m| m.frame.len()).sum())
}

/// The `Joined` answer at `(epoch, seq)`; with a recovery (the member came back with a
/// position), what became of it and how many messages were replayed before this frame.
pub(crate) fn joined_frame(
    request_id: u64,
    room: &RoomName,
    epoch: u64,
    seq: u64,
    recovery: Option<Recovery>,
    replayed: u64,
) -> ServerFrame {
    let recovery = recovery.map(|recovery| match recovery {
        Recovery::Recovered { .. } => proto::Recovery {
            recovered: true,
            replayed,
            oldest_epoch: 0,
            oldest_seq: 0,
        },
        Recovery::Reset { epoch, oldest_seq } => proto::Recovery {
            recovered: false,
            replayed,
            oldest_epoch: epoch,
            oldest_seq,
        },
    });
    ServerFrame::reply(
        request_id,
        server_frame::Kind::Joined(proto::Joined {
            room: room.to_string(),
            epoch,
            seq,
            recovery,
        }),
    )
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
            Bus::Standalone(bus) => {
                let mut results = Vec::with_capacity(publications.len());
                for p in publications {
                    results.push(bus.publish(p).await);
                }
                results
            }
            Bus::Mesh(bus) => bus.publish_batch(publications).await,
        }
    }

    /// Fans a message out without sequencing it (epoch and seq 0, no acknowledgement).
    pub async fn publish_unreliable(&self, publication: Publication) -> UnreliableReport {
        match self {
            Bus::Standalone(bus) => bus.publish_unreliable(publication),
            Bus::Mesh(bus) => bus.publish_unreliable(publication).await,
        }
    }

    /// Makes `member` a member of `room`. With a request id, a `Joined` frame carrying the
    /// room's current position is queued to the session before any message that follows it;
    /// with `since` (the member's last message of the room), what it missed is replayed before
    /// `Joined`, or `Joined` says it cannot be (see `proto::Recovery`).
    pub async fn join(
        &self,
        room: &RoomName,
        member: &Arc<Member>,
        request_id: Option<u64>,
        since: Option<(u64, u64)>,
    ) -> Result<(), BusError> {
        match self {
            Bus::Standalone(bus) => bus.join(room, member, request_id, since).await,
            Bus::Mesh(bus) => bus.join(room, member, request_id, since).await,
        }
    }

    /// A page of `room`'s history, at most `limit` messages.
    /// Where `device` of `user` has read the user's room `$user.<id>` to (offline delivery).
    pub async fn device_position(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<(u64, u64)>, BusError> {
        match self {
            Bus::Standalone(bus) => Ok(bus.device_position(user, device)),
            Bus::Mesh(bus) => bus.device_position(user, device).await,
        }
    }

    /// `device` of `user` has read the user's room to `position` (the furthest is kept).
    pub async fn device_seen(
        &self,
        user: &str,
        device: &str,
        position: (u64, u64),
    ) -> Result<(), BusError> {
        match self {
            Bus::Standalone(bus) => {
                bus.device_seen(user, device, position);
                Ok(())
            }
            Bus::Mesh(bus) => bus.device_seen(user, device, position).await,
        }
    }

    pub async fn history(
        &self,
        room: &RoomName,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<HistoryPage, BusError> {
        match self {
            Bus::Standalone(bus) => bus.history(room, query, limit).await,
            Bus::Mesh(bus) => bus.history(room, query, limit).await,
        }
    }

    pub async fn leave(&self, room: &RoomName, member: &Arc<Member>) {
        self.presence().left(room, member.key);
        match self {
            Bus::Standalone(bus) => bus.leave(room, member),
            Bus::Mesh(bus) => bus.leave(room, member),
        }
    }

    pub async fn room_info(&self, room: &RoomName) -> RoomInfo {
        match self {
            Bus::Standalone(bus) => bus.room_info(room).await,
            Bus::Mesh(bus) => bus.room_info(room),
        }
    }

    /// This node's presence: its members of presence rooms, and the rooms it owns.
    pub fn presence(&self) -> &presence::Presence {
        match self {
            Bus::Standalone(bus) => bus.presence(),
            Bus::Mesh(bus) => bus.presence(),
        }
    }

    /// A page of `room`'s presence, or its counts, from its owner.
    pub async fn presence_query(
        &self,
        room: &RoomName,
        q: proto::mesh::PresenceQuery,
    ) -> Result<proto::mesh::PresenceReply, BusError> {
        match self {
            Bus::Standalone(bus) => Ok(bus.presence().owned.query(room, &q)),
            Bus::Mesh(bus) => bus.presence_query(room, q).await,
        }
    }

    /// One presence interval: reports to the rooms' owners, diffs to the members.
    pub async fn presence_tick(&self) {
        match self {
            Bus::Standalone(bus) => bus.presence_tick(),
            Bus::Mesh(bus) => bus.presence_tick().await,
        }
    }

    /// Drops owner state of rooms idle longer than the TTL; called periodically.
    pub fn sweep(&self) {
        match self {
            Bus::Standalone(bus) => bus.sweep(),
            Bus::Mesh(bus) => bus.sweep(),
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

    /// Uses up a token id for `ttl` in the mesh's shared store, so no node accepts it again;
    /// `None` standalone, where the node's own store decides.
    pub async fn claim_token_id(
        &self,
        jti: &str,
        ttl: std::time::Duration,
    ) -> Option<Result<TokenClaim, BusError>> {
        match self {
            Bus::Standalone(_) => None,
            Bus::Mesh(bus) => Some(bus.claim_token_id(jti, ttl).await),
        }
    }

    /// The cluster status (`/api/v1/cluster`), with the owner of `room` when given.
    pub fn status(&self, node_id: &str, region: &str, room: Option<&RoomName>) -> ClusterStatus {
        match self {
            Bus::Mesh(bus) => bus.status(room),
            Bus::Standalone(bus) => ClusterStatus {
                mode: "standalone",
                node: NodeRef {
                    id: node_id.to_string(),
                    region: region.to_string(),
                },
                ready: true,
                nats: None,
                ring: RingStatus {
                    version: None,
                    changes: None,
                    vnodes: None,
                    nodes: vec![NodeView {
                        id: node_id.into(),
                        region: region.into(),
                        state: NodeState::Active,
                        last_seen_ms_ago: 0,
                        protocol: membership::MESH_PROTOCOL,
                    }],
                },
                owned_rooms: bus.owned_rooms(),
                owner: room.map(|room| OwnerRef {
                    room: room.to_string(),
                    node: Some(node_id.to_string()),
                    region: Some(region.to_string()),
                }),
            },
        }
    }

    /// Standalone or mesh, as the node API says.
    pub fn mode(&self) -> &'static str {
        match self {
            Bus::Standalone(_) => "standalone",
            Bus::Mesh(_) => "mesh",
        }
    }
}

/// The cluster as `GET /api/v1/cluster` shows it (rendered as JSON by the HTTP layer).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    /// `standalone` or `mesh`.
    pub mode: &'static str,
    pub node: NodeRef,
    pub ready: bool,
    /// The NATS connection (mesh only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsStatus>,
    pub ring: RingStatus,
    pub owned_rooms: usize,
    /// The owner of the room asked about (`?room=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerRef>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeRef {
    pub id: String,
    pub region: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NatsStatus {
    pub connected: bool,
    /// The configured URLs, without credentials.
    pub urls: Vec<String>,
    /// Round trip through NATS to a node of each region, seconds.
    pub rtt_seconds_by_region: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RingStatus {
    /// xxh3 of the sorted active node ids, hex: equal versions mean equal rings (mesh only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Times this node's view of the ring changed (mesh only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vnodes: Option<u32>,
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OwnerRef {
    pub room: String,
    pub node: Option<String>,
    pub region: Option<String>,
}
