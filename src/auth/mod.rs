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
//! delivers). Each token id (`jti`) is accepted once within the token's lifetime. This module
//! verifies a token and says which id it uses up ([`TokenId`]); where the id is claimed is the
//! node context's choice: the node-local [`Authenticator::claim_locally`] standalone, the mesh's
//! shared store (a JetStream KV bucket) in a mesh, so a token cannot be replayed on another node.

use std::sync::Arc;

use crate::config::{AuthConfig, AuthMode};
use crate::proto::ErrorCode;
use crate::room::{RoomName, RoomPattern};

mod api_key;
mod identity;
mod jwt;
mod mint;
mod replay;

pub use api_key::{ApiKeys, bearer};
pub use identity::Services;
use jwt::JwtVerifier;
pub use mint::{TokenRequest, mint, parse_ttl};
use replay::ReplayGuard;

/// Which rooms a principal may join and publish to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub join: Vec<RoomPattern>,
    pub publish: Vec<RoomPattern>,
}

impl Permissions {
    /// Everything (insecure development mode).
    pub fn all() -> Self {
        let any = RoomPattern::parse(">").expect("a valid pattern");
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
                .map(|p| RoomPattern::parse(p).map_err(|e| AuthError::Invalid(e.to_string())))
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

/// The token id a verified token uses up, and until when it must be remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenId {
    pub jti: String,
    /// Unix seconds: the token's `exp` plus the leeway, the last second in which a node accepts
    /// the token (it is refused from the next one on).
    pub keep_until: u64,
}

/// An authenticated identity.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: Arc<str>,
    pub permissions: Permissions,
    /// Unix seconds when the credential expires; `None` for credentials that do not.
    pub expires_at: Option<u64>,
    /// The token's `info` claim (empty: none): the member's presence info, set by whoever
    /// issued the token, in every room keeping presence that the session joins (a Join's
    /// `presence_info` cannot replace it; a Refresh's token applies to later Joins).
    pub info: bytes::Bytes,
}

/// Why a credential was refused. Each maps to HTTP 401 before an upgrade, to the close code 4004
/// on a Connect, and to the error code UNAUTHORIZED on a Refresh; the [retryable](AuthError::retryable)
/// ones to HTTP 503 and the error code UNAVAILABLE instead.
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
    /// The mesh's token-id store could not be reached in time, and the node may not decide
    /// alone (`auth.jwt.replay_when_unavailable = "refuse"`).
    #[error("token replay check unavailable, retry later")]
    ReplayCheckUnavailable,
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        if self.retryable() {
            ErrorCode::Unavailable
        } else {
            ErrorCode::Unauthorized
        }
    }

    /// The token was not judged (a store is full or unreachable): the same token may succeed
    /// later, so the refusal is 503 / UNAVAILABLE, not 401 / UNAUTHORIZED.
    pub fn retryable(&self) -> bool {
        matches!(self, AuthError::Busy | AuthError::ReplayCheckUnavailable)
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
            AuthError::ReplayCheckUnavailable => "replay_unavailable",
        }
    }
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

    /// Verifies a connection token at `now` (Unix seconds) and returns the token id it uses up,
    /// which the caller must claim before admitting the principal.
    pub fn verify(&self, token: &str, now: u64) -> Result<(Principal, Option<TokenId>), AuthError> {
        match (&self.mode, &self.jwt) {
            (AuthMode::Jwt, Some(jwt)) => jwt.verify(token, now),
            _ => Ok((insecure(token)?, None)),
        }
    }

    /// Verifies a refresh token for a live session of `user`, like [`Authenticator::verify`]; a
    /// token for another user is refused before its id is used up.
    pub fn verify_refresh(
        &self,
        token: &str,
        user: &str,
        now: u64,
    ) -> Result<(Principal, Option<TokenId>), AuthError> {
        let (principal, id) = self.verify(token, now)?;
        if *principal.user != *user {
            return Err(AuthError::WrongUser);
        }
        Ok((principal, id))
    }

    /// Claims a token id in this node's own store: accepted once until it expires.
    pub fn claim_locally(&self, id: &TokenId, now: u64) -> Result<(), AuthError> {
        self.replay.claim(&id.jti, id.keep_until, now)
    }

    /// Token ids currently remembered.
    pub fn replay_entries(&self) -> usize {
        self.replay.len()
    }

    pub fn requires_token(&self) -> bool {
        self.mode == AuthMode::Jwt
    }
}

/// Development mode: a non-empty token is the user id; without one the user is anonymous, with
/// a random id (not a counter: one anonymous user must not guess another's `$user.` room or
/// take over its id on a later connect). A token can never act as a service: `service:` ids
/// belong to client certificates.
fn insecure(token: &str) -> Result<Principal, AuthError> {
    let user = if token.is_empty() {
        format!("anon-{}", crate::ids::random_hex(8))
    } else if token.starts_with(crate::ids::SERVICE_PREFIX) {
        return Err(AuthError::Invalid(format!(
            "user ids starting with {:?} are reserved for services identified by certificate",
            crate::ids::SERVICE_PREFIX
        )));
    } else if crate::ids::is_valid_user_id(token) {
        token.to_string()
    } else {
        return Err(AuthError::Invalid(crate::ids::USER_ID_RULE.into()));
    };
    Ok(Principal {
        user: user.into(),
        permissions: Permissions::all(),
        expires_at: None,
        info: bytes::Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_tokens_never_panic_the_verifier(token in ".{0,300}", bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut config = AuthConfig { mode: AuthMode::Jwt, ..AuthConfig::default() };
            config.jwt.secret = Some("x".repeat(32));
            let auth = Authenticator::new(&config).unwrap();
            let _ = auth.verify(&token, 1_000);
            let _ = auth.verify(&String::from_utf8_lossy(&bytes), 1_000);
            let _ = RoomPattern::parse(&token);
        }
    }
}
