//! `[node]`, `[server]`, `[session]`, `[rooms]`, `[limits]`, `[api]`, `[log]`: the node itself,
//! its sockets, its sessions and rooms, and its abuse limits.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Identity of this node in the mesh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node id. Empty: `<hostname>-<random>` is generated at start. A stable id lets a
    /// restarted node take back the same share of the ring.
    pub id: String,
    /// Region label, reported in `Connected`, metrics and the cluster status.
    pub region: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            region: "local".into(),
        }
    }
}

/// Listening sockets and connection-level limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP addresses for HTTP and the WebSocket upgrade (`/ws`), one port for both.
    pub listen: Vec<SocketAddr>,
    /// Accept queue length per listener (the kernel caps it at net.core.somaxconn).
    pub listen_backlog: u32,
    /// Open TCP connections (HTTP and WebSocket together) at most; more are refused at accept.
    pub max_connections: usize,
    /// Milliseconds a new connection has to send its HTTP request headers, and then (WebSocket)
    /// its Connect frame, before it is closed. Guards against slowloris clients.
    pub handshake_timeout_ms: u64,
    /// Largest HTTP request head (request line plus headers) in bytes; hyper's floor is 8192.
    pub max_header_bytes: usize,
    /// Largest HTTP request body (the publish API) in bytes.
    pub max_body_bytes: usize,
    /// Milliseconds the node waits on SIGTERM for sessions to flush and close before exiting.
    pub drain_grace_ms: u64,
    /// Milliseconds clients are told (in GoAway) to wait before reconnecting.
    pub reconnect_after_ms: u32,
    /// Browser origins allowed to open WebSocket sessions (`https://app.example.com`, or `*`).
    /// Empty: only same-origin pages (Origin host equal to the Host header). Requests without an
    /// Origin header (non-browser clients) are not affected. A foreign Origin gets 403.
    pub allowed_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            listen_backlog: 4096,
            max_connections: 20_000,
            handshake_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 256 * 1024,
            drain_grace_ms: 10_000,
            reconnect_after_ms: 1_000,
            allowed_origins: Vec::new(),
        }
    }
}

/// Per-session limits and timers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Milliseconds between heartbeats (WebSocket ping) sent to each session.
    pub heartbeat_interval_ms: u64,
    /// Milliseconds without any inbound traffic (frames, pongs) before the session is closed (4002).
    pub idle_timeout_ms: u64,
    /// Largest inbound WebSocket message or frame, in bytes; larger closes with 1009 before the
    /// payload is buffered. It bounds a Publish's payload too.
    pub max_frame_bytes: usize,
    /// Outbound frames queued per session before it is cut off as a slow consumer (4001).
    pub send_queue_frames: usize,
    /// Outbound bytes queued per session before it is cut off as a slow consumer (4001). With
    /// `send_queue_frames` it bounds the memory one stuck client can hold.
    pub send_queue_bytes: usize,
    /// Rooms one session may have joined at once.
    pub max_rooms: usize,
    /// Protocol violations (bad, text or unexpected frames) answered with an Error frame before
    /// the session is closed with 4000.
    pub max_violations: u32,
    /// WebSocket read buffer per connection, in bytes. tungstenite allocates it eagerly, so it is
    /// the largest fixed cost of an idle session (its own default of 128 KiB is far too large).
    /// It is also the most one read system call takes in: a frame larger than the buffer arrives
    /// in buffer-sized reads, so nodes whose clients publish large messages may raise it.
    pub ws_read_buffer_bytes: usize,
    /// Outbound bytes gathered before a write system call; queued frames are coalesced up to it.
    pub ws_write_buffer_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            max_frame_bytes: 64 * 1024,
            send_queue_frames: 1024,
            send_queue_bytes: 4 * 1024 * 1024,
            max_rooms: 128,
            max_violations: 5,
            ws_read_buffer_bytes: 1024,
            ws_write_buffer_bytes: 64 * 1024,
        }
    }
}

