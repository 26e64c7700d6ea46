//! JWT connection tokens: the one configured algorithm, its keys (HS256 secret, ES256/RS256 PEM
//! or JWKS), and the claims roomwire reads.

use std::collections::HashMap;

use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;

use super::{AuthError, Permissions, Principal, TokenId};
use crate::config::{AuthConfig, JwtAlgorithm};

/// Longest accepted token id; longer ones are refused rather than stored.
const MAX_JTI_BYTES: usize = 128;
/// Longest `info` claim taken (a room's presence caps it further: `rooms.presence_info_max_bytes`).
const MAX_INFO_BYTES: usize = 4096;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: Option<u64>,
    jti: Option<String>,
    #[serde(default)]
    rooms: RoomClaims,
    /// Presence info: a string as it is, any other JSON value as compact JSON text.
    info: Option<serde_json::Value>,
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

pub(super) struct JwtVerifier {
    keys: Keys,
    validation: Validation,
    require_jti: bool,
    max_lifetime_s: u64,
}

impl JwtVerifier {
    pub(super) fn new(config: &AuthConfig) -> anyhow::Result<Self> {
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

    /// Checks everything but replay; returns the principal and the token id to claim.
    pub(super) fn verify(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Principal, Option<TokenId>), AuthError> {
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
        if claims.sub.starts_with(crate::ids::SERVICE_PREFIX) {
            return Err(AuthError::Invalid(
                "sub may not name a certificate service".into(),
            ));
        }
        if !crate::ids::is_valid_user_id(&claims.sub) {
            return Err(AuthError::Invalid(format!(
                "sub: {}",
                crate::ids::USER_ID_RULE
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
            Some(jti) => Some(TokenId {
                jti,
                keep_until: claims.exp + self.validation.leeway,
            }),
            None if self.require_jti => return Err(AuthError::Invalid("token has no jti".into())),
            None => None,
        };
        let info = match claims.info {
            None | Some(serde_json::Value::Null) => Bytes::new(),
            Some(serde_json::Value::String(text)) => Bytes::from(text),
            Some(value) => Bytes::from(value.to_string()),
        };
        if info.len() > MAX_INFO_BYTES {
            return Err(AuthError::Invalid(format!(
                "info longer than {MAX_INFO_BYTES} bytes"
            )));
        }
        Ok((
            Principal {
                user: claims.sub.into(),
                permissions,
                expires_at: Some(claims.exp),
                info,
            },
            jti,
        ))
    }
}
