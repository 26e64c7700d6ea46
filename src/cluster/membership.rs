//! Who is alive in the mesh: heartbeats on `<prefix>.hb`, and the ring built from
//! them. Pure state plus a clock passed in, so the rules are tested without NATS; the mesh
//! publishes and receives the heartbeats.
//!
//! Each node publishes a [`Heartbeat`] every `heartbeat_ms` and drops a peer not heard from for
//! `node_ttl_ms`. A node that sees a peer it did not know answers with its own heartbeat at
//! once, so a newcomer learns the whole mesh within one round trip instead of one period.
//! Draining nodes stay known (they still answer hand-off requests) but leave the active ring;
//! a node that has finished says `leaving` and is dropped at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::cluster::ring::Ring;
use crate::ids::is_subject_token;

/// A node's life cycle as its heartbeats announce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Owns its share of the ring.
    Active,
    /// Shutting down: owns nothing, hands its rooms over, still answers requests.
    Draining,
    /// Gone; drop it now.
    Leaving,
}

/// The version of the node-to-node requests (`proto/roomwire/mesh/v1`) this build speaks, so a
/// mesh can be upgraded node by node: 1 forwards one publish per request, 2 also takes
/// `ForwardBatch`, 3 also serves `History`. A node sends a peer only what the peer's heartbeat
/// says it understands.
pub const MESH_PROTOCOL: u32 = 4;

/// Nodes whose heartbeats carry no protocol predate it: version 1.
fn protocol_one() -> u32 {
    1
}

/// What a node announces, as JSON (small, rare, and readable with `nats sub`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: String,
    pub region: String,
    pub state: NodeState,
    /// Unix milliseconds the process started: a restarted node with the same id is a new
    /// incarnation (its rooms' state is gone).
    pub started_ms: u64,
    /// [`MESH_PROTOCOL`] of the sender.
    #[serde(default = "protocol_one")]
    pub protocol: u32,
    /// How many NATS connections the sender has made (its current connection's number): a
    /// node declared gone on one connection is heard again once it heartbeats on a later one.
    #[serde(default)]
    pub connection: u64,
    /// The sender's epoch clock (ms): at least its wall clock and every epoch it handed out.
    /// Every node keeps its own clock above the others' (plus a margin), so a new epoch is
    /// above any other node's, even from a node whose wall clock is behind.
    #[serde(default)]
    pub clock_ms: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    region: Arc<str>,
    state: NodeState,
    started_ms: u64,
    last_seen_ms: u64,
    protocol: u32,
    connection: u64,
}

/// A node declared gone: heartbeats of that incarnation and connection (some may still be on
/// their way) are ignored until `until_ms`.
#[derive(Debug, Clone, Copy)]
struct Gone {
    started_ms: u64,
    connection: u64,
    until_ms: u64,
}

/// One node as the status API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: Arc<str>,
    pub region: Arc<str>,
    pub state: NodeState,
    /// Milliseconds since its last heartbeat (0 for this node).
    pub last_seen_ms_ago: u64,
    /// The node-to-node protocol version it speaks ([`MESH_PROTOCOL`]).
    pub protocol: u32,
}

/// An immutable snapshot of the mesh: the active ring, and the ring that also counts draining
/// nodes (where a room's state may still be).
#[derive(Debug, Clone)]
pub struct RingView {
    /// Owners: the active nodes.
    pub ring: Ring,
    /// Active and draining nodes: where to look for a room's current state.
    pub holders: Ring,
    /// xxh3 of the sorted active ids: equal on every node that sees the same set.
    pub version: u64,
    pub nodes: Vec<NodeView>,
    regions: HashMap<Arc<str>, Arc<str>>,
}

impl RingView {
    pub fn region_of(&self, node: &str) -> Option<&Arc<str>> {
        self.regions.get(node)
    }

    /// The node-to-node protocol `node` speaks (1 for a node not in the view).
    pub fn protocol_of(&self, node: &str) -> u32 {
        self.nodes
            .binary_search_by(|n| (*n.id).cmp(node))
            .map_or(1, |i| self.nodes[i].protocol)
    }

