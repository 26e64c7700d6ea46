//! Services known by their client certificate (mutual TLS). rustls checks the chain against the
//! configured CA; which service a certificate names is checked here, after the handshake: its URI
//! SAN (`spiffe://roomwire/service/NAME`) or DNS SAN must match one of `[[tls.services]]`, which
//! gives the session its user id (`service:NAME`) and room permissions.

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::{Permissions, Principal};
use crate::config::TlsConfig;
use crate::ids::{SERVICE_PREFIX, USER_ID_RULE, is_valid_user_id};

/// Why a client certificate that passed the handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("client certificate is not parseable")]
    Unparseable,
    #[error("client certificate names no configured service")]
    Unknown,
}

struct Service {
    name: String,
    uri: Option<String>,
    dns: Option<String>,
    permissions: Permissions,
}

/// The services known by client certificate (`[[tls.services]]`), shared by both listeners.
pub struct Services(Vec<Service>);

impl Services {
    pub fn from_config(config: &TlsConfig) -> anyhow::Result<Services> {
        let services = config
            .services
            .iter()
            .map(|s| {
                let permissions = Permissions::parse(&s.join, &s.publish)
                    .map_err(|e| anyhow::anyhow!("tls.services {}: {e}", s.name))?;
                anyhow::ensure!(
                    s.uri.is_some() || s.dns.is_some(),
                    "tls.services {}: needs uri or dns",
                    s.name
                );
                anyhow::ensure!(
                    is_valid_user_id(&s.name),
                    "tls.services {}: {}",
                    s.name,
                    USER_ID_RULE
                );
                Ok(Service {
                    name: s.name.clone(),
                    uri: s.uri.clone(),
                    dns: s.dns.clone(),
                    permissions,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Services(services))
    }

    /// The principal a verified client certificate names, if it names a configured service.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<Principal, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::Unparseable)?;
        let (_, cert) = X509Certificate::from_der(leaf).map_err(|_| IdentityError::Unparseable)?;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::Unparseable)?;
        let names = san
            .map(|ext| ext.value.general_names.clone())
            .unwrap_or_default();
        for name in &names {
            let service = self.0.iter().find(|s| match name {
                GeneralName::URI(uri) => s.uri.as_deref() == Some(uri),
                GeneralName::DNSName(dns) => s
                    .dns
                    .as_deref()
                    .is_some_and(|d| d.eq_ignore_ascii_case(dns)),
                _ => false,
            });
            if let Some(service) = service {
                return Ok(Principal {
                    user: format!("{SERVICE_PREFIX}{}", service.name).into(),
                    permissions: service.permissions.clone(),
                    // A service cannot refresh: its session ends when its certificate does.
                    expires_at: u64::try_from(cert.validity().not_after.timestamp()).ok(),
                    info: bytes::Bytes::new(),
                });
            }
        }
        Err(IdentityError::Unknown)
    }
}
