//! `[auth]`, `[tls]`, `[webtransport]`: who may connect, and over which encrypted transports.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

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
    /// Token ids remembered at most by the node-local store (standalone, or a mesh falling back
    /// to it); beyond it (after purging expired ones) new tokens are refused as retryable until
    /// room frees up. In a mesh the token ids live in a JetStream KV bucket instead.
    pub replay_store_max: usize,
    /// In a mesh, what happens to a token when the mesh's token-id store (JetStream) cannot be
    /// reached within `mesh.request_timeout_ms`: `refuse` it as retryable (fail closed), or let
    /// this node's own store decide (`node`: the token cannot be replayed on this node, but may be
    /// on another one meanwhile).
    pub replay_when_unavailable: ReplayWhenUnavailable,
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
            replay_when_unavailable: ReplayWhenUnavailable::Refuse,
            refresh_warning_s: 60,
        }
    }
}

/// What a mesh node does with a token while the shared token-id store is unreachable.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplayWhenUnavailable {
    /// Refuse with the retryable 503 / UNAVAILABLE: no token is accepted that was not checked
    /// against every node's use of it.
    #[default]
    Refuse,
    /// Claim the token id in this node's own store, log a warning and count it in
    /// `roomwire_replay_fallbacks_total`: connections keep working during a JetStream outage,
    /// at the cost of a token being usable once per node meanwhile.
    Node,
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
    /// Only 1 is supported: a second CONNECT on the same connection is not answered (its
    /// stream is dropped).
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

impl WebTransportConfig {
    /// Checks the QUIC and certificate values (nothing is read from disk here).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        let w = self;
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
}
