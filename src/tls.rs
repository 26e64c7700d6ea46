//! TLS on the HTTP/WebSocket port (`wss://`, `https://`) with rustls and the ring provider, and
//! mutual TLS: `off`, `optional` (browsers without a certificate authenticate with tokens) or
//! `required`.
//!
//! rustls checks the client certificate's chain against the configured CA and its validity; it
//! does not know which service a certificate names. That is checked after the handshake by
//! [`crate::auth::Services`]: a certificate that chains to the CA but names no configured service
//! is refused.
//!
//! Certificates are re-read when their files change (checked every `reload_interval_ms`), so a
//! rotation needs no restart; a broken new file is logged and the previous configuration kept.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use anyhow::Context as _;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{ClientAuth, TlsConfig};

/// The live TLS configuration of the node.
pub struct TlsState {
    current: RwLock<Arc<ServerConfig>>,
    config: TlsConfig,
    files: Vec<PathBuf>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl TlsState {
    /// Loads certificates and keys; `None` when TLS is disabled.
    pub fn load(config: &TlsConfig) -> anyhow::Result<Option<Arc<TlsState>>> {
        if !config.enabled {
            return Ok(None);
        }
        let server_config = build(config)?;
        let mut files = vec![
            PathBuf::from(&config.cert_file),
            PathBuf::from(&config.key_file),
        ];
        files.extend(config.client_ca_file.iter().map(PathBuf::from));
        let stamps = Mutex::new(files.iter().map(modified).collect());
        Ok(Some(Arc::new(TlsState {
            current: RwLock::new(Arc::new(server_config)),
            config: config.clone(),
            files,
            stamps,
        })))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls lock poisoned").clone())
    }

    /// Re-reads the files if any changed. Returns whether a new configuration is in force.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let now: Vec<_> = self.files.iter().map(modified).collect();
        let mut stamps = self.stamps.lock().expect("tls lock poisoned");
        if *stamps == now {
            return Ok(false);
        }
        // The stamps move only after a successful build: a file caught mid-write is retried on
        // the next tick instead of being taken as seen.
        let fresh = build(&self.config)?;
        *self.current.write().expect("tls lock poisoned") = Arc::new(fresh);
        *stamps = now;
        Ok(true)
    }

    pub fn reload_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.reload_interval_ms)
    }
}

/// The client-certificate verifier for a listener in `mode` (`None` when off): the chain must
/// lead to a CA in `ca_file`; `optional` also admits clients that present no certificate.
/// Shared by the WebSocket (TCP) and WebTransport (QUIC) listeners.
pub fn client_verifier(
    mode: ClientAuth,
    ca_file: Option<&str>,
) -> anyhow::Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>> {
    if mode == ClientAuth::Off {
        return Ok(None);
    }
    let ca_file = ca_file.context("tls.client_ca_file is needed for client certificates")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("tls.client_ca_file {ca_file}"))?
    {
        roots.add(cert.with_context(|| format!("tls.client_ca_file {ca_file}"))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let verifier = if mode == ClientAuth::Optional {
        verifier.allow_unauthenticated()
    } else {
        verifier
    };
    Ok(Some(verifier.build()?))
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn build(config: &TlsConfig) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("tls.cert_file {}", config.cert_file))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "tls.cert_file {}: no certificate",
        config.cert_file
    );
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .with_context(|| format!("tls.key_file {}", config.key_file))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_verifier(config.client_auth, config.client_ca_file.as_deref())? {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut server_config = builder
        .with_single_cert(certs, key)
        .context("tls: certificate and key do not match")?;
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(server_config)
}