/// Room naming and the owner's room state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// Longest room name in bytes.
    pub max_name_bytes: usize,
    /// Milliseconds a room with no members and no publishes keeps its sequencer state. A room
    /// created again afterwards starts a new epoch, so clients never see a sequence reused.
    pub idle_ttl_ms: u64,
    /// Milliseconds a (publisher, client_msg_id) pair is remembered by the room's owner: a retried
    /// Publish within it is acknowledged with the original sequence and not delivered again.
    pub dedupe_window_ms: u64,
    /// Pairs remembered per room at most (the oldest are forgotten first).
    pub dedupe_max_per_room: usize,
    /// Rooms whose owner state this node holds at most (a few hundred bytes each, plus the
    /// history a `memory` class keeps); beyond it, joins and publishes to new rooms are refused
    /// with the retryable UNAVAILABLE.
    pub max_owned_rooms: usize,
    /// How rooms keep their history, by name: the first class whose pattern matches a room is
    /// its class; a room no class matches keeps none. See [`RoomClass`].
    pub classes: Vec<RoomClass>,
    /// Milliseconds between a room's presence diffs (joins and leaves batched, sent to the
    /// members that asked for them), and between a node's reports of its members to the owners.
    pub presence_interval_ms: u64,
    /// Milliseconds a user whose last session left a room stays present: a session that comes
    /// back within it (a reload, a reconnect, a drain moving it) is neither a leave nor a join.
    pub presence_grace_ms: u64,
    /// Bytes of `Join.presence_info` kept per user at most (a longer one is refused).
    pub presence_info_max_bytes: usize,
}

/// A class of rooms and the history they keep.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoomClass {
    /// The class's name (in metrics, and in the name of the JetStream stream of a durable class):
    /// letters, digits, `-` and `_`, unique.
    pub name: String,
    /// The rooms of the class: a room pattern (`chat.>`, `*.lobby`, `$user.>`; wildcards never
    /// match the node's own rooms `$user.<id>` and `$broadcast`, which are named).
    pub pattern: String,
    /// `durable`: kept in NATS JetStream (in a mesh; standalone, like `memory`), and a publish is
    /// acknowledged once stored; `memory`: a window kept by the room's owner (lost with it);
    /// `none`: nothing kept.
    pub history: HistoryMode,
    /// Messages kept per room at most (the oldest go first).
    #[serde(default)]
    pub max_messages: u64,
    /// Milliseconds a message is kept at most.
    #[serde(default)]
    pub max_age_ms: u64,
    /// Payload bytes a `memory` room keeps at most (the oldest messages go first), so one
    /// room's large messages cannot hold the owner's memory.
    #[serde(default)]
    pub max_bytes: u64,
    /// Whether the class's rooms keep presence (who is in them, join and leave diffs).
    #[serde(default)]
    pub presence: bool,
    /// Users a room's presence lists at most: above it, GetPresence is refused with
    /// PRESENCE_TOO_LARGE and diffs carry counts only (the HTTP API still lists, paged).
    #[serde(default = "default_presence_list_max")]
    pub presence_list_max: usize,
}

fn default_presence_list_max() -> usize {
    1_000
}

/// Where a room's history lives.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HistoryMode {
    Durable,
    Memory,
    None,
}

impl RoomClass {
    fn new(name: &str, pattern: &str, history: HistoryMode, messages: u64, age_ms: u64) -> Self {
        Self {
            name: name.into(),
            pattern: pattern.into(),
            history,
            max_messages: messages,
            max_age_ms: age_ms,
            max_bytes: 1024 * 1024,
            presence: false,
            presence_list_max: default_presence_list_max(),
        }
    }

    fn with_presence(self) -> Self {
        Self {
            presence: true,
            ..self
        }
    }
}

/// A day, in milliseconds.
const DAY_MS: u64 = 86_400_000;

