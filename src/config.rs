//! The node's one configuration struct.
//!
//! Sources, later ones winning: the embedded defaults (so `roomwire` with no arguments serves on
//! localhost), a TOML file (`--config`), environment variables `ROOMWIRE__SECTION__KEY=value`, and
//! command-line `--set section.key=value`. Every source is merged into one TOML tree and then
//! deserialized with `deny_unknown_fields`, so a misspelt key is an error whichever source it came
//! from. [`Config::validate`] runs before any port is bound.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override configuration keys; `__` separates sections.
pub const ENV_PREFIX: &str = "ROOMWIRE__";

/// The whole node configuration. See `regions/local.toml` for a commented example of every key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub rooms: RoomsConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub tls: TlsConfig,
    pub api: ApiConfig,
    pub log: LogConfig,
    pub webtransport: WebTransportConfig,
    pub mesh: MeshConfig,
}

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
    /// Milliseconds after (re)connecting to NATS during which the node listens to heartbeats
    /// before it owns rooms or reports ready.
    pub settle_ms: u64,
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
            request_timeout_ms: 1_000,
            route_deadline_ms: 6_000,
            vnodes: crate::cluster::ring::DEFAULT_VNODES,
            subscription_capacity: 8_192,
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

/// The WebTransport listener (HTTP/3 over QUIC, UDP) and its QUIC limits. Every QUIC limit is set
/// here explicitly: quinn's own defaults allow 100 concurrent streams of each kind and an
/// unbounded connection receive window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebTransportConfig {
    /// Serve WebTransport at all.
    pub enabled: bool,
    /// UDP addresses. The default covers both loopbacks, because Chromium resolves `localhost` to
    /// `::1`; `[::]:4433` serves every interface over IPv4 and IPv6.
    pub listen: Vec<SocketAddr>,
    /// Path of the WebTransport CONNECT request (`https://host:4433/wt?token=...`).
    pub path: String,
    /// Open QUIC connections at most, over all listeners; more are refused before the handshake.
    pub max_connections: usize,
    /// Client certificates on the QUIC listener: `off`, `optional` (browsers present none and
    /// use tokens) or `required`. Verified against `tls.client_ca_file`; identities map through
    /// `[[tls.services]]` as on the WebSocket listener.
    pub client_auth: ClientAuth,
    /// WebTransport sessions per QUIC connection (browsers open one per `new WebTransport()`).
    /// Only 1 is supported: a second CONNECT on the same connection is refused with 429.
    pub max_sessions_per_connection: u64,
    /// Bidirectional streams the peer may have open at once. HTTP/3 needs one for the CONNECT
    /// request, the session one more; a few spare let a browser reconnect its stream. Extra
    /// WebTransport streams beyond the session's first are reset.
    pub max_bidi_streams: u64,
    /// Unidirectional streams the peer may have open at once. HTTP/3 needs three (control, QPACK
    /// encoder and decoder); the protocol uses none.
    pub max_uni_streams: u64,
    /// Bytes the peer may send on one stream before we read them (per-stream flow-control window).
    pub stream_receive_window: u64,
    /// Bytes the peer may send on all streams of a connection together before we read them. Bounds
    /// the memory one connection can make us buffer (quinn's default is unbounded).
    pub receive_window: u64,
    /// Milliseconds without any QUIC packet before the connection is dropped.
    pub idle_timeout_ms: u64,
    /// Milliseconds between QUIC keep-alive packets we send, so NAT bindings and the peer's idle
    /// timer stay alive. Must be below `idle_timeout_ms`.
    pub keep_alive_interval_ms: u64,
    /// Incoming datagram bytes buffered per connection before the oldest are dropped.
    pub datagram_receive_buffer_bytes: usize,
    /// Outgoing datagram bytes buffered per connection; a datagram that does not fit is dropped
    /// (counted in `roomwire_datagrams_dropped_total{reason="buffer_full"}`).
    pub datagram_send_buffer_bytes: usize,
    /// PEM certificate chain. Empty (with `key_file` empty): a self-signed ECDSA P-256 certificate
    /// for localhost, 127.0.0.1 and ::1 is generated at start and rotated; its SHA-256 is served at
    /// `GET /webtransport/certhash` for browsers' `serverCertificateHashes`.
    pub cert_file: String,
    /// PEM private key (PKCS#8, SEC1 or RSA) of `cert_file`.
    pub key_file: String,
    /// Days a generated certificate is valid. Chromium accepts `serverCertificateHashes` only for
    /// certificates valid at most 14 days; a new one is generated when half the validity is over.
    pub generated_cert_validity_days: u32,
    /// Milliseconds after which a generated certificate is replaced by a new one; 0 means half
    /// its validity. Browsers fetch the new hash from `/webtransport/certhash` when they reconnect.
    pub generated_cert_rotate_after_ms: u64,
    /// When a client must prove its address with a QUIC Retry (one extra round trip) before the
    /// node does any handshake work: `never`, `always`, or `under_load`.
    pub address_validation: AddressValidation,
    /// With `under_load`: handshakes in progress above which new connections get a Retry.
    pub retry_above_handshakes: usize,
}

