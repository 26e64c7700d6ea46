//! The node's one configuration struct.
//!
//! Sources, later ones winning: the embedded defaults (so `roomwire` with no arguments serves on
//! localhost), a TOML file (`--config`), environment variables `ROOMWIRE__SECTION__KEY=value`, and
//! command-line `--set section.key=value`. Every source is merged into one TOML tree and then
//! deserialized with `deny_unknown_fields`, so a misspelt key is an error whichever source it came
//! from. [`Config::validate`] runs before any port is bound.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod mesh;
mod node;
mod security;
mod telemetry;

pub use mesh::*;
pub use node::*;
pub use security::*;
pub use telemetry::*;

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
    pub telemetry: TelemetryConfig,
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

/// What `--print-config` shows instead of a secret.
pub const REDACTED: &str = "<redacted>";

impl Config {
    /// This configuration with its secrets replaced by [`REDACTED`] (API keys, the HS256
    /// secret, the NATS token, passwords in NATS URLs), for printing. File names stay: they are
    /// where secrets live, not secrets.
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        for key in &mut config.api.keys {
            *key = REDACTED.into();
        }
        if let Some(secret) = &mut config.auth.jwt.secret {
            *secret = REDACTED.into();
        }
        if !config.mesh.token.is_empty() {
            config.mesh.token = REDACTED.into();
        }
        for url in &mut config.mesh.nats_urls {
            if let Ok(mut parsed) = url::Url::parse(url)
                && parsed.password().is_some()
                && parsed.set_password(Some(REDACTED)).is_ok()
            {
                *url = parsed.to_string();
            }
        }
        config
    }

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

    /// Checks the values and the relations between them that serde cannot. Reads no file: the
    /// files the configuration names (certificates, keys) are loaded once, by `Node::bind`,
    /// before it binds any port, and a file that cannot be used is a [`ConfigError`] there too.
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
        self.rooms.validate_classes()?;
        if !self.node.id.is_empty() && !crate::ids::is_name_segment(&self.node.id) {
            return bad("node.id may hold only letters, digits and _-:@=");
        }
        if self.node.region.is_empty() || !crate::ids::is_name_segment(&self.node.region) {
            return bad("node.region must be non-empty and hold only letters, digits and _-:@=");
        }
        let l = &self.limits;
        for block in &l.trusted_proxies {
            if let Err(why) = crate::ids::IpBlock::parse(block) {
                return bad(&format!("limits.trusted_proxies: {why}"));
            }
        }
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
        if self.api.keys.iter().any(|k| k.len() < 16) {
            return bad("api.keys must each be at least 16 characters");
        }
        self.webtransport.validate()?;
        self.telemetry.validate()?;
        self.mesh.validate(&self.node.id)
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
