//! Who a session is and what it may do.
//!
//! A connection token is a JWT whose algorithm is pinned by configuration (HS256 with a shared
//! secret, or ES256 / RS256 with a public key from PEM or a JWKS file); `alg: none` and algorithm
//! confusion are refused because the header's `alg` must equal the configured one. `exp`, `nbf`,
//! `aud` and `iss` are checked with a small leeway. Claims:
//!
//! ```json
//! { "sub": "alice", "exp": 1795000000, "aud": "roomwire", "jti": "a1b2",
//!   "rooms": { "join": ["chat.*", "news.>"], "publish": ["chat.lobby"] } }
//! ```
//!
//! Room patterns use the NATS convention: `*` matches one segment, `>` one or more trailing ones.
//! A token without `rooms` may join and publish nowhere (the user's own `$user` room still
//! delivers). Each token id (`jti`) is accepted once within the token's lifetime: the replay
//! store is node-local; with the mesh it moves to a NATS KV bucket so a token cannot be replayed
//! on another node either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;

use crate::config::{AuthConfig, AuthMode, JwtAlgorithm};
use crate::proto::ErrorCode;
use crate::room::RoomName;

/// Longest accepted token id; longer ones are refused rather than stored.
const MAX_JTI_BYTES: usize = 128;

/// A room pattern: segments, where `*` matches one segment and a final `>` one or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern(Vec<String>);

impl RoomPattern {
    pub fn parse(pattern: &str) -> Result<Self, AuthError> {
        let segments: Vec<String> = pattern.split('.').map(str::to_string).collect();
        let last = segments.len() - 1;
        let valid = segments
            .iter()
            .enumerate()
            .all(|(i, s)| s == "*" || (s == ">" && i == last) || crate::room::is_name_segment(s));
        if pattern.is_empty() || !valid {
            return Err(AuthError::Invalid(format!("bad room pattern {pattern:?}")));
        }
        Ok(Self(segments))
    }

    pub fn matches(&self, room: &RoomName) -> bool {
        let mut parts = room.as_str().split('.');
        for (i, segment) in self.0.iter().enumerate() {
            match segment.as_str() {
                ">" => return parts.next().is_some() && i == self.0.len() - 1,
                "*" => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if parts.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// Which rooms a principal may join and publish to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub join: Vec<RoomPattern>,
    pub publish: Vec<RoomPattern>,
}

impl Permissions {
    /// Everything (insecure development mode).
    pub fn all() -> Self {
        let any = RoomPattern(vec![">".into()]);
        Self {
            join: vec![any.clone()],
            publish: vec![any],
        }
    }

    /// Parses join and publish pattern lists (token claims, service configuration).
    pub fn parse(join: &[String], publish: &[String]) -> Result<Self, AuthError> {
        let parse = |patterns: &[String]| {
            patterns
                .iter()
                .map(|p| RoomPattern::parse(p))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            join: parse(join)?,
            publish: parse(publish)?,
        })
    }

    pub fn may_join(&self, room: &RoomName) -> bool {
        self.join.iter().any(|p| p.matches(room))
    }

    pub fn may_publish(&self, room: &RoomName) -> bool {
        self.publish.iter().any(|p| p.matches(room))
    }
}

/// An authenticated identity.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: Arc<str>,
    pub permissions: Permissions,
    /// Unix seconds when the credential expires; `None` for credentials that do not.
    pub expires_at: Option<u64>,
}

/// Why a credential was refused. Each maps to HTTP 401 before an upgrade, to the close code 4004
/// on a Connect, and to the error code UNAUTHORIZED on a Refresh.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("token required")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token already used (jti replay)")]
    Replayed,
    #[error("token lifetime exceeds the allowed maximum")]
    TooLong,
    #[error("refresh token is for another user")]
    WrongUser,
    #[error("replay store full, retry later")]
    Busy,
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Busy => ErrorCode::Unavailable,
            _ => ErrorCode::Unauthorized,
        }
    }

    /// Metrics label (`roomwire_auth_failures_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid(_) => "invalid",
            AuthError::Replayed => "replayed",
            AuthError::TooLong => "lifetime",
            AuthError::WrongUser => "wrong_user",
            AuthError::Busy => "busy",
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: Option<u64>,
    jti: Option<String>,
    #[serde(default)]
    rooms: RoomClaims,
}