/// QUIC address validation (Retry) policy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AddressValidation {
    Never,
    Always,
    /// Retry only while more than `retry_above_handshakes` handshakes are in progress: spoofed
    /// floods then cost one stateless packet each, normal clients no extra round trip.
    UnderLoad,
}

impl Default for WebTransportConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: vec![
                SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 4433)),
                SocketAddr::from(([127, 0, 0, 1], 4433)),
            ],
            path: "/wt".into(),
            max_connections: 10_000,
            client_auth: ClientAuth::Off,
            max_sessions_per_connection: 1,
            max_bidi_streams: 4,
            max_uni_streams: 8,
            stream_receive_window: 256 * 1024,
            receive_window: 1024 * 1024,
            idle_timeout_ms: 30_000,
            keep_alive_interval_ms: 10_000,
            datagram_receive_buffer_bytes: 64 * 1024,
            datagram_send_buffer_bytes: 256 * 1024,
            cert_file: String::new(),
            key_file: String::new(),
            generated_cert_validity_days: 10,
            generated_cert_rotate_after_ms: 0,
            address_validation: AddressValidation::UnderLoad,
            retry_above_handshakes: 256,
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
    /// Rooms whose owner state this node holds at most (a few hundred bytes each); beyond it,
    /// joins and publishes to new rooms are refused with the retryable UNAVAILABLE.
    pub max_owned_rooms: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            max_name_bytes: 128,
            idle_ttl_ms: 300_000,
            dedupe_window_ms: 120_000,
            dedupe_max_per_room: 10_000,
            max_owned_rooms: 1_000_000,
        }
    }
}

/// How connection tokens are checked.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Allow the insecure mode on non-loopback listen addresses (closed test networks only).
    pub allow_insecure_on_public_addresses: bool,
    /// JWT verification (`mode = "jwt"`).
    pub jwt: JwtConfig,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Development only: no verification. A non-empty token is taken as the user id; without one
    /// the session gets an anonymous id (`anon-<session>`). Every room is allowed.
    #[default]
    Insecure,
    /// Every session presents a JWT (in the upgrade request or in Connect), checked per `[auth.jwt]`.
    Jwt,
}

/// JWT connection tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The one algorithm accepted; tokens with another `alg` (including `none`) are refused.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret (at least 32 bytes), inline...
    pub secret: Option<String>,
    /// ...or read from a file (surrounding whitespace trimmed).
    pub secret_file: Option<String>,
    /// ES256 / RS256: the issuer's public key, PEM...
    pub public_key_file: Option<String>,
    /// ...or a JWKS file; tokens then name their key with `kid`.
    pub jwks_file: Option<String>,
    /// Accepted `aud` values; when non-empty a token must carry one of them.
    pub audience: Vec<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_s: u64,
    /// Refuse tokens without a `jti` (needed for replay protection).
    pub require_jti: bool,
    /// Longest accepted token lifetime (`exp - iat`), seconds; bounds the replay store.
    pub max_lifetime_s: u64,
    /// Token ids remembered at most; beyond it (after purging expired ones) new tokens are refused
    /// as retryable until room frees up.
    pub replay_store_max: usize,
    /// Seconds before expiry that a session is sent `TokenExpiring` and should `Refresh`.
    pub refresh_warning_s: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::Hs256,
            secret: None,
            secret_file: None,
            public_key_file: None,
            jwks_file: None,
            audience: vec!["roomwire".into()],
            issuer: None,
            leeway_s: 5,
            require_jti: true,
            max_lifetime_s: 86_400,
            replay_store_max: 1_000_000,
            refresh_warning_s: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "ES256")]
    Es256,
    #[serde(rename = "RS256")]
    Rs256,
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
        }
    }
}