    /// Active nodes per region.
    pub fn nodes_per_region(&self) -> BTreeMap<Arc<str>, usize> {
        let mut counts = BTreeMap::new();
        for node in self.nodes.iter().filter(|n| n.state == NodeState::Active) {
            *counts.entry(node.region.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// What a received heartbeat changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A node this one did not know (or a new incarnation of one): answer with a heartbeat.
    New,
    /// A known node changed state.
    Changed,
    Unchanged,
}

/// The live nodes as this node knows them.
pub struct Membership {
    self_id: Arc<str>,
    self_region: Arc<str>,
    vnodes: u32,
    ttl_ms: u64,
    self_state: NodeState,
    peers: HashMap<Arc<str>, Peer>,
    gone: HashMap<Arc<str>, Gone>,
}

impl Membership {
    pub fn new(self_id: Arc<str>, self_region: Arc<str>, vnodes: u32, ttl_ms: u64) -> Self {
        Self {
            self_id,
            self_region,
            vnodes,
            ttl_ms,
            self_state: NodeState::Active,
            peers: HashMap::new(),
            gone: HashMap::new(),
        }
    }

    pub fn set_self_state(&mut self, state: NodeState) {
        self.self_state = state;
    }

    /// Records a heartbeat received at `now_ms`. This node's own heartbeats are ignored.
    pub fn observe(&mut self, beat: &Heartbeat, now_ms: u64) -> Seen {
        if *beat.id == *self.self_id || !is_subject_token(&beat.id) {
            // Own heartbeats, and ids that could not name a subject (not from a roomwire node).
            return Seen::Unchanged;
        }
        if let Some(gone) = self.gone.get(beat.id.as_str()) {
            if now_ms < gone.until_ms
                && beat.started_ms == gone.started_ms
                && beat.connection <= gone.connection
            {
                // A heartbeat of the connection that is gone, late on its way.
                return Seen::Unchanged;
            }
            self.gone.remove(beat.id.as_str());
        }
        if beat.state == NodeState::Leaving {
            return match self.peers.remove(beat.id.as_str()) {
                Some(_) => Seen::Changed,
                None => Seen::Unchanged,
            };
        }
        match self.peers.get_mut(beat.id.as_str()) {
            Some(peer) if peer.started_ms == beat.started_ms => {
                peer.last_seen_ms = now_ms;
                peer.protocol = beat.protocol;
                peer.connection = beat.connection;
                if peer.state != beat.state {
                    peer.state = beat.state;
                    Seen::Changed
                } else {
                    Seen::Unchanged
                }
            }
            _ => {
                self.peers.insert(
                    Arc::from(beat.id.as_str()),
                    Peer {
                        region: Arc::from(beat.region.as_str()),
                        state: beat.state,
                        started_ms: beat.started_ms,
                        last_seen_ms: now_ms,
                        protocol: beat.protocol,
                        connection: beat.connection,
                    },
                );
                Seen::New
            }
        }
    }

    /// Drops peers silent for longer than the TTL; true when any was dropped.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        let before = self.peers.len();
        let ttl = self.ttl_ms;
        self.peers
            .retain(|_, peer| now_ms.saturating_sub(peer.last_seen_ms) <= ttl);
        self.peers.len() != before
    }

    /// Drops `id` at once: NATS says its connection is gone (nobody serves its subject). Its
    /// heartbeats still on their way are ignored for one TTL; a heartbeat from a later
    /// connection or a new incarnation brings it back. Returns whether it was known.
    pub fn declare_gone(&mut self, id: &str, now_ms: u64) -> bool {
        let Some(peer) = self.peers.remove(id) else {
            return false;
        };
        self.gone.retain(|_, g| now_ms < g.until_ms);
        self.gone.insert(
            Arc::from(id),
            Gone {
                started_ms: peer.started_ms,
                connection: peer.connection,
                until_ms: now_ms.saturating_add(self.ttl_ms),
            },
        );
        true
    }

    /// Forgets every peer (the NATS connection was lost: nothing heard is current any more).
    pub fn forget_peers(&mut self) {
        self.peers.clear();
    }

    /// The current snapshot.
    pub fn view(&self, now_ms: u64) -> RingView {
        let mut nodes = vec![NodeView {
            id: self.self_id.clone(),
            region: self.self_region.clone(),
            state: self.self_state,
            last_seen_ms_ago: 0,
            protocol: MESH_PROTOCOL,
        }];
        nodes.extend(self.peers.iter().map(|(id, peer)| NodeView {
            id: id.clone(),
            region: peer.region.clone(),
            state: peer.state,
            last_seen_ms_ago: now_ms.saturating_sub(peer.last_seen_ms),
            protocol: peer.protocol,
        }));
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let active: Vec<&str> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .map(|n| &*n.id)
            .collect();
        let version = xxh3_64(active.join("\n").as_bytes());
        RingView {
            ring: Ring::new(active.iter().copied(), self.vnodes),
            holders: Ring::new(nodes.iter().map(|n| &*n.id), self.vnodes),
            version,
            regions: nodes
                .iter()
                .map(|n| (n.id.clone(), n.region.clone()))
                .collect(),
            nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, state: NodeState, started_ms: u64) -> Heartbeat {
        Heartbeat {
            id: id.into(),
            region: "eu".into(),
            state,
            started_ms,
            protocol: MESH_PROTOCOL,
            connection: 1,
            clock_ms: 0,
        }
    }

    #[test]
    fn a_node_declared_gone_stays_gone_until_it_heartbeats_on_a_new_connection() {
        let mut m = members();
        m.observe(&beat("b", NodeState::Active, 1), 0);
        assert!(m.declare_gone("b", 100));
        assert!(!m.declare_gone("b", 100), "only once");
        assert_eq!(m.view(100).ring.nodes().len(), 1);
        // A heartbeat of the gone connection, late on its way, is ignored...
        assert_eq!(
            m.observe(&beat("b", NodeState::Active, 1), 200),
            Seen::Unchanged
        );
        assert_eq!(m.view(200).ring.nodes().len(), 1);
        // ...one from its next connection (it reconnected) is not.
        let mut reconnected = beat("b", NodeState::Active, 1);
        reconnected.connection = 2;
        assert_eq!(m.observe(&reconnected, 300), Seen::New);
        assert_eq!(m.view(300).ring.nodes().len(), 2);
        // A restarted incarnation, or the same one after a TTL, is heard too.
        m.declare_gone("b", 400);
        assert_eq!(m.observe(&beat("b", NodeState::Active, 2), 500), Seen::New);
        m.declare_gone("b", 600);
        assert_eq!(
            m.observe(&beat("b", NodeState::Active, 2), 1_700),
            Seen::New,
            "after one TTL"
        );
    }

    fn members() -> Membership {
        Membership::new("a".into(), "eu".into(), 16, 1_000)
    }

    #[test]
    fn a_peer_without_a_protocol_in_its_heartbeat_speaks_version_one() {
        let old: Heartbeat =
            serde_json::from_str(r#"{"id":"b","region":"eu","state":"active","started_ms":5}"#)
                .unwrap();
        assert_eq!(old.protocol, 1);
        let mut m = members();
        m.observe(&old, 10);
        m.observe(&beat("c", NodeState::Active, 5), 10);
        let view = m.view(10);
        assert_eq!(view.protocol_of("a"), MESH_PROTOCOL);
        assert_eq!(view.protocol_of("b"), 1);
        assert_eq!(view.protocol_of("c"), MESH_PROTOCOL);
        assert_eq!(view.protocol_of("gone"), 1);
    }

    #[test]
    fn peers_join_the_ring_and_expire_after_the_ttl() {
        let mut m = members();
        assert_eq!(m.observe(&beat("b", NodeState::Active, 1), 0), Seen::New);
        assert_eq!(
            m.observe(&beat("b", NodeState::Active, 1), 500),
            Seen::Unchanged
        );
        assert_eq!(m.view(500).ring.nodes().len(), 2);
        assert!(!m.expire(1_500), "heard 1000 ms ago: still alive");
        assert!(m.expire(1_501));
        assert_eq!(m.view(1_501).ring.nodes().len(), 1);
    }

    #[test]
    fn draining_nodes_hold_but_do_not_own_and_leaving_nodes_go_at_once() {
        let mut m = members();
        m.observe(&beat("b", NodeState::Active, 1), 0);
        assert_eq!(
            m.observe(&beat("b", NodeState::Draining, 1), 10),
            Seen::Changed
        );
        let view = m.view(10);
        assert_eq!(view.ring.nodes().len(), 1);
        assert_eq!(view.holders.nodes().len(), 2);
        assert_eq!(
            m.observe(&beat("b", NodeState::Leaving, 1), 20),
            Seen::Changed
        );
        assert_eq!(m.view(20).holders.nodes().len(), 1);
    }

    #[test]
    fn a_restarted_node_is_a_new_incarnation() {
        let mut m = members();
        m.observe(&beat("b", NodeState::Active, 1), 0);
        assert_eq!(m.observe(&beat("b", NodeState::Active, 2), 5), Seen::New);
    }

    #[test]
    fn the_version_is_the_same_for_the_same_active_set() {
        let mut a = members();
        let mut b = Membership::new("b".into(), "us".into(), 16, 1_000);
        a.observe(&beat("b", NodeState::Active, 1), 0);
        b.observe(&beat("a", NodeState::Active, 1), 0);
        assert_eq!(a.view(0).version, b.view(0).version);
        a.set_self_state(NodeState::Draining);
        assert_ne!(a.view(0).version, b.view(0).version);
    }

    #[test]
    fn ids_that_are_not_subject_tokens_are_ignored() {
        let mut m = members();
        for id in ["", "a.b", "a*", "a b", ">"] {
            assert_eq!(
                m.observe(&beat(id, NodeState::Active, 1), 0),
                Seen::Unchanged
            );
        }
        assert_eq!(m.view(0).nodes.len(), 1);
    }

    #[test]
    fn own_heartbeats_are_ignored() {
        let mut m = members();
        assert_eq!(
            m.observe(&beat("a", NodeState::Active, 1), 0),
            Seen::Unchanged
        );
        assert_eq!(m.view(0).nodes.len(), 1);
    }
}
