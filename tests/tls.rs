//! TLS and mutual TLS on the WebSocket port, with certificates made by the dev CA generator:
//! right, wrong-CA, expired and missing client certificates, identity mapping, and reload.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use roomwire::config::{AuthMode, ClientAuth, ServiceIdentity};
use roomwire::proto::{self, ErrorCode, client_frame, server_frame};
use roomwire::{DevCa, Issued, service_uri};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

struct Pki {
    dir: PathBuf,
    ca: DevCa,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("roomwire-tls-{}", roomwire::random_hex(6)));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let pki = Pki { dir, ca };
        pki.write("ca.pem", &pki.ca.cert_pem());
        pki.write_node_cert();
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).unwrap();
    }

    fn write_node_cert(&self) -> Issued {
        let node = self
            .ca
            .node(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        self.write("node.pem", &node.cert_pem);
        self.write("node-key.pem", &node.key_pem);
        node
    }

    async fn node(
        &self,
        client_auth: ClientAuth,
        tweak: impl FnOnce(&mut roomwire::Config),
    ) -> TestNode {
        TestNode::start_with(|c| {
            c.tls.enabled = true;
            c.tls.cert_file = self.path("node.pem");
            c.tls.key_file = self.path("node-key.pem");
            c.tls.client_auth = client_auth;
            c.tls.client_ca_file = Some(self.path("ca.pem"));
            c.tls.services = vec![ServiceIdentity {
                name: "billing".into(),
                uri: Some(service_uri("billing")),
                dns: None,
                join: vec!["billing.>".into()],
                publish: vec!["billing.>".into()],
            }];
            tweak(c);
        })
        .await
    }

    /// WebTransport client options trusting the CA in `trust` (a file in this PKI's directory) and
    /// presenting the certificate `<name>.pem` / `<name>-key.pem` when given.
    fn wt_options(&self, trust: &str, cert: Option<&str>) -> roomwire::client::ClientOptions {
        roomwire::client::ClientOptions {
            ca_file: Some(self.path(trust).into()),
            client_cert: cert.map(|n| {
                (
                    self.path(&format!("{n}.pem")).into(),
                    self.path(&format!("{n}-key.pem")).into(),
                )
            }),
            ..Default::default()
        }
    }

    /// A client trusting this PKI's CA, presenting `cert` when given.
    fn client(&self, cert: Option<&Issued>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        Arc::new(match cert {
            None => builder.with_no_client_auth(),
            Some(issued) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
        })
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens wss://, sends Connect with `token`, and returns the session and its Connected (or why
/// not: with TLS 1.3 a refused client certificate only shows once the connection is used).
async fn wss(
    node: &TestNode,
    config: Arc<rustls::ClientConfig>,
    token: &str,
) -> Result<(Wss, proto::Connected), String> {
    let tcp = TcpStream::connect(node.addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let url = format!("wss://localhost:{}/ws", node.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    send_frame(
        &mut ws,
        1,
        client_frame::Kind::Connect(proto::Connect {
            token: token.into(),
            ..Default::default()
        }),
    )
    .await;
    match read_frame(&mut ws).await {
        Some(proto::ServerFrame {
            kind: Some(server_frame::Kind::Connected(c)),
            ..
        }) => Ok((ws, c)),
        other => Err(format!("no Connected: {other:?}")),
    }
}

#[tokio::test]
async fn wss_serves_the_configured_certificate_and_plain_ws_is_refused() {
    let pki = Pki::new();
    let node = pki.node(ClientAuth::Off, |_| {}).await;
    let (_ws, connected) = wss(&node, pki.client(None), "alice").await.unwrap();
    assert_eq!(connected.user_id, "alice");
    assert!(
        tokio_tungstenite::connect_async(node.ws_url())
            .await
            .is_err(),
        "plain ws on a TLS port"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn required_mtls_admits_the_right_certificate_as_its_service_and_refuses_the_rest() {
    let pki = Pki::new();
    // Tokens are required for everyone else: the certificate alone must authenticate billing.
    let node = pki
        .node(ClientAuth::Required, |c| {
            c.auth.mode = AuthMode::Jwt;
            c.auth.jwt.secret = Some("x".repeat(32));
        })
        .await;
    let billing = pki.ca.service("billing").unwrap();
    let (mut ws, connected) = wss(&node, pki.client(Some(&billing)), "").await.unwrap();
    assert_eq!(connected.user_id, "service:billing");
    // The session ends with the certificate (rcgen's default validity runs to 4096).
    assert!(
        connected.token_expires_at_ms > 4_000_000_000_000,
        "{}",
        connected.token_expires_at_ms
    );
    // Its permissions come from its [[tls.services]] entry.
    send_frame(
        &mut ws,
        2,
        client_frame::Kind::Join(proto::Join {
            room: "billing.invoices".into(),
            ..Default::default()
        }),
    )
    .await;
    assert!(matches!(
        read_frame(&mut ws).await.unwrap().kind,
        Some(server_frame::Kind::Joined(_))
    ));
    send_frame(
        &mut ws,
        3,
        client_frame::Kind::Join(proto::Join {
            room: "chat.lobby".into(),
            ..Default::default()
        }),
    )
    .await;
    match read_frame(&mut ws).await.unwrap().kind {
        Some(server_frame::Kind::Error(e)) => {
            assert_eq!(ErrorCode::try_from(e.code).unwrap(), ErrorCode::Forbidden)
        }
        other => panic!("{other:?}"),
    }

    let other_ca = DevCa::new("someone else's CA").unwrap();
    let cases = [
        ("no certificate", None),
        ("wrong CA", Some(other_ca.service("billing").unwrap())),
        (
            "expired",
            Some(
                pki.ca
                    .client("billing", Some(((2020, 1, 1), (2021, 1, 1))))
                    .unwrap(),
            ),
        ),
        ("unknown service", Some(pki.ca.service("rogue").unwrap())),
    ];
    for (what, cert) in cases {
        let result = wss(&node, pki.client(cert.as_ref()), "").await;
        assert!(result.is_err(), "{what}: accepted");
    }
    assert!(node.metric(r#"roomwire_connections_refused_total{reason="tls_handshake"}"#) >= 3.0);
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="tls_identity"}"#),
        1.0
    );
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="ws"}"#),
        1.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn optional_mtls_lets_browsers_in_with_tokens_only() {
    let pki = Pki::new();
    let node = pki.node(ClientAuth::Optional, |_| {}).await;
    // No certificate (a browser): the token decides (insecure mode here: the token is the user).
    let (_ws, connected) = wss(&node, pki.client(None), "browser-user").await.unwrap();
    assert_eq!(connected.user_id, "browser-user");
    let billing = pki.ca.service("billing").unwrap();
    let (_ws, connected) = wss(&node, pki.client(Some(&billing)), "ignored")
        .await
        .unwrap();
    assert_eq!(connected.user_id, "service:billing");
    node.shutdown().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let pki = Pki::new();
    let node = pki
        .node(ClientAuth::Off, |c| c.tls.reload_interval_ms = 50)
        .await;
    let served = || async {
        let tcp = TcpStream::connect(node.addr).await.unwrap();
        let tls = TlsConnector::from(pki.client(None))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let before = served().await;
    let rotated = pki.write_node_cert();
    let rotated_der = CertificateDer::from_pem_slice(rotated.cert_pem.as_bytes())
        .unwrap()
        .to_vec();
    assert_ne!(before, rotated_der);
    eventually("new certificate served", || async {
        served().await == rotated_der
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn certs_init_writes_a_ca_a_node_and_service_certificates_a_node_can_use() {
    let dir = std::env::temp_dir().join(format!("roomwire-init-{}", roomwire::random_hex(6)));
    let files =
        roomwire::init_dev_certs(&dir, &["node-1.example".into()], &["billing".into()], false)
            .unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into())
        .collect();
    assert_eq!(
        names,
        [
            "ca.pem",
            "ca-key.pem",
            "node.pem",
            "node-key.pem",
            "service-billing.pem",
            "service-billing-key.pem"
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("node-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "private keys are not world-readable");
    }
    let mut config = roomwire::Config::default();
    config.tls.enabled = true;
    config.tls.cert_file = dir.join("node.pem").display().to_string();
    config.tls.key_file = dir.join("node-key.pem").display().to_string();
    config.tls.client_auth = ClientAuth::Required;
    config.tls.client_ca_file = Some(dir.join("ca.pem").display().to_string());
    config.validate().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn webtransport_mtls_admits_the_right_certificate_as_its_service_and_refuses_the_rest() {
    use roomwire::client::Client;
    let pki = Pki::new();
    let node = pki
        .node(ClientAuth::Off, |c| {
            c.webtransport.cert_file = pki.path("node.pem");
            c.webtransport.key_file = pki.path("node-key.pem");
            c.webtransport.client_auth = ClientAuth::Required;
        })
        .await;
    let other_ca = DevCa::new("someone else's CA").unwrap();
    let certs = [
        ("billing", pki.ca.service("billing").unwrap()),
        ("rogue", pki.ca.service("rogue").unwrap()),
        ("foreign", other_ca.service("billing").unwrap()),
    ];
    for (name, issued) in &certs {
        pki.write(&format!("{name}.pem"), &issued.cert_pem);
        pki.write(&format!("{name}-key.pem"), &issued.key_pem);
    }
    let options = |cert: Option<&str>| pki.wt_options("ca.pem", cert);
    let client = Client::connect(&node.wt_url(), options(Some("billing")))
        .await
        .unwrap();
    assert_eq!(client.connected().user_id, "service:billing");
    client.join("billing.invoices").await.unwrap();
    for (what, cert) in [
        ("no certificate", None),
        ("unknown service", Some("rogue")),
        ("wrong CA", Some("foreign")),
    ] {
        let result = Client::connect(&node.wt_url(), options(cert)).await;
        assert!(result.is_err(), "{what}: accepted");
    }
    assert_eq!(
        node.metric(r#"roomwire_connections_refused_total{reason="tls_identity"}"#),
        1.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_changed_client_ca_file_reaches_the_webtransport_listener_without_a_restart() {
    use roomwire::client::Client;
    let pki = Pki::new();
    let node = pki
        .node(ClientAuth::Off, |c| {
            c.webtransport.cert_file = pki.path("node.pem");
            c.webtransport.key_file = pki.path("node-key.pem");
            c.webtransport.client_auth = ClientAuth::Required;
            c.tls.reload_interval_ms = 50;
        })
        .await;
    let billing = pki.ca.service("billing").unwrap();
    pki.write("billing.pem", &billing.cert_pem);
    pki.write("billing-key.pem", &billing.key_pem);
    // The client trusts the node through its own copy of the CA, so only the node's view changes.
    pki.write("trust.pem", &pki.ca.cert_pem());
    let options = || pki.wt_options("trust.pem", Some("billing"));
    Client::connect(&node.wt_url(), options()).await.unwrap();
    // The operator revokes the CA: the configured client CA file is rewritten with another one.
    pki.write("ca.pem", &DevCa::new("replacement").unwrap().cert_pem());
    eventually("revoked CA refused", || async {
        Client::connect(&node.wt_url(), options()).await.is_err()
    })
    .await;
    // And trusting it again works the same way.
    pki.write("ca.pem", &pki.ca.cert_pem());
    eventually("CA trusted again", || async {
        Client::connect(&node.wt_url(), options()).await.is_ok()
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn the_cli_and_the_rust_client_speak_wss_trusting_a_ca_file() {
    use roomwire::client::Client;
    let pki = Pki::new();
    let node = pki.node(ClientAuth::Optional, |_| {}).await;
    let mut listener = Client::connect(
        &format!("wss://localhost:{}/ws", node.addr.port()),
        pki.wt_options("ca.pem", None).with_token("bob"),
    )
    .await
    .unwrap();
    listener.join("lobby").await.unwrap();

    let url = format!("wss://127.0.0.1:{}/ws", node.addr.port());
    let cli = |args: Vec<String>| async move {
        tokio::time::timeout(
            DEADLINE,
            tokio::process::Command::new(env!("CARGO_BIN_EXE_roomwire"))
                .arg("client")
                .args(args)
                .output(),
        )
        .await
        .expect("the CLI finishes in time")
        .unwrap()
    };
    let args = |extra: &[&str]| {
        let mut args = vec!["--url".to_string(), url.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--token", "carol", "publish", "lobby", "over wss"].map(String::from));
        args
    };
    let output = cli(args(&["--ca-file", &pki.path("ca.pem")])).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("published to lobby"), "{stdout}");
    let m = next_message(&mut listener).await;
    assert_eq!(
        (m.publisher.as_str(), &m.payload[..]),
        ("carol", &b"over wss"[..])
    );

    // Without the CA the node's certificate is not trusted: no session.
    let output = cli(args(&[])).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A client certificate over wss identifies a service (mutual TLS).
    let billing = pki.ca.service("billing").unwrap();
    pki.write("billing.pem", &billing.cert_pem);
    pki.write("billing-key.pem", &billing.key_pem);
    let service = Client::connect(&url, pki.wt_options("ca.pem", Some("billing")))
        .await
        .unwrap();
    assert_eq!(service.connected().user_id, "service:billing");
    node.shutdown().await;
}