/// TLS and mutual TLS on the HTTP/WebSocket port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve `https://` and `wss://` instead of plain HTTP on `server.listen`.
    pub enabled: bool,
    /// The node's certificate chain (PEM, leaf first) and private key (PEM).
    pub cert_file: String,
    pub key_file: String,
    /// Client certificates: `off`, `optional` (verified when presented; browsers use tokens) or
    /// `required` (connections without a valid certificate are refused).
    pub client_auth: ClientAuth,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca_file: Option<String>,
    /// Milliseconds between checks of the files above; changed files are loaded without restart.
    pub reload_interval_ms: u64,
    /// Services identified by client certificate, each with its room permissions.
    pub services: Vec<ServiceIdentity>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cert_file: "certs/dev/node.pem".into(),
            key_file: "certs/dev/node-key.pem".into(),
            client_auth: ClientAuth::Off,
            client_ca_file: None,
            reload_interval_ms: 30_000,
            services: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Off,
    Optional,
    Required,
}

/// A service known by its client certificate: its URI SAN (e.g.
/// `spiffe://roomwire/service/billing`, as `roomwire certs init --service billing` makes) or DNS
/// SAN. `name` becomes the session's user id.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceIdentity {
    pub name: String,
    pub uri: Option<String>,
    pub dns: Option<String>,
    /// Room patterns the service may join and publish to (`*` one segment, `>` the rest).
    pub join: Vec<String>,
    pub publish: Vec<String>,
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

