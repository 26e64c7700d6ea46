//! Development certificates: `roomwire certs init` makes a CA, a node certificate and service
//! client certificates under `certs/` with rcgen. Keys are written next to their certificates as
//! `*-key.pem` (git-ignored, mode 0600). For production, use your own PKI: the node only needs PEM
//! files (see the README's TLS section).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// URI SAN of a service's client certificate; the node maps it to the service's principal.
pub fn service_uri(name: &str) -> String {
    format!("spiffe://roomwire/service/{name}")
}

/// A calendar date, (year, month, day).
pub type Date = (i32, u8, u8);

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A development certificate authority.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

impl DevCa {
    pub fn new(common_name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = name(common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, key)?,
            key_pem,
        })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for a node: DNS names and IP addresses as SANs.
    pub fn node(&self, names: &[String]) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = name(names.first().map_or("roomwire node", String::as_str));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate naming service `name` by the URI SAN `spiffe://roomwire/service/<name>`.
    pub fn service(&self, service: &str) -> anyhow::Result<Issued> {
        self.client(service, None)
    }

    /// A client certificate with an explicit validity window, as (year, month, day) dates
    /// (tests use it for expired certificates).
    pub fn client(&self, service: &str, validity: Option<(Date, Date)>) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(service_uri(service).try_into()?)];
        params.distinguished_name = name(service);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some(((y1, m1, d1), (y2, m2, d2))) = validity {
            params.not_before = rcgen::date_time_ymd(y1, m1, d1);
            params.not_after = rcgen::date_time_ymd(y2, m2, d2);
        }
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> anyhow::Result<Issued> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "roomwire");
    dn
}

/// Writes a development CA, a node certificate (localhost, 127.0.0.1, ::1 and `extra_names`) and
/// one client certificate per service into `dir`. Returns the files written. Files already there
/// are replaced only with `overwrite`: a new CA silently replacing the old one would make every
/// certificate it signed untrusted. Nothing is written when any check fails.
pub fn init(
    dir: &Path,
    extra_names: &[String],
    services: &[String],
    overwrite: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    for service in services {
        anyhow::ensure!(
            crate::ids::is_valid_user_id(service),
            "service name {service:?}: {}",
            crate::ids::USER_ID_RULE
        );
    }
    if !overwrite {
        let mut files = vec![
            "ca.pem".to_string(),
            "ca-key.pem".into(),
            "node.pem".into(),
            "node-key.pem".into(),
        ];
        for service in services {
            files.push(format!("service-{service}.pem"));
            files.push(format!("service-{service}-key.pem"));
        }
        let existing: Vec<&str> = files
            .iter()
            .filter(|file| dir.join(file).exists())
            .map(String::as_str)
            .collect();
        anyhow::ensure!(
            existing.is_empty(),
            "{} already holds {}; nothing was written. Pass --force to replace them (certificates \
             signed by the old CA are then no longer trusted), or choose another --dir",
            dir.display(),
            existing.join(", ")
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = DevCa::new("roomwire development CA")?;
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(extra_names.iter().cloned());
    let mut written = Vec::new();
    let mut write = |file: &str, text: &str, secret: bool| -> anyhow::Result<()> {
        use std::io::Write as _;
        let path = dir.join(file);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        // Keys are created 0600, never briefly readable by others.
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut out = options
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        out.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    write("ca.pem", &ca.cert_pem(), false)?;
    write("ca-key.pem", &ca.key_pem, true)?;
    let node = ca.node(&names)?;
    write("node.pem", &node.cert_pem, false)?;
    write("node-key.pem", &node.key_pem, true)?;
    for service in services {
        let issued = ca.service(service)?;
        write(&format!("service-{service}.pem"), &issued.cert_pem, false)?;
        write(&format!("service-{service}-key.pem"), &issued.key_pem, true)?;
    }
    Ok(written)
}