#[derive(Debug, Default, Deserialize)]
struct RoomClaims {
    #[serde(default)]
    join: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

enum Keys {
    One(DecodingKey),
    /// Keys by `kid`; a token must name one.
    Set(HashMap<String, DecodingKey>),
}

struct JwtVerifier {
    keys: Keys,
    validation: Validation,
    require_jti: bool,
    max_lifetime_s: u64,
}

/// Checks credentials according to `auth.mode`.
pub struct Authenticator {
    mode: AuthMode,
    jwt: Option<JwtVerifier>,
    replay: ReplayGuard,
}

impl Authenticator {
    /// Builds the verifier, loading key files; errors are configuration errors.
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let jwt = match config.mode {
            AuthMode::Insecure => None,
            AuthMode::Jwt => Some(JwtVerifier::new(config)?),
        };
        Ok(Self {
            mode: config.mode,
            jwt,
            replay: ReplayGuard::new(config.jwt.replay_store_max),
        })
    }

    /// Verifies a connection token at `now` (Unix seconds). `session_key` names anonymous users.
    pub fn authenticate(
        &self,
        token: &str,
        session_key: u64,
        now: u64,
    ) -> Result<Principal, AuthError> {
        self.check(token, session_key, now, None)
    }

    /// Verifies a refresh token for a live session of `user`.
    pub fn refresh(&self, token: &str, user: &str, now: u64) -> Result<Principal, AuthError> {
        self.check(token, 0, now, Some(user))
    }

    /// Verifies, then (only if everything else passed) uses up the token id.
    fn check(
        &self,
        token: &str,
        session_key: u64,
        now: u64,
        user: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let (principal, jti) = match (&self.mode, &self.jwt) {
            (AuthMode::Jwt, Some(jwt)) => jwt.verify(token, now)?,
            _ => (insecure(token, session_key)?, None),
        };
        if user.is_some_and(|u| *u != *principal.user) {
            return Err(AuthError::WrongUser);
        }
        if let Some((jti, keep_until)) = jti {
            self.replay.claim(&jti, keep_until, now)?;
        }
        Ok(principal)
    }

    /// Token ids currently remembered.
    pub fn replay_entries(&self) -> usize {
        self.replay.len()
    }

    pub fn requires_token(&self) -> bool {
        self.mode == AuthMode::Jwt
    }
}

/// Development mode: a non-empty token is the user id; without one the user is anonymous.
fn insecure(token: &str, session_key: u64) -> Result<Principal, AuthError> {
    let user = if token.is_empty() {
        format!("anon-{session_key:x}")
    } else if crate::session::is_valid_user_id(token) {
        token.to_string()
    } else {
        return Err(AuthError::Invalid(crate::session::USER_ID_RULE.into()));
    };
    Ok(Principal {
        user: user.into(),
        permissions: Permissions::all(),
        expires_at: None,
    })
}

