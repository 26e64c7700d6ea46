//! `[mesh]`: joining other nodes over NATS.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Virtual nodes per node on the consistent-hash ring by default (`mesh.vnodes`): with 256, the
/// busiest of 5 nodes holds 1.06× the mean over 10,000 rooms (the ring's balance test; 64 gave
/// 1.09, 128 gave 1.18 for the same names), and a lookup is a binary search over N × 256 points.
pub const DEFAULT_VNODES: u32 = 256;

/// The mesh over NATS. With no `nats_urls` the node runs standalone (an in-process bus owns
/// every room); with them it joins the nodes announcing themselves under the same
/// `subject_prefix`, and each room is owned by one node of the consistent-hash ring.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// NATS server URLs, e.g. `["nats://127.0.0.1:4222"]`; the client reconnects among them
    /// forever. Empty: standalone.
    pub nats_urls: Vec<String>,
    /// First token of every mesh subject; nodes with different prefixes never see each other.
    pub subject_prefix: String,
    /// NATS credentials file (`.creds`, JWT + nkey seed), or empty.
    pub credentials_file: String,
    /// NATS token, or empty.
    pub token: String,
    /// Milliseconds between this node's heartbeats.
    pub heartbeat_ms: u64,
    /// Milliseconds without a heartbeat after which a node is dropped from the ring.
    pub node_ttl_ms: u64,
    /// Milliseconds after (re)connecting to NATS, or after losing its lease, during which the
    /// node listens to heartbeats before it starts rooms or reports ready (it may take rooms
    /// that their previous owner hands over explicitly before then).
    pub settle_ms: u64,
    /// Milliseconds an owner may keep sequencing after the start of its last heartbeat that the
    /// NATS server confirmed (measured on its monotonic clock). Past it, the node stops
    /// acknowledging until it renews, and drops every room it held. Must leave a margin below
    /// `node_ttl_ms`, after which the other nodes take its rooms over (docs/CLUSTER.md, "Leases").
    pub lease_ms: u64,
    /// Milliseconds one request to another node (forwarded publish, join position, hand-off)
    /// may take.
    pub request_timeout_ms: u64,
    /// Milliseconds a publish or join may spend re-routing (owner unreachable, not owner, ring
    /// changing) before the client gets the retryable UNAVAILABLE.
    pub route_deadline_ms: u64,
    /// Virtual nodes per node on the ring.
    pub vnodes: u32,
    /// Messages buffered per room subscription in the NATS client; beyond it new ones are
    /// dropped (members see a sequence gap) and `roomwire_mesh_slow_subscriptions_total` counts it.
    pub subscription_capacity: usize,
    /// The NATS cluster (in a super-cluster of regions: the region's cluster name, which equals
    /// its gateway name) that holds the mesh's JetStream state, the token-id bucket. Empty: the
    /// cluster of the NATS server the node that creates the bucket is connected to. Every
    /// connect in another region pays a round trip through the gateway to it, and depends on it.
    pub jetstream_placement: String,
    /// Replicas of the mesh's JetStream state within that cluster (1 with one server per
    /// region; 3 for a region cluster of three servers or more, so one server may fail).
    pub jetstream_replicas: usize,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            nats_urls: Vec::new(),
            subject_prefix: "roomwire".into(),
            credentials_file: String::new(),
            token: String::new(),
            heartbeat_ms: 500,
            node_ttl_ms: 2_500,
            settle_ms: 1_200,
            lease_ms: 1_250,
            request_timeout_ms: 1_000,
            route_deadline_ms: 6_000,
            vnodes: DEFAULT_VNODES,
            subscription_capacity: 8_192,
            jetstream_placement: String::new(),
            jetstream_replicas: 1,
        }
    }
}

impl MeshConfig {
    /// Checks the mesh values; `node_id` is the configured `node.id` (a subject token in a mesh).
    pub fn validate(&self, node_id: &str) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        let m = self;
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !token_ok(&m.subject_prefix) {
            return bad("mesh.subject_prefix must be non-empty letters, digits, '-' or '_'");
        }
        if !m.nats_urls.is_empty() && !token_ok(node_id) && !node_id.is_empty() {
            return bad(
                "node.id must be letters, digits, '-' or '_' in a mesh (it is a subject token)",
            );
        }
        if m.heartbeat_ms == 0 || m.node_ttl_ms < 2 * m.heartbeat_ms {
            return bad("mesh.node_ttl_ms must be at least twice mesh.heartbeat_ms (> 0)");
        }
        if m.settle_ms < 2 * m.heartbeat_ms {
            return bad(
                "mesh.settle_ms must be at least twice mesh.heartbeat_ms (to hear every node)",
            );
        }
        if m.lease_ms <= m.heartbeat_ms
            || m.lease_ms.saturating_mul(5) > m.node_ttl_ms.saturating_mul(4)
        {
            return bad(
                "mesh.lease_ms must exceed mesh.heartbeat_ms and be at most 80% of mesh.node_ttl_ms (the rest is the margin before others take its rooms)",
            );
        }
        if m.request_timeout_ms == 0 || m.route_deadline_ms < m.request_timeout_ms {
            return bad("mesh.route_deadline_ms must be at least mesh.request_timeout_ms (> 0)");
        }
        if m.vnodes == 0 || m.vnodes > 4096 {
            return bad("mesh.vnodes must be between 1 and 4096");
        }
        if m.subscription_capacity == 0 {
            return bad("mesh.subscription_capacity must be at least 1");
        }
        if !m.jetstream_placement.is_empty() && !token_ok(&m.jetstream_placement) {
            return bad(
                "mesh.jetstream_placement must be a NATS cluster name (letters, digits, '-' or '_'), or empty",
            );
        }
        if !(1..=5).contains(&m.jetstream_replicas) {
            return bad("mesh.jetstream_replicas must be between 1 and 5");
        }
        Ok(())
    }
}
