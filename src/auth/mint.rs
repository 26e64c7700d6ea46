//! Minting connection tokens for trying JWT mode (`roomwire token`): the claims the verifier
//! reads, signed with the configured algorithm, so a token made here is one the node accepts.
//! Production issuers mint their own; this is the development and operations tool.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::config::{AuthConfig, JwtAlgorithm};

/// What a token grants.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub sub: String,
    pub join: Vec<String>,
    pub publish: Vec<String>,
    pub ttl: Duration,
    /// `kid` in the header, for nodes that verify with a JWKS file.
    pub kid: Option<String>,
    /// The `info` claim: the member's presence info.
    pub info: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
    rooms: Rooms<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
struct Rooms<'a> {
    join: &'a [String],
    publish: &'a [String],
}

/// Signs a token for `request` at `now` (Unix seconds): HS256 with the configured secret, or
/// ES256 / RS256 with the private key in `key_pem` (the configuration holds only the public
/// key). `aud` is the configured audience's first value, `iss` the configured issuer, `jti` a
/// fresh random id (each token connects once).
pub fn mint(
    config: &AuthConfig,
    request: &TokenRequest,
    key_pem: Option<&[u8]>,
    now: u64,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        crate::ids::is_valid_user_id(&request.sub),
        "--sub {:?}: {}",
        request.sub,
        crate::ids::USER_ID_RULE
    );
    anyhow::ensure!(
        !request.sub.starts_with(crate::ids::SERVICE_PREFIX),
        "--sub {:?}: service identities come from client certificates, never from tokens",
        request.sub
    );
    for pattern in request.join.iter().chain(&request.publish) {
        anyhow::ensure!(
            crate::ids::is_room_pattern(pattern),
            "{pattern:?} is not a room pattern (segments separated by dots, * or a final >)"
        );
    }
    let ttl = request.ttl.as_secs();
    anyhow::ensure!(ttl > 0, "--ttl must be at least one second");
    let jwt = &config.jwt;
    anyhow::ensure!(
        ttl <= jwt.max_lifetime_s,
        "--ttl {ttl} s is longer than auth.jwt.max_lifetime_s ({} s): the node would refuse it",
        jwt.max_lifetime_s
    );
    let (algorithm, key) = match jwt.algorithm {
        JwtAlgorithm::Hs256 => {
            let secret = match (&jwt.secret, &jwt.secret_file, key_pem) {
                (_, _, Some(key)) => key.trim_ascii().to_vec(),
                (Some(secret), _, None) => secret.clone().into_bytes(),
                (None, Some(file), None) => std::fs::read(file)
                    .map_err(|e| anyhow::anyhow!("auth.jwt.secret_file {file}: {e}"))?
                    .trim_ascii()
                    .to_vec(),
                (None, None, None) => anyhow::bail!(
                    "HS256 needs the node's secret: set auth.jwt.secret or auth.jwt.secret_file \
                     (--config / --set), or pass --key with the secret in a file"
                ),
            };
            anyhow::ensure!(
                secret.len() >= 32,
                "an HS256 secret needs at least 32 bytes"
            );
            (Algorithm::HS256, EncodingKey::from_secret(&secret))
        }
        JwtAlgorithm::Es256 | JwtAlgorithm::Rs256 => {
            let pem = key_pem.ok_or_else(|| {
                anyhow::anyhow!(
                    "{:?} signs with a private key: pass --key FILE (PEM); the node's \
                     configuration holds only the public key",
                    jwt.algorithm
                )
            })?;
            if jwt.algorithm == JwtAlgorithm::Es256 {
                let key = EncodingKey::from_ec_pem(pem)
                    .map_err(|e| anyhow::anyhow!("--key: not an EC private key (PEM): {e}"))?;
                (Algorithm::ES256, key)
            } else {
                let key = EncodingKey::from_rsa_pem(pem)
                    .map_err(|e| anyhow::anyhow!("--key: not an RSA private key (PEM): {e}"))?;
                (Algorithm::RS256, key)
            }
        }
    };
    let claims = Claims {
        sub: &request.sub,
        aud: jwt.audience.first().map(String::as_str),
        iss: jwt.issuer.as_deref(),
        iat: now,
        nbf: now,
        exp: now + ttl,
        jti: crate::ids::random_hex(12),
        rooms: Rooms {
            join: &request.join,
            publish: &request.publish,
        },
        info: request.info.as_ref(),
    };
    let mut header = Header::new(algorithm);
    header.kid = request.kid.clone();
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// A duration like `90s`, `15m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(scale)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;
    use crate::config::AuthMode;

    fn hs256() -> AuthConfig {
        let mut config = AuthConfig {
            mode: AuthMode::Jwt,
            ..AuthConfig::default()
        };
        config.jwt.secret = Some("s".repeat(32));
        config
    }

    fn request(sub: &str) -> TokenRequest {
        TokenRequest {
            sub: sub.into(),
            join: vec!["chat.*".into()],
            publish: vec!["chat.lobby".into()],
            ttl: Duration::from_secs(3600),
            kid: None,
            info: None,
        }
    }

    #[test]
    fn a_minted_token_verifies_with_its_permissions() {
        let config = hs256();
        // jsonwebtoken checks exp against the system clock.
        let now = crate::clock::wall_ms() / 1000;
        let token = mint(&config, &request("alice"), None, now).unwrap();
        let auth = Authenticator::new(&config).unwrap();
        let (principal, id) = auth.verify(&token, now).unwrap();
        assert_eq!(&*principal.user, "alice");
        let room = |name: &str| crate::room::RoomName::parse_client(name, 128).unwrap();
        assert!(principal.permissions.may_join(&room("chat.x")));
        assert!(!principal.permissions.may_join(&room("news.x")));
        assert!(principal.permissions.may_publish(&room("chat.lobby")));
        assert!(!principal.permissions.may_publish(&room("chat.x")));
        assert!(id.is_some(), "a jti, for anti-replay");
        let expired = mint(&config, &request("alice"), None, now - 7200).unwrap();
        assert!(auth.verify(&expired, now).is_err(), "expired an hour ago");
    }

    #[test]
    fn the_info_claim_becomes_the_presence_info() {
        let config = hs256();
        let now = crate::clock::wall_ms() / 1000;
        let auth = Authenticator::new(&config).unwrap();
        let info_of = |info: Option<serde_json::Value>| {
            let request = TokenRequest {
                info,
                ..request("alice")
            };
            let token = mint(&config, &request, None, now).unwrap();
            auth.verify(&token, now).map(|(p, _)| p.info)
        };
        assert_eq!(info_of(None).unwrap(), "");
        assert_eq!(
            info_of(Some(serde_json::json!("Alice"))).unwrap(),
            "Alice",
            "a string as it is"
        );
        assert_eq!(
            info_of(Some(serde_json::json!({"name": "Alice", "color": 3}))).unwrap(),
            r#"{"color":3,"name":"Alice"}"#,
            "other JSON as compact text"
        );
        let huge = serde_json::Value::String("x".repeat(5000));
        assert!(
            info_of(Some(huge)).is_err(),
            "an info claim above 4 KiB is refused"
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let config = hs256();
        assert!(mint(&config, &request("service:billing"), None, 1).is_err());
        assert!(mint(&config, &request("no spaces"), None, 1).is_err());
        let mut long = request("alice");
        long.ttl = Duration::from_secs(config.jwt.max_lifetime_s + 1);
        assert!(mint(&config, &long, None, 1).is_err());
        assert!(mint(&AuthConfig::default(), &request("alice"), None, 1).is_err());
    }

    #[test]
    fn ttls_have_units() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