impl JwtVerifier {
    fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let jwt = &config.jwt;
        let read = |path: &str| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("auth.jwt: reading {path}: {e}"))
        };
        let (algorithm, keys) = match jwt.algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = match (&jwt.secret, &jwt.secret_file) {
                    (Some(s), None) => s.clone().into_bytes(),
                    (None, Some(f)) => read(f)?.trim_ascii().to_vec(),
                    _ => anyhow::bail!("auth.jwt: HS256 needs exactly one of secret, secret_file"),
                };
                anyhow::ensure!(
                    secret.len() >= 32,
                    "auth.jwt: an HS256 secret needs at least 32 bytes"
                );
                (
                    Algorithm::HS256,
                    Keys::One(DecodingKey::from_secret(&secret)),
                )
            }
            JwtAlgorithm::Es256 | JwtAlgorithm::Rs256 => {
                let algorithm = if jwt.algorithm == JwtAlgorithm::Es256 {
                    Algorithm::ES256
                } else {
                    Algorithm::RS256
                };
                let keys = match (&jwt.public_key_file, &jwt.jwks_file) {
                    (Some(f), None) => {
                        let pem = read(f)?;
                        let key = if algorithm == Algorithm::ES256 {
                            DecodingKey::from_ec_pem(&pem)
                        } else {
                            DecodingKey::from_rsa_pem(&pem)
                        };
                        Keys::One(
                            key.map_err(|e| anyhow::anyhow!("auth.jwt.public_key_file {f}: {e}"))?,
                        )
                    }
                    (None, Some(f)) => {
                        let set: JwkSet = serde_json::from_slice(&read(f)?)
                            .map_err(|e| anyhow::anyhow!("auth.jwt.jwks_file {f}: {e}"))?;
                        let mut keys = HashMap::new();
                        for jwk in &set.keys {
                            let kid = jwk.common.key_id.clone().ok_or_else(|| {
                                anyhow::anyhow!("auth.jwt.jwks_file {f}: a key has no kid")
                            })?;
                            let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                                anyhow::anyhow!("auth.jwt.jwks_file {f}: key {kid}: {e}")
                            })?;
                            keys.insert(kid, key);
                        }
                        anyhow::ensure!(!keys.is_empty(), "auth.jwt.jwks_file {f}: no keys");
                        Keys::Set(keys)
                    }
                    _ => anyhow::bail!(
                        "auth.jwt: {:?} needs exactly one of public_key_file, jwks_file",
                        jwt.algorithm
                    ),
                };
                (algorithm, keys)
            }
        };
        // Only the configured algorithm is accepted: this is what refuses `alg: none` and an
        // HS256 token "signed" with an RSA public key.
        let mut validation = Validation::new(algorithm);
        validation.leeway = jwt.leeway_s;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if jwt.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&jwt.audience);
            required.push("aud");
        }
        if let Some(issuer) = &jwt.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            keys,
            validation,
            require_jti: jwt.require_jti,
            max_lifetime_s: jwt.max_lifetime_s,
        })
    }

    /// Checks everything but replay; returns the principal and the (jti, keep-until) to claim.
    fn verify(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Principal, Option<(String, u64)>), AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::Invalid(e.to_string());
        let key = match &self.keys {
            Keys::One(key) => key,
            Keys::Set(keys) => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                let kid = header
                    .kid
                    .ok_or_else(|| AuthError::Invalid("token has no kid".into()))?;
                keys.get(&kid)
                    .ok_or_else(|| AuthError::Invalid(format!("unknown kid {kid:?}")))?
            }
        };
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(invalid)?
            .claims;
        if claims.sub.starts_with(crate::tls::SERVICE_PREFIX) {
            return Err(AuthError::Invalid(
                "sub may not name a certificate service".into(),
            ));
        }
        if !crate::session::is_valid_user_id(&claims.sub) {
            return Err(AuthError::Invalid(format!(
                "sub: {}",
                crate::session::USER_ID_RULE
            )));
        }
        let issued = claims.iat.unwrap_or(now).min(now);
        if claims.exp.saturating_sub(issued) > self.max_lifetime_s {
            return Err(AuthError::TooLong);
        }
        let permissions = Permissions::parse(&claims.rooms.join, &claims.rooms.publish)?;
        let jti = match claims.jti {
            Some(jti) if jti.len() > MAX_JTI_BYTES => {
                return Err(AuthError::Invalid("jti longer than 128 bytes".into()));
            }
            Some(jti) => Some((jti, claims.exp + self.validation.leeway)),
            None if self.require_jti => return Err(AuthError::Invalid("token has no jti".into())),
            None => None,
        };
        Ok((
            Principal {
                user: claims.sub.into(),
                permissions,
                expires_at: Some(claims.exp),
            },
            jti,
        ))
    }
}