impl RoomsConfig {
    /// The classes are well-formed: names unique and usable in a stream name, patterns valid,
    /// limits set where history is kept.
    pub fn validate_classes(&self) -> Result<(), super::ConfigError> {
        let bad = |msg: String| Err(super::ConfigError::Invalid(msg));
        for (i, class) in self.classes.iter().enumerate() {
            let name_ok = !class.name.is_empty()
                && class.name.len() <= 32
                && class
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                return bad(format!(
                    "rooms.classes[{i}].name {:?}: 1-32 letters, digits, '-' or '_'",
                    class.name
                ));
            }
            if self.classes[..i].iter().any(|c| c.name == class.name) {
                return bad(format!(
                    "rooms.classes: the name {:?} is used twice",
                    class.name
                ));
            }
            if !crate::ids::is_room_pattern(&class.pattern) {
                return bad(format!(
                    "rooms.classes[{i}].pattern {:?} is not a room pattern",
                    class.pattern
                ));
            }
            if class.history != HistoryMode::None
                && (class.max_messages == 0
                    || class.max_messages > 1_000_000
                    || class.max_age_ms == 0
                    || class.max_bytes < 1024)
            {
                return bad(format!(
                    "rooms.classes[{i}] ({}): a class that keeps history needs max_messages within 1..=1000000, max_age_ms > 0 and max_bytes >= 1024",
                    class.name
                ));
            }
            if class.presence && !(1..=100_000).contains(&class.presence_list_max) {
                return bad(format!(
                    "rooms.classes[{i}] ({}): presence_list_max must be within 1..=100000",
                    class.name
                ));
            }
        }
        if !(50..=60_000).contains(&self.presence_interval_ms) {
            return bad("rooms.presence_interval_ms must be within 50..=60000".into());
        }
        if !(1_000..=600_000).contains(&self.presence_grace_ms) {
            return bad("rooms.presence_grace_ms must be within 1000..=600000".into());
        }
        if self.presence_info_max_bytes > 4096 {
            return bad("rooms.presence_info_max_bytes must be at most 4096".into());
        }
        Ok(())
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            max_name_bytes: 128,
            idle_ttl_ms: 300_000,
            dedupe_window_ms: 120_000,
            dedupe_max_per_room: 10_000,
            max_owned_rooms: 1_000_000,
            classes: vec![
                // Messages to a user wait for her devices (offline delivery).
                RoomClass::new("users", "$user.>", HistoryMode::Durable, 100, DAY_MS),
                RoomClass::new("broadcast", "$broadcast", HistoryMode::None, 0, 0),
                RoomClass::new("rooms", ">", HistoryMode::Durable, 1_000, DAY_MS).with_presence(),
            ],
            presence_interval_ms: 500,
            presence_grace_ms: 15_000,
            presence_info_max_bytes: 256,
        }
    }
}

/// Abuse limits per client address and per session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// New connections per second from one IP address (token bucket), refused at accept.
    pub connections_per_ip_per_second: u32,
    /// Burst of new connections one IP address may open at once.
    pub connection_burst_per_ip: u32,
    /// Open connections from one IP address at most. Behind a load balancer that does not pass
    /// client addresses through, raise this (every client shares the balancer's address).
    pub max_connections_per_ip: u32,
    /// Inbound frames per second per session (pings included), and the burst allowed.
    pub session_frames_per_second: u32,
    pub session_frame_burst: u32,
    /// Inbound bytes per second per session, and the burst allowed (at least max_frame_bytes).
    pub session_bytes_per_second: u32,
    pub session_byte_burst: u32,
    /// Rate-limit breaches within 10 seconds that close the session (4007); fewer are answered
    /// with RATE_LIMITED errors and the frame is dropped.
    pub max_rate_breaches: u32,
    /// Load balancers in front of the node (addresses or CIDR blocks, e.g. `10.0.0.0/8`): their
    /// connections are not limited by their own address; a WebSocket upgrade through them is
    /// limited, and its session known, by the client address in `X-Forwarded-For` (the
    /// rightmost one that is not a trusted proxy). Anyone else's `X-Forwarded-For` is ignored.
    pub trusted_proxies: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            connections_per_ip_per_second: 50,
            connection_burst_per_ip: 100,
            max_connections_per_ip: 1_000,
            session_frames_per_second: 200,
            session_frame_burst: 400,
            session_bytes_per_second: 1024 * 1024,
            session_byte_burst: 2 * 1024 * 1024,
            max_rate_breaches: 20,
            trusted_proxies: Vec::new(),
        }
    }
}

/// The HTTP API (`/api/v1/*`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Keys accepted in `Authorization: Bearer <key>`. Empty: a random key is generated at start
    /// and logged once (fine for development; configure keys in production).
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}
