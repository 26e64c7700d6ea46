//! Presence over the mesh: every interval, this node reports its members of presence rooms to
//! each room's owner (one request per owner node, every room in it), and, as an owner, sends
//! each room's diff once to every node with members (one message per node, every room in it)
//! on `<prefix>.presence.<node>`. The logic is [`crate::cluster::presence`]'s; this is the IO.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;

use super::Inner;
use crate::clock::mono_ms;
use crate::cluster::{BusError, presence};
use crate::proto::mesh::{
    self as wire, PresenceFanout, PresenceFrame, PresenceQuery, PresenceReply, reply, request,
};
use crate::room::RoomName;

/// The first node-to-node protocol that knows presence.
const PRESENCE_PROTOCOL: u32 = 4;

impl Inner {
    /// Owns `room` in this node's current view of the ring (presence follows the ring, not the
    /// sequencing lease: a lease blip does not throw a room's presence away).
    fn presence_owner(&self, room: &RoomName) -> bool {
        self.view()
            .ring
            .owner(room.as_str())
            .is_some_and(|o| *o == self.node_id)
    }

    /// One interval's work: reports out, diffs out.
    pub(super) async fn presence_tick(self: &Arc<Self>) {
        if !self.connected() {
            return;
        }
        let now = mono_ms();
        let view = self.view();
        // Every room is looked at again when the ring changed (an owner may be new to it).
        let ring_changed = self.presence_ring.swap(view.version, Ordering::AcqRel) != view.version;
        let reports = self
            .presence
            .local
            .reports(|room| self.owner_of(room), ring_changed);
        let mut asks = Vec::new();
        for (owner, rooms) in reports {
            if owner == self.node_id {
                let ack = self
                    .presence
                    .apply(&owner, &rooms, now, |r| self.presence_owner(r));
                self.presence.local.answered(&owner, &ack);
                continue;
            }
            if view.protocol_of(&owner) < PRESENCE_PROTOCOL {
                // An older node (a rolling upgrade): it keeps no presence; tried again once
                // it announces the protocol.
                self.presence.local.lost(&owner, &rooms);
                continue;
            }
            // One owner's requests one after the other (a room's chunks in order); owners
            // at once.
            asks.push(async move {
                for rooms in presence::requests(rooms) {
                    self.metrics.presence_reports.inc();
                    let kind = request::Kind::PresenceReport(wire::PresenceReport {
                        rooms: rooms.clone(),
                        node: self.node_id.to_string(),
                    });
                    match self.request(&owner, kind).await {
                        Ok(reply::Kind::PresenceAck(ack)) => {
                            self.presence.local.answered(&owner, &ack)
                        }
                        _ => {
                            self.metrics.presence_reports_lost.inc();
                            self.presence.local.lost(&owner, &rooms);
                        }
                    }
                }
            });
        }
        futures_util::future::join_all(asks).await;

        let alive = |node: &str| view.nodes.iter().any(|n| &*n.id == node);
        let due = self
            .presence
            .due(mono_ms(), |r| self.presence_owner(r), alive);
        let mut by_node: std::collections::HashMap<Arc<str>, Vec<PresenceFrame>> =
            std::collections::HashMap::new();
        for due in due {
            for node in &due.nodes {
                if *node == self.node_id {
                    self.presence.deliver(&due.room, &due.frame);
                } else {
                    by_node
                        .entry(node.clone())
                        .or_default()
                        .push(PresenceFrame {
                            room: due.room.to_string(),
                            frame: due.frame.clone(),
                        });
                }
            }
        }
        for (node, frames) in by_node {
            let fanout = PresenceFanout { frames }.encode_to_vec();
            if let Err(error) = self
                .send(self.subject_presence(&node), Bytes::from(fanout))
                .await
            {
                tracing::debug!(%error, %node, "mesh: presence diffs not sent");
            }
        }
    }

    /// Diffs from rooms' owners, to this node's sessions that asked for them.
    pub(super) async fn presence_loop(self: Arc<Self>, mut fanouts: async_nats::Subscriber) {
        while let Some(message) = fanouts.next().await {
            let Ok(fanout) = PresenceFanout::decode(message.payload) else {
                continue;
            };
            for frame in fanout.frames {
                if let Ok(room) = RoomName::parse_any(&frame.room, self.rooms.max_name_bytes) {
                    self.presence.deliver(&room, &frame.frame);
                }
            }
        }
    }

    /// A node's report of its members, as the rooms' owner.
    pub(super) fn serve_presence_report(&self, report: wire::PresenceReport) -> reply::Kind {
        let node: Arc<str> = Arc::from(report.node.as_str());
        let ack = self
            .presence
            .apply(&node, &report.rooms, mono_ms(), |r| self.presence_owner(r));
        reply::Kind::PresenceAck(ack)
    }

    /// A page of a room's presence or its counts, as its owner.
    pub(super) fn serve_presence_query(&self, q: PresenceQuery) -> reply::Kind {
        let Ok(room) = RoomName::parse_any(&q.room, self.rooms.max_name_bytes) else {
            return reply::Kind::Unavailable("invalid room name".into());
        };
        if !self.presence_owner(&room) {
            return reply::Kind::NotOwner(format!("{} does not own {room}", self.node_id));
        }
        reply::Kind::Presence(self.presence.owned.query(&room, &q))
    }

    /// A page of `room`'s presence or its counts, asked of its owner.
    pub(super) async fn presence_query(
        &self,
        room: &RoomName,
        q: PresenceQuery,
    ) -> Result<PresenceReply, BusError> {
        let Some(owner) = self.owner_of(room) else {
            return Err(BusError::Unavailable("the mesh is settling".into()));
        };
        if owner == self.node_id {
            return Ok(self.presence.owned.query(room, &q));
        }
        if self.view().protocol_of(&owner) < PRESENCE_PROTOCOL {
            return Err(BusError::Unavailable(format!(
                "{owner}, the owner of {room}, is an older node without presence"
            )));
        }
        match self.request(&owner, request::Kind::PresenceQuery(q)).await {
            Ok(reply::Kind::Presence(reply)) => Ok(reply),
            Ok(reply::Kind::NotOwner(reason)) | Ok(reply::Kind::Unavailable(reason)) => {
                Err(BusError::Unavailable(reason))
            }
            Ok(_) => Err(BusError::Unavailable(format!(
                "unexpected reply from {owner}"
            ))),
            Err(_) => Err(BusError::Unavailable(format!("{owner} did not answer"))),
        }
    }
}