/// A configuration that cannot be used; the node exits with code 64 before binding anything.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("override `{0}`: expected section.key=value")]
    Override(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Builds the configuration from an optional file, environment variables (`ROOMWIRE__*`) and
    /// `section.key=value` overrides, then validates it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut tree = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source,
                })?
            }
            None => toml::Table::new(),
        };
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let key = k
                    .strip_prefix(ENV_PREFIX)?
                    .to_ascii_lowercase()
                    .replace("__", ".");
                Some((key, v))
            })
            .collect();
        env.sort();
        for (key, value) in env {
            set_path(&mut tree, &key, &value).map_err(|()| ConfigError::Override(key))?;
        }
        for item in overrides {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::Override(item.clone()))?;
            set_path(&mut tree, key.trim(), value.trim())
                .map_err(|()| ConfigError::Override(item.clone()))?;
        }
        let config = Config::deserialize(tree).map_err(|source| ConfigError::Parse {
            path: file.map_or("(overrides)".into(), |p| p.display().to_string()),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between values that serde cannot: called before anything is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if self.server.listen.is_empty() {
            return bad("server.listen needs at least one address");
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections must be at least 1");
        }
        if self.server.handshake_timeout_ms == 0 {
            return bad("server.handshake_timeout_ms must be positive");
        }
        if self.server.max_header_bytes < 8192 {
            return bad("server.max_header_bytes must be at least 8192 (hyper's minimum)");
        }
        let s = &self.session;
        if s.heartbeat_interval_ms == 0 || s.idle_timeout_ms <= s.heartbeat_interval_ms {
            return bad("session.idle_timeout_ms must exceed session.heartbeat_interval_ms (> 0)");
        }
        if s.max_frame_bytes < 256 {
            return bad("session.max_frame_bytes must be at least 256");
        }
        if s.send_queue_frames == 0 || s.send_queue_bytes < s.max_frame_bytes {
            return bad(
                "session.send_queue_frames must be >= 1 and send_queue_bytes >= max_frame_bytes",
            );
        }
        if s.max_rooms == 0 {
            return bad("session.max_rooms must be at least 1");
        }
        if s.ws_read_buffer_bytes < 256 {
            return bad("session.ws_read_buffer_bytes must be at least 256");
        }
        if !(8..=1024).contains(&self.rooms.max_name_bytes) {
            return bad("rooms.max_name_bytes must be within 8..=1024");
        }
        if !self.node.id.is_empty() && !crate::room::is_name_segment(&self.node.id) {
            return bad("node.id may hold only letters, digits and _-:@=");
        }
        if self.node.region.is_empty() || !crate::room::is_name_segment(&self.node.region) {
            return bad("node.region must be non-empty and hold only letters, digits and _-:@=");
        }
        let l = &self.limits;
        if l.connections_per_ip_per_second == 0
            || l.connection_burst_per_ip == 0
            || l.max_connections_per_ip == 0
        {
            return bad("limits: per-IP connection limits must be positive");
        }
        if l.session_frames_per_second == 0
            || l.session_frame_burst == 0
            || l.session_bytes_per_second == 0
        {
            return bad("limits: per-session rates must be positive");
        }
        if (l.session_byte_burst as usize) < s.max_frame_bytes {
            return bad("limits.session_byte_burst must be at least session.max_frame_bytes");
        }
        if self.auth.mode == AuthMode::Insecure
            && !self.auth.allow_insecure_on_public_addresses
            && (self.server.listen.iter().any(|a| !a.ip().is_loopback())
                || (self.webtransport.enabled
                    && self
                        .webtransport
                        .listen
                        .iter()
                        .any(|a| !a.ip().is_loopback())))
        {
            return bad(
                "auth.mode = \"insecure\" lets anyone claim any user: on a non-loopback address use mode = \"jwt\" (or set auth.allow_insecure_on_public_addresses = true for a closed test network)",
            );
        }
        let jwt = &self.auth.jwt;
        if jwt.max_lifetime_s == 0
            || jwt.max_lifetime_s > 30 * 86_400
            || jwt.refresh_warning_s >= jwt.max_lifetime_s
        {
            return bad(
                "auth.jwt.max_lifetime_s must be within 1..=2592000 (30 days) and exceed refresh_warning_s",
            );
        }
        if self.tls.reload_interval_ms == 0 {
            return bad("tls.reload_interval_ms must be positive");
        }
        if self.webtransport.client_auth != ClientAuth::Off && self.tls.client_ca_file.is_none() {
            return bad("webtransport.client_auth needs tls.client_ca_file");
        }
        if self.tls.client_auth != ClientAuth::Off && !self.tls.enabled {
            return bad("tls.client_auth needs tls.enabled = true");
        }
        crate::tls::TlsState::load(&self.tls)
            .map_err(|e| ConfigError::Invalid(format!("{e:#}")))?;
        if self.auth.mode == AuthMode::Jwt {
            crate::auth::Authenticator::new(&self.auth)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if self.api.keys.iter().any(|k| k.len() < 16) {
            return bad("api.keys must each be at least 16 characters");
        }
        self.validate_webtransport()?;
        self.validate_mesh()
    }

    fn validate_mesh(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        let m = &self.mesh;
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !token_ok(&m.subject_prefix) {
            return bad("mesh.subject_prefix must be non-empty letters, digits, '-' or '_'");
        }
        if !m.nats_urls.is_empty() && !token_ok(&self.node.id) && !self.node.id.is_empty() {
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
        if m.request_timeout_ms == 0 || m.route_deadline_ms < m.request_timeout_ms {
            return bad("mesh.route_deadline_ms must be at least mesh.request_timeout_ms (> 0)");
        }
        if m.vnodes == 0 || m.vnodes > 4096 {
            return bad("mesh.vnodes must be between 1 and 4096");
        }
        if m.subscription_capacity == 0 {
            return bad("mesh.subscription_capacity must be at least 1");
        }
        Ok(())
    }

    fn validate_webtransport(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        let w = &self.webtransport;
        if !w.enabled {
            return Ok(());
        }
        if w.listen.is_empty() {
            return bad("webtransport.listen needs at least one address (or enabled = false)");
        }
        if !w.path.starts_with('/') {
            return bad("webtransport.path must start with /");
        }
        if w.max_connections == 0 {
            return bad("webtransport.max_connections must be at least 1");
        }
        if w.max_sessions_per_connection != 1 {
            return bad("webtransport.max_sessions_per_connection must be 1");
        }
        if w.max_bidi_streams < 2 || w.max_uni_streams < 3 {
            return bad(
                "webtransport.max_bidi_streams must be >= 2 and max_uni_streams >= 3 (HTTP/3 needs them)",
            );
        }
        if w.stream_receive_window < 1024 || w.receive_window < w.stream_receive_window {
            return bad(
                "webtransport.stream_receive_window must be >= 1024 and receive_window >= stream_receive_window",
            );
        }
        if w.keep_alive_interval_ms == 0 || w.idle_timeout_ms <= w.keep_alive_interval_ms {
            return bad(
                "webtransport.idle_timeout_ms must exceed webtransport.keep_alive_interval_ms (> 0)",
            );
        }
        if w.cert_file.is_empty() != w.key_file.is_empty() {
            return bad("webtransport.cert_file and key_file go together");
        }
        if !(1..14).contains(&w.generated_cert_validity_days) {
            return bad(
                "webtransport.generated_cert_validity_days must be 1..=13 (Chromium: < 14)",
            );
        }
        if w.generated_cert_rotate_after_ms
            >= u64::from(w.generated_cert_validity_days) * 86_400_000
        {
            return bad(
                "webtransport.generated_cert_rotate_after_ms must be below the certificate's validity",
            );
        }
        if w.datagram_send_buffer_bytes < 1500 || w.datagram_receive_buffer_bytes < 1500 {
            return bad("webtransport datagram buffers must be at least 1500 bytes");
        }
        Ok(())
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.server.handshake_timeout_ms)
    }

    pub fn drain_grace(&self) -> Duration {
        Duration::from_millis(self.server.drain_grace_ms)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.session.heartbeat_interval_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.session.idle_timeout_ms)
    }
}

