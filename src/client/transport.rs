//! The client's connections: the TLS configuration, the WebTransport session, and the read loops
//! of both transports, which hand every frame to the [`Dispatcher`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use prost::Message as _;
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::proto::framing::{self, Delimited};
use crate::proto::{self, ClientFrame, client_frame};

use super::{ClientError, ClientOptions, Dispatcher, MAX_INBOUND_FRAME_BYTES, Writer, Ws};

pub(super) async fn ws_read_loop(mut stream: SplitStream<Ws>, dispatcher: Dispatcher) {
    let (code, reason) = loop {
        let message = match stream.next().await {
            None => break (None, "connection ended".to_string()),
            Some(Err(error)) => break (None, error.to_string()),
            Some(Ok(message)) => message,
        };
        let delivered = match message {
            WsMessage::Binary(bytes) => dispatcher.frame(bytes, false).await,
            WsMessage::Close(frame) => {
                // Reading on lets tungstenite send the close reply, completing the handshake.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while stream.next().await.is_some() {}
                })
                .await;
                break (
                    frame.as_ref().map(|f| u16::from(f.code)),
                    frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                );
            }
            _ => true,
        };
        if !delivered {
            return;
        }
    };
    dispatcher.closed(code, reason).await;
}

/// A rustls client configuration (ring provider) for `wss://` and WebTransport: trusting the CA
/// file when one is given (else the system's roots), presenting the client certificate when one
/// is configured (mutual TLS).
pub(super) async fn rustls_config(
    options: &ClientOptions,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| {
                ClientError::BadUrl(format!("CA file {}: {e}", path.display()))
            };
            let pem = tokio::fs::read(path).await.map_err(|e| bad(&e))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no certificate in it"));
            }
        }
        None => {
            // Unreadable system certificates are skipped; none at all is an error.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(ClientError::BadUrl(
                    "no system CA certificates found: pass --ca-file".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| ClientError::BadUrl(e.to_string()))?
        .with_root_certificates(roots);
    match &options.client_cert {
        None => Ok(tls.with_no_client_auth()),
        Some((cert, key)) => {
            let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
                ClientError::BadUrl(format!("client certificate {}: {e}", what.display()))
            };
            let pem = tokio::fs::read(cert).await.map_err(|e| bad(cert, &e))?;
            let chain = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(cert, &e))?;
            let pem = tokio::fs::read(key).await.map_err(|e| bad(key, &e))?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .map_err(|e| bad(key, &e))?
                .ok_or_else(|| bad(key, &"no private key"))?;
            tls.with_client_auth_cert(chain, key_der)
                .map_err(|e| bad(cert, &e))
        }
    }
}

/// Opens the QUIC connection and the WebTransport session, trusting the configured certificate
/// hashes or CA file (else the system roots). The token goes into the CONNECT request's query.
pub(super) async fn connect_webtransport(
    url: &str,
    options: &ClientOptions,
) -> Result<web_transport_quinn::Session, ClientError> {
    let mut url = url::Url::parse(url).map_err(|e| ClientError::BadUrl(e.to_string()))?;
    if !options.token.is_empty() {
        url.query_pairs_mut().append_pair("token", &options.token);
    }
    let wt_error = |e: web_transport_quinn::ClientError| ClientError::WebTransport(e.to_string());
    let builder = web_transport_quinn::ClientBuilder::new();
    let client = if !options.cert_hashes.is_empty() {
        builder
            .with_server_certificate_hashes(options.cert_hashes.clone())
            .map_err(wt_error)?
    } else if options.ca_file.is_some() {
        let mut tls = rustls_config(options, &[&rustls::version::TLS13]).await?;
        tls.alpn_protocols = vec![web_transport_quinn::ALPN.as_bytes().to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::WebTransport(e.to_string()))?;
        let endpoint = quinn::Endpoint::client(std::net::SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            0,
        )))
        .map_err(|e| ClientError::WebTransport(e.to_string()))?;
        web_transport_quinn::Client::new(endpoint, quinn::ClientConfig::new(Arc::new(quic)))
    } else {
        builder.with_system_roots().map_err(wt_error)?
    };
    client.connect(url).await.map_err(|e| match e {
        web_transport_quinn::ClientError::HttpError(
            web_transport_quinn::ConnectError::ErrorStatus(status),
        ) => ClientError::Status(status.as_u16()),
        web_transport_quinn::ClientError::HttpError(
            web_transport_quinn::ConnectError::ProtoError(
                web_transport_quinn::proto::ConnectError::WrongStatus(Some(status))
                | web_transport_quinn::proto::ConnectError::ErrorStatus(status),
            ),
        ) => ClientError::Status(status.as_u16()),
        other => wt_error(other),
    })
}

/// The WebTransport reader: length-delimited frames on the session stream, datagrams, and the
/// application Pings that keep the session alive (QUIC keep-alives are not visible to the node's
/// session). On the node's FIN it sends its own and reads the close code from the connection.
pub(super) async fn wt_read_loop(
    session: web_transport_quinn::Session,
    mut recv: web_transport_quinn::RecvStream,
    writer: Arc<Writer>,
    dispatcher: Dispatcher,
    ping_interval: Duration,
) {
    let mut buf = bytes::BytesMut::new();
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    let (code, reason) = 'read: loop {
        loop {
            match framing::parse_delimited(&buf, MAX_INBOUND_FRAME_BYTES) {
                Delimited::Frame { prefix, len } => {
                    let _ = buf.split_to(prefix);
                    let frame = buf.split_to(len).freeze();
                    if !dispatcher.frame(frame, false).await {
                        return;
                    }
                }
                Delimited::Incomplete { need } => {
                    buf.reserve(need.saturating_sub(buf.len()).max(4096));
                    break;
                }
                _ => break 'read (None, "invalid length prefix from the node".to_string()),
            }
        }
        tokio::select! {
            read = recv.read_buf(&mut buf) => match read {
                Ok(0) => break (None, String::new()),
                Ok(_) => {}
                Err(error) => break (None, error.to_string()),
            },
            datagram = session.read_datagram() => match datagram {
                Ok(datagram) => {
                    if !dispatcher.frame(datagram, true).await {
                        return;
                    }
                }
                Err(error) => break (None, error.to_string()),
            },
            _ = ticker.tick() => {
                let ping = ClientFrame {
                    request_id: 0,
                    kind: Some(client_frame::Kind::Ping(proto::Ping { nonce: 0 })),
                };
                let _ = writer.send(ping.encode_to_vec()).await;
            }
        }
    };
    // The node finished its stream (or the connection broke): finish ours, then the node closes
    // the connection with the session's close code.
    writer.finish().await;
    // The node sends a CLOSE_WEBTRANSPORT_SESSION capsule with its code and reason, then closes
    // the connection with the code mapped into the HTTP/3 space: either way the session's close
    // error carries the code.
    let (code, reason) = match tokio::time::timeout(Duration::from_secs(3), session.closed()).await
    {
        Ok(web_transport_quinn::SessionError::WebTransportError(
            web_transport_quinn::WebTransportError::Closed(code, why),
        )) => (u16::try_from(code).ok(), why),
        _ => (code, reason),
    };
    dispatcher.closed(code, reason).await;
}