/// Token ids seen, each kept until its token expires. Entries are also ordered by expiry, so
/// each claim drops exactly the expired ones (amortised O(log n), never a full scan).
struct ReplayGuard {
    inner: Mutex<Seen>,
    max: usize,
}

#[derive(Default)]
struct Seen {
    by_id: HashMap<String, u64>,
    by_expiry: std::collections::BTreeSet<(u64, String)>,
}

impl ReplayGuard {
    fn new(max: usize) -> Self {
        Self {
            inner: Mutex::new(Seen::default()),
            max,
        }
    }

    /// Accepts `jti` once until `expires` (Unix seconds).
    fn claim(&self, jti: &str, expires: u64, now: u64) -> Result<(), AuthError> {
        let mut seen = self.inner.lock().expect("replay lock poisoned");
        while let Some((exp, _)) = seen.by_expiry.first() {
            if *exp >= now {
                break;
            }
            let (_, id) = seen.by_expiry.pop_first().expect("first exists");
            seen.by_id.remove(&id);
        }
        if seen.by_id.contains_key(jti) {
            return Err(AuthError::Replayed);
        }
        if seen.by_id.len() >= self.max {
            return Err(AuthError::Busy);
        }
        seen.by_id.insert(jti.to_string(), expires);
        seen.by_expiry.insert((expires, jti.to_string()));
        Ok(())
    }

    fn len(&self) -> usize {
        self.inner.lock().expect("replay lock poisoned").by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse_any(name, 128).unwrap()
    }

    #[test]
    fn patterns_match_like_nats_subjects() {
        let p = |s: &str| RoomPattern::parse(s).unwrap();
        assert!(p("chat.lobby").matches(&room("chat.lobby")));
        assert!(!p("chat.lobby").matches(&room("chat.lobby.x")));
        assert!(p("chat.*").matches(&room("chat.lobby")));
        assert!(!p("chat.*").matches(&room("chat")));
        assert!(!p("chat.*").matches(&room("chat.a.b")));
        assert!(p("chat.>").matches(&room("chat.a.b")));
        assert!(!p("chat.>").matches(&room("chat")));
        assert!(p(">").matches(&room("anything.at.all")));
        assert!(p("*.eu.*").matches(&room("chat.eu.lobby")));
        for bad in ["", "a..b", "a.>.b", "a b", "chat.>x"] {
            assert!(RoomPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_jti_is_accepted_once_within_its_lifetime() {
        let guard = ReplayGuard::new(2);
        guard.claim("a", 100, 10).unwrap();
        assert!(matches!(
            guard.claim("a", 100, 50),
            Err(AuthError::Replayed)
        ));
        guard.claim("b", 150, 10).unwrap();
        assert!(matches!(guard.claim("c", 100, 10), Err(AuthError::Busy)));
        // "a" expires first and makes room; "b" is still remembered.
        guard.claim("c", 300, 120).unwrap();
        assert!(matches!(
            guard.claim("b", 300, 120),
            Err(AuthError::Replayed)
        ));
        assert_eq!(guard.len(), 2);
        // Once everything has expired, "a" may be seen again.
        guard.claim("a", 400, 350).unwrap();
        assert_eq!(guard.len(), 1);
    }

    proptest! {
        #[test]
        fn arbitrary_tokens_never_panic_the_verifier(token in ".{0,300}", bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut config = AuthConfig { mode: AuthMode::Jwt, ..AuthConfig::default() };
            config.jwt.secret = Some("x".repeat(32));
            let auth = Authenticator::new(&config).unwrap();
            let _ = auth.authenticate(&token, 1, 1_000);
            let _ = auth.authenticate(&String::from_utf8_lossy(&bytes), 1, 1_000);
            let _ = RoomPattern::parse(&token);
        }
    }
}
