//! The WebTransport listener's certificate: loaded from configured PEM files, or generated.
//!
//! A generated certificate is ECDSA P-256, self-signed for `localhost`, `127.0.0.1` and `::1`, and
//! valid for less than 14 days: that is what Chromium accepts through `serverCertificateHashes`,
//! which is how a browser trusts it without any CA. Its SHA-256 is published at
//! `GET /webtransport/certhash`; [`rotate`] replaces it when half its validity is over.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;

use crate::config::WebTransportConfig;

/// Why no certificate could be had.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: String, what: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A certificate chain with its key, and what browsers need to know of it.
pub struct CertifiedKey {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub info: CertInfo,
}

/// What `GET /webtransport/certhash` answers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertInfo {
    /// Always `sha-256` (the only algorithm `serverCertificateHashes` accepts).
    pub algorithm: &'static str,
    /// SHA-256 of the leaf certificate's DER, lowercase hex.
    pub hex: String,
    /// The same digest, standard base64.
    pub base64: String,
    /// Unix milliseconds after which the certificate is no longer valid.
    pub not_after_ms: u64,
    /// Whether the node generated the certificate (and will rotate it).
    pub generated: bool,
}

impl CertInfo {
    fn of(leaf: &CertificateDer<'_>, not_after: SystemTime, generated: bool) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
        Self {
            algorithm: "sha-256",
            hex: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            base64: base64::engine::general_purpose::STANDARD.encode(digest.as_ref()),
            not_after_ms: not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            generated,
        }
    }
}

/// The certificate currently served, shared with the HTTP route.
#[derive(Default)]
pub struct CurrentCert(RwLock<Option<CertInfo>>);

impl CurrentCert {
    pub fn get(&self) -> Option<CertInfo> {
        self.0.read().expect("cert lock poisoned").clone()
    }

    pub fn set(&self, info: CertInfo) {
        *self.0.write().expect("cert lock poisoned") = Some(info);
    }
}

/// Loads the configured files, or generates a certificate when none are configured. File reads
/// and key generation are blocking: call it at startup or from `spawn_blocking`.
pub fn load_or_generate(config: &WebTransportConfig) -> Result<CertifiedKey, CertError> {
    if config.cert_file.is_empty() {
        return generate(Duration::from_secs(
            u64::from(config.generated_cert_validity_days) * 86_400,
        ));
    }
    load(&config.cert_file, &config.key_file)
}

fn load(cert_path: &str, key_path: &str) -> Result<CertifiedKey, CertError> {
    let read = |path: &str| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.into(),
            source,
        })
    };
    let pem_error = |path: &str, what: String| CertError::Pem {
        path: path.into(),
        what,
    };
    let cert_pem = read(cert_path)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(cert_path, "no CERTIFICATE block".into()));
    }
    let key_pem = read(key_path)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| pem_error(key_path, e.to_string()))?
        .ok_or_else(|| pem_error(key_path, "no private key block".into()))?;
    // The expiry is not parsed from the file: configured certificates are the operator's to renew.
    let info = CertInfo::of(&chain[0], SystemTime::UNIX_EPOCH, false);
    Ok(CertifiedKey { chain, key, info })
}

/// A fresh self-signed ECDSA P-256 certificate for the loopback names, valid for `validity`.
pub fn generate(validity: Duration) -> Result<CertifiedKey, CertError> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "roomwire dev (generated)");
    // A minute of slack for clocks that run slightly behind ours; the total stays < 14 days.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    let validity = time::Duration::try_from(validity).unwrap_or(time::Duration::days(10));
    params.not_after = now + validity - time::Duration::minutes(2);
    let cert = params.self_signed(&key_pair)?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(params.not_after.unix_timestamp().max(0) as u64);
    let leaf = cert.der().clone();
    let info = CertInfo::of(&leaf, not_after, true);
    Ok(CertifiedKey {
        chain: vec![leaf],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der())),
        info,
    })
}

/// The rustls server configuration for HTTP/3 (TLS 1.3 only, ALPN `h3`, ring provider).
pub fn server_tls(
    cert: CertifiedKey,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    // Mutual TLS: the chain is verified here; which service it names is checked after the
    // handshake (crate::auth::Services), as on the WebSocket listener.
    let builder = match client_verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut tls = builder.with_single_cert(cert.chain, cert.key)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    Ok(Arc::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_short_lived_and_hashed() {
        let validity = Duration::from_secs(10 * 86_400);
        let cert = generate(validity).unwrap();
        assert!(cert.info.generated);
        assert_eq!(cert.info.hex.len(), 64);
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let left = cert.info.not_after_ms - now_ms;
        assert!(left < 14 * 86_400_000, "valid for {left} ms");
        assert!(left > 9 * 86_400_000, "valid for {left} ms");
        // A second certificate has another key, so another hash.
        assert_ne!(generate(validity).unwrap().info.hex, cert.info.hex);
        server_tls(cert, None).unwrap();
    }
}
