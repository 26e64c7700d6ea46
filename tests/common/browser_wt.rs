//! A WebTransport session opened and closed the way Chromium does it, over raw quinn and
//! web-transport-proto (the Rust client's web-transport-quinn hides the CONNECT stream): SETTINGS,
//! the CONNECT request, one bidirectional stream for the session. [`BrowserLikeSession::close`]
//! is `WebTransport.close()`: a CLOSE_WEBTRANSPORT_SESSION capsule (or none) and FIN on the
//! CONNECT stream, and nothing more. Chromium leaves the QUIC connection open for the server to
//! close and neither finishes nor resets the session's streams, so a node that does not read the
//! CONNECT stream keeps the member until the QUIC idle timeout.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use prost::Message as _;
use roomwire::proto::framing::{self, Delimited};
use roomwire::proto::{ClientFrame, ServerFrame, client_frame};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use web_transport_quinn::proto::{
    Capsule, ConnectRequest, ConnectResponse, Frame, Settings, VarInt,
};

use super::{DEADLINE, TestNode};

pub struct BrowserLikeSession {
    pub conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
    /// Our SETTINGS stream: dropping it would finish the control stream.
    _control: quinn::SendStream,
    connect_send: quinn::SendStream,
    _connect_recv: quinn::RecvStream,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    next_request: u64,
}

impl BrowserLikeSession {
    /// Opens a session on `node` with `token` in the CONNECT URL, and sends Connect.
    pub async fn open(node: &TestNode, token: &str) -> BrowserLikeSession {
        tokio::time::timeout(DEADLINE, Self::open_inner(node, token))
            .await
            .expect("the browser-like session opens in time")
    }

    async fn open_inner(node: &TestNode, token: &str) -> BrowserLikeSession {
        let (endpoint, conn) = quic_connection(node).await;
        let addr = node.wt_addr.expect("webtransport enabled");

        let mut control = conn.open_uni().await.unwrap();
        let mut settings = Settings::default();
        settings.enable_webtransport(1);
        settings.write(&mut control).await.unwrap();

        let (mut connect_send, mut connect_recv) = conn.open_bi().await.unwrap();
        let url = url::Url::parse(&format!("https://{addr}/wt?token={token}")).unwrap();
        ConnectRequest::new(url)
            .write(&mut connect_send)
            .await
            .unwrap();
        let response = ConnectResponse::read(&mut connect_recv)
            .await
            .expect("a CONNECT response");
        assert_eq!(response.status, http::StatusCode::OK);

        let session_id =
            VarInt::try_from(quinn::VarInt::from(connect_send.id()).into_inner()).unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let mut header = Vec::new();
        Frame::WEBTRANSPORT.encode(&mut header);
        session_id.encode(&mut header);
        send.write_all(&header).await.unwrap();

        let mut session = BrowserLikeSession {
            conn,
            _endpoint: endpoint,
            _control: control,
            connect_send,
            _connect_recv: connect_recv,
            send,
            recv,
            buf: BytesMut::new(),
            next_request: 1,
        };
        let connected = session
            .request(client_frame::Kind::Connect(roomwire::proto::Connect {
                client_name: "browser-like/1".into(),
                ..Default::default()
            }))
            .await;
        assert!(
            matches!(
                connected.kind,
                Some(roomwire::proto::server_frame::Kind::Connected(_))
            ),
            "{connected:?}"
        );
        session
    }

    /// Sends one frame and returns the next frame the node sends.
    pub async fn request(&mut self, kind: client_frame::Kind) -> ServerFrame {
        let frame = ClientFrame {
            request_id: self.next_request,
            kind: Some(kind),
        };
        self.next_request += 1;
        let mut out = BytesMut::new();
        framing::delimit_into(&frame.encode_to_vec(), &mut out);
        self.send.write_all(&out).await.unwrap();
        tokio::time::timeout(DEADLINE, self.read_frame())
            .await
            .expect("an answer in time")
    }

    async fn read_frame(&mut self) -> ServerFrame {
        loop {
            if let Delimited::Frame { prefix, len } = framing::parse_delimited(&self.buf, 1 << 20) {
                self.buf.advance(prefix);
                let frame = self.buf.split_to(len);
                return ServerFrame::decode(frame).expect("a ServerFrame");
            }
            let chunk = self
                .recv
                .read_chunk(usize::MAX, true)
                .await
                .expect("the session stream reads")
                .expect("the session stream is open");
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }

    /// Closes the session as Chromium's `WebTransport.close()` does: the capsule (when given a
    /// code) and FIN on the CONNECT stream. The QUIC connection and the session stream stay open.
    pub async fn close(&mut self, capsule: Option<(u32, &str)>) {
        if let Some((code, reason)) = capsule {
            let mut payload = Vec::new();
            Capsule::CloseWebTransportSession {
                code,
                reason: reason.into(),
            }
            .encode(&mut payload);
            let mut data = Vec::new();
            Frame::DATA.encode(&mut data);
            VarInt::try_from(payload.len()).unwrap().encode(&mut data);
            data.extend_from_slice(&payload);
            self.connect_send.write_all(&data).await.unwrap();
        }
        self.connect_send.finish().unwrap();
    }
}

/// A QUIC connection to `node`'s WebTransport port (ALPN h3), trusting its certificate by its
/// SHA-256 as a browser given `serverCertificateHashes` does. Nothing sent on it yet.
pub async fn quic_connection(node: &TestNode) -> (quinn::Endpoint, quinn::Connection) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
            sha256: hex_bytes(&node.cert_hash_hex()),
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = node.wt_addr.expect("webtransport enabled");
    let conn = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(quic)), addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    (endpoint, conn)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Trusts exactly the certificate with this SHA-256, as `serverCertificateHashes` does.
#[derive(Debug)]
struct PinnedCertificate {
    sha256: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let hash = ring::digest::digest(&ring::digest::SHA256, end_entity);
        if hash.as_ref() == self.sha256.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("certificate hash mismatch".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
