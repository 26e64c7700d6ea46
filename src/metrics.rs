//! Prometheus metrics (`/metrics`). Counters on the hot path are plain atomics resolved once;
//! labelled families are used only where the label varies (close reason, error code).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];
/// Labels whose values are only known at run time (node ids, regions).
pub type OwnedLabels = Vec<(&'static str, String)>;

/// Every metric the node exports, registered under the `roomwire_` prefix.
pub struct Metrics {
    registry: Registry,
    /// Open sessions by transport (`ws`, later `webtransport`).
    pub sessions: Family<Labels, Gauge>,
    pub sessions_opened: Family<Labels, Counter>,
    /// Closed sessions by the close reason (`normal`, `slow_consumer`, `idle_timeout`, ...).
    pub sessions_closed: Family<Labels, Counter>,
    /// Inbound frames by kind (`publish`, `join`, ..., `undecodable`, `text`); use [`Metrics::frame_in`].
    pub frames_in: Family<Labels, Counter>,
    frames_in_by_kind: [Counter; FRAME_KINDS.len()],
    /// Outbound frames written to sockets, and their bytes.
    pub frames_out: Counter,
    pub bytes_out: Counter,
    /// Write system calls' worth of batches: frames_out / write_batches is the coalescing factor.
    pub write_batches: Counter,
    /// Messages sequenced by this node as a room's owner.
    pub messages_published: Counter,
    /// Message frames queued to local sessions by fan-out (one per receiving session).
    pub deliveries: Counter,
    pub slow_consumer_drops: Counter,
    /// Error frames sent, by error code.
    pub errors: Family<Labels, Counter>,
    /// Connections refused before a session existed, by reason.
    pub connections_refused: Family<Labels, Counter>,
    /// Bytes waiting in all sessions' send queues right now.
    pub queued_bytes: Gauge,
    /// Rooms with at least one member on this node.
    pub local_rooms: Gauge,
    /// Rooms whose sequencer state this node holds as owner.
    pub owned_rooms: Gauge,
    pub http_api_requests: Family<Labels, Counter>,
    /// Unreliable frames sent as QUIC datagrams.
    pub datagrams_sent: Counter,
    /// Datagrams not sent, by reason (`buffer_full`, `too_large`, `unsupported`, `connection`).
    pub datagrams_dropped: Family<Labels, Counter>,
    /// Datagrams received from clients, by outcome (`publish`, `rejected`, `other_session`).
    pub datagrams_received: Family<Labels, Counter>,
    /// WebTransport streams reset because a session uses exactly one.
    pub webtransport_streams_refused: Counter,
    /// QUIC Retry packets sent (address validation).
    pub quic_retries: Counter,
    /// Credentials refused, by reason (`invalid`, `replayed`, `missing`, ...).
    pub auth_failures: Family<Labels, Counter>,
    /// Token-id checks (anti-replay), by the store that answered (`node`: this node's own,
    /// `mesh`: the mesh's JetStream bucket) and outcome (`accepted`, `replayed`, `full`,
    /// `unavailable`).
    pub replay_checks: Family<[(&'static str, &'static str); 2], Counter>,
    /// Token ids the mesh's store could not check in time that this node's own store decided
    /// instead (`auth.jwt.replay_when_unavailable = "node"`).
    pub replay_fallbacks: Counter,
    /// Time one token-id claim in the mesh's store took, answered or not (a round trip to the
    /// bucket's NATS cluster: through a gateway when it is in another region).
    pub replay_claim_seconds: Histogram,
    /// Publishes acknowledged as duplicates of an earlier (publisher, client_msg_id).
    pub duplicate_publishes: Counter,
    /// Always 1, labelled with this node's id and region (join other series on it).
    pub node_info: Family<OwnedLabels, Gauge>,
    /// 1 while the mesh's NATS connection is up (mesh mode only).
    pub mesh_connected: Gauge,
    /// Active nodes in this node's view of the ring, by region.
    pub mesh_nodes: Family<OwnedLabels, Gauge>,
    /// Times this node's view of the ring changed.
    pub mesh_ring_changes: Counter,
    /// Publishes this node sent to another node, the room's owner (each attempt counts).
    pub mesh_forwarded_publishes: Counter,
    /// Requests that carried them, one or more publishes each.
    pub mesh_forward_requests: Counter,
    /// "Not owner" answers (the ring was changing) after which the publish or join re-routed.
    pub mesh_not_owner: Counter,
    /// Requests to an owner that did not answer (down, unreachable, timed out) and re-routed.
    pub mesh_unreachable: Counter,
    /// Round trip of a request through NATS to a node of `region` and back, seconds (one node
    /// pinged per heartbeat period, in turn).
    pub mesh_nats_rtt: Family<OwnedLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Room states handed between nodes, by `direction` (in, out) and `how` (pulled, pushed).
    pub mesh_handoffs: Family<[(&'static str, &'static str); 2], Counter>,
    /// New epochs this node started as owner because no previous state was found.
    pub mesh_epochs_started: Counter,
    /// Sequence gaps given up on: a message missing for the reorder wait was skipped.
    pub mesh_gaps: Counter,
    /// Appends to a durable room's JetStream stream, by outcome (`stored`, `fenced`: another
    /// node took the room over, `failed`: JetStream did not answer or refused).
    pub history_appends: Family<Labels, Counter>,
    /// Time one append took until JetStream acknowledged it (the publish waits for it).
    pub history_append_seconds: Histogram,
    /// Reads from the durable history streams (direct gets, a batch counting once).
    pub history_reads: Counter,
    /// Messages received from the mesh older than what was already delivered, dropped.
    pub mesh_stale_messages: Counter,
    /// Of those, messages from an older epoch than one already delivered: sequenced by an owner
    /// that lost the room while publishing them (stalled or cut off), never acknowledged. Rare,
    /// and only around such a fault; logged.
    pub mesh_stale_epoch_messages: Counter,
    /// Times this node's ownership lease ended without renewal (stalled, or NATS did not confirm).
    pub mesh_lease_lapses: Counter,
    /// Seconds the ownership lease still holds (0: this node may not sequence).
    pub mesh_lease_remaining: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Nodes this node dropped from its ring at once because NATS said their connection was gone.
    pub mesh_nodes_gone: Counter,
    /// NATS reported a subscription that could not keep up (messages were dropped).
    pub mesh_slow_subscriptions: Counter,
    /// Rooms this node is subscribed to in the mesh (it has local members).
    pub mesh_subscribed_rooms: Gauge,
    /// Rooms whose presence this node holds as their owner.
    pub presence_rooms: Gauge,
    /// Presence diffs this node sent as a room's owner (one per room and interval at most).
    pub presence_diffs: Counter,
    /// PresenceDiff frames queued to local sessions.
    pub presence_deliveries: Counter,
    /// Presence reports this node sent to rooms' owners (one request per owner and interval),
    /// and those that got no answer (the rooms are reported whole next time).
    pub presence_reports: Counter,
    pub presence_reports_lost: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Inbound frame kinds, counted through counters resolved once (no label lookup per frame).
pub const FRAME_KINDS: [&str; 14] = [
    "connect",
    "join",
    "leave",
    "publish",
    "ping",
    "refresh",
    "history",
    "seen",
    "presence",
    "presence_stats",
    "empty",
    "text",
    "undecodable",
    "rate_limited",
];

impl Metrics {
    /// Counts one inbound frame of `kind` (one of [`FRAME_KINDS`]).
    pub fn frame_in(&self, kind: &'static str) {
        match FRAME_KINDS.iter().position(|k| *k == kind) {
            Some(i) => self.frames_in_by_kind[i].inc(),
            None => self.frames_in.get_or_create(&[("kind", kind)]).inc(),
        };
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("roomwire");
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let metric = $metric;
                registry.register($name, $help, metric.clone());
                metric
            }};
        }
        let metrics = Self {
            sessions: reg!("sessions", "Open sessions by transport", Family::default()),
            sessions_opened: reg!(
                "sessions_opened",
                "Sessions opened by transport",
                Family::default()
            ),
            sessions_closed: reg!(
                "sessions_closed",
                "Sessions closed by reason",
                Family::default()
            ),
            frames_in: reg!(
                "frames_received",
                "Inbound frames by kind",
                Family::default()
            ),
            frames_out: reg!("frames_sent", "Outbound frames written", Counter::default()),
            bytes_out: reg!(
                "bytes_sent",
                "Outbound frame bytes written",
                Counter::default()
            ),
            write_batches: reg!(
                "write_batches",
                "Batches of frames flushed to sockets",
                Counter::default()
            ),
            messages_published: reg!(
                "messages_published",
                "Messages sequenced by this node as owner",
                Counter::default()
            ),
            deliveries: reg!(
                "deliveries",
                "Message frames queued to local sessions by fan-out",
                Counter::default()
            ),
            slow_consumer_drops: reg!(
                "slow_consumer_drops",
                "Sessions cut off because their send queue was full",
                Counter::default()
            ),
            errors: reg!("errors", "Error frames sent by code", Family::default()),
            connections_refused: reg!(
                "connections_refused",
                "Connections refused before a session existed, by reason",
                Family::default()
            ),
            queued_bytes: reg!(
                "send_queue_bytes",
                "Bytes waiting in all send queues",
                Gauge::default()
            ),
            local_rooms: reg!(
                "local_rooms",
                "Rooms with members on this node",
                Gauge::default()
            ),
            owned_rooms: reg!(
                "owned_rooms",
                "Rooms sequenced by this node",
                Gauge::default()
            ),
            http_api_requests: reg!(
                "http_api_requests",
                "HTTP API requests by outcome",
                Family::default()
            ),
            datagrams_sent: reg!(
                "datagrams_sent",
                "Unreliable frames sent as QUIC datagrams",
                Counter::default()
            ),
            datagrams_dropped: reg!(
                "datagrams_dropped",
                "Datagrams not sent, by reason",
                Family::default()
            ),
            datagrams_received: reg!(
                "datagrams_received",
                "Datagrams received from clients, by outcome",
                Family::default()
            ),
            webtransport_streams_refused: reg!(
                "webtransport_streams_refused",
                "Extra WebTransport streams reset",
                Counter::default()
            ),
            quic_retries: reg!(
                "quic_retries",
                "QUIC Retry packets sent for address validation",
                Counter::default()
            ),
            auth_failures: reg!(
                "auth_failures",
                "Credentials refused by reason",
                Family::default()
            ),
            replay_checks: reg!(
                "replay_checks",
                "Token-id (jti) checks by the store that answered and outcome",
                Family::default()
            ),
            replay_fallbacks: reg!(
                "replay_fallbacks",
                "Token ids the mesh's store could not check, decided by this node's own store",
                Counter::default()
            ),
            replay_claim_seconds: reg!(
                "replay_claim_seconds",
                "Time of one token-id claim in the mesh's JetStream store",
                // 100 us to 3.3 s: loopback to a cross-region round trip, and the timeout.
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
            ),
            duplicate_publishes: reg!(
                "duplicate_publishes",
                "Retried publishes answered with the original sequence",
                Counter::default()
            ),
            node_info: reg!("node_info", "This node's id and region", Family::default()),
            mesh_connected: reg!(
                "mesh_connected",
                "1 while connected to NATS",
                Gauge::default()
            ),
            mesh_nodes: reg!(
                "mesh_nodes",
                "Active nodes in the ring, by region",
                Family::default()
            ),
            mesh_ring_changes: reg!(
                "mesh_ring_changes",
                "Changes of this node's view of the ring",
                Counter::default()
            ),
            mesh_forwarded_publishes: reg!(
                "mesh_forwarded_publishes",
                "Publishes forwarded to the room's owner",
                Counter::default()
            ),
            mesh_forward_requests: reg!(
                "mesh_forward_requests",
                "Requests that carried forwarded publishes to an owner (one or more each)",
                Counter::default()
            ),
            mesh_not_owner: reg!(
                "mesh_not_owner",
                "Not-owner answers that made a request re-route",
                Counter::default()
            ),
            mesh_unreachable: reg!(
                "mesh_unreachable",
                "Owner requests that got no answer and re-routed",
                Counter::default()
            ),
            mesh_nats_rtt: reg!(
                "mesh_nats_rtt_seconds",
                "Round trip of a request through NATS to a node of the region",
                Family::default()
            ),
            mesh_handoffs: reg!(
                "mesh_handoffs",
                "Room states handed between nodes",
                Family::default()
            ),
            mesh_epochs_started: reg!(
                "mesh_epochs_started",
                "New epochs started because no previous owner state was found",
                Counter::default()
            ),
            history_appends: reg!(
                "history_appends",
                "Appends to durable room history in JetStream, by outcome",
                Family::default()
            ),
            history_append_seconds: reg!(
                "history_append_seconds",
                "Time until JetStream acknowledged one append of durable room history",
                Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
            ),
            history_reads: reg!(
                "history_reads",
                "Direct gets from durable room history (a batch counts once)",
                Counter::default()
            ),
            mesh_gaps: reg!(
                "mesh_gaps",
                "Missing messages skipped after the reorder wait",
                Counter::default()
            ),
            mesh_stale_messages: reg!(
                "mesh_stale_messages",
                "Mesh messages older than what was delivered, dropped",
                Counter::default()
            ),
            mesh_stale_epoch_messages: reg!(
                "mesh_stale_epoch_messages",
                "Mesh messages from an older epoch than one already delivered, dropped (an owner that lost the room while publishing them)",
                Counter::default()
            ),
            presence_rooms: reg!(
                "presence_rooms",
                "Rooms whose presence this node holds as their owner",
                Gauge::default()
            ),
            presence_diffs: reg!(
                "presence_diffs",
                "Presence diffs sent as a room's owner",
                Counter::default()
            ),
            presence_deliveries: reg!(
                "presence_deliveries",
                "PresenceDiff frames queued to local sessions",
                Counter::default()
            ),
            presence_reports: reg!(
                "presence_reports",
                "Presence reports sent to rooms' owners",
                Counter::default()
            ),
            presence_reports_lost: reg!(
                "presence_reports_lost",
                "Presence reports that got no answer (reported whole next time)",
                Counter::default()
            ),
            mesh_lease_lapses: reg!(
                "mesh_lease_lapses",
                "Times the ownership lease ended without renewal",
                Counter::default()
            ),
            mesh_lease_remaining: reg!(
                "mesh_lease_remaining_seconds",
                "Seconds the ownership lease still holds",
                Gauge::default()
            ),
            mesh_nodes_gone: reg!(
                "mesh_nodes_gone",
                "Nodes dropped from the ring at once because their NATS connection was gone",
                Counter::default()
            ),
            mesh_slow_subscriptions: reg!(
                "mesh_slow_subscriptions",
                "Slow-consumer events of mesh subscriptions",
                Counter::default()
            ),
            mesh_subscribed_rooms: reg!(
                "mesh_subscribed_rooms",
                "Rooms subscribed in the mesh",
                Gauge::default()
            ),
            registry,
            frames_in_by_kind: Default::default(),
        };
        let frames_in_by_kind =
            FRAME_KINDS.map(|k| metrics.frames_in.get_or_create(&[("kind", k)]).clone());
        Self {
            frames_in_by_kind,
            ..metrics
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