/// Sets `a.b.c = value` in a TOML tree. The value is read as TOML when it parses as such (numbers,
/// booleans, arrays such as `["127.0.0.1:8080"]`), otherwise as a plain string.
fn set_path(tree: &mut toml::Table, key: &str, value: &str) -> Result<(), ()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(());
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let (last, sections) = parts.split_last().ok_or(())?;
    let mut table = tree;
    for section in sections {
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or(())?;
    }
    table.insert(last.to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn env_and_overrides_layer_over_file_values() {
        let env = vec![
            ("ROOMWIRE__NODE__REGION".to_string(), "eu".to_string()),
            ("ROOMWIRE__SESSION__MAX_ROOMS".to_string(), "7".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let overrides = vec!["session.max_rooms=9".to_string()];
        let config = Config::load(None, env, &overrides).unwrap();
        assert_eq!(config.node.region, "eu");
        assert_eq!(config.session.max_rooms, 9);
    }

    #[test]
    fn listen_list_parses_from_an_override() {
        let overrides = vec![r#"server.listen=["127.0.0.1:0", "[::1]:0"]"#.to_string()];
        let config = Config::load(None, Vec::new(), &overrides).unwrap();
        assert_eq!(config.server.listen.len(), 2);
    }

    #[test]
    fn unknown_keys_and_bad_relations_are_refused() {
        let err = Config::load(None, Vec::new(), &["session.max_romos=1".into()]).unwrap_err();
        assert!(err.to_string().contains("max_romos"), "{err}");
        let err = Config::load(
            None,
            Vec::new(),
            &[
                "session.heartbeat_interval_ms=5000".into(),
                "session.idle_timeout_ms=1000".into(),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
    }

    #[test]
    fn webtransport_limits_are_validated() {
        for bad in [
            "webtransport.max_bidi_streams=1",
            "webtransport.keep_alive_interval_ms=40000",
            "webtransport.generated_cert_validity_days=14",
            "webtransport.max_sessions_per_connection=2",
            "webtransport.receive_window=2048",
            r#"webtransport.cert_file="cert.pem""#,
        ] {
            let err = Config::load(None, Vec::new(), &[bad.into()]).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
        }
        // Disabled, its addresses do not matter.
        Config::load(
            None,
            Vec::new(),
            &[
                "webtransport.enabled=false".into(),
                "webtransport.listen=[]".into(),
            ],
        )
        .unwrap();
    }

    #[test]
    fn insecure_auth_is_refused_on_a_public_address() {
        let err = Config::load(
            None,
            Vec::new(),
            &[r#"server.listen=["0.0.0.0:8080"]"#.into()],
        )
        .unwrap_err();
        assert!(err.to_string().contains("insecure"), "{err}");
        let overrides = [
            r#"server.listen=["0.0.0.0:8080"]"#.into(),
            "auth.allow_insecure_on_public_addresses=true".into(),
        ];
        Config::load(None, Vec::new(), &overrides).unwrap();
    }

    #[test]
    fn the_region_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("regions/local.toml");
        Config::load(Some(&path), Vec::new(), &[]).unwrap();
    }
}
