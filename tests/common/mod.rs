//! The shared test harness: a real node on 127.0.0.1:0 in this process, real WebSocket clients,
//! raw sockets for bad input, and waits on conditions with deadlines (never bare sleeps).
//! [`nats`] starts real nats-server processes (alone or joined by gateways) and
//! [`node_process`] runs the real `roomwire` binary, for the mesh tests; [`mesh`] holds their
//! members and publishers. The failure tests add [`traffic`] (paced publishers that record
//! every attempt), [`audit`] (the delivery contract, checked), [`proxy`] (a TCP proxy that can
//! blackhole a node's NATS connection) and [`faketime`] (a node's wall clock, moved).
//! [`browser_wt`] opens and closes a WebTransport session the way Chromium does; [`impair`] is a
//! lossy, slow UDP path between a QUIC client and a node.
#![allow(dead_code)]

pub mod audit;
pub mod browser_wt;
pub mod faketime;
pub mod impair;
pub mod mesh;
pub mod nats;
pub mod node_process;
pub mod proxy;
pub mod traffic;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use roomwire::client::{Client, ClientError, ClientOptions, Event};
use roomwire::proto::{self, ClientFrame, ServerFrame, client_frame};
use roomwire::{Config, Node, NodeContext};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const API_KEY: &str = "test-api-key-0123456789";
/// Upper bound for any single wait in a test; generous so a loaded CI box does not flake.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub type RawWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestNode {
    pub addr: SocketAddr,
    /// The WebTransport (UDP) address, when enabled.
    pub wt_addr: Option<SocketAddr>,
    pub ctx: Arc<NodeContext>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    /// Starts a node with the embedded defaults, port 0, a known API key, and `tweak` applied.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestNode {
        let mut config = Config::default();
        config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.api.keys = vec![API_KEY.into()];
        config.node.id = "test-node".into();
        config.server.drain_grace_ms = 5_000;
        config.webtransport.listen = vec!["127.0.0.1:0".parse().unwrap()];
        tweak(&mut config);
        let node = Node::bind(config).await.expect("node binds");
        let addr = node.local_addrs()[0];
        let wt_addr = node.webtransport_addrs().first().copied();
        let ctx = node.context();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(node.run(shutdown.clone()));
        TestNode {
            addr,
            wt_addr,
            ctx,
            shutdown,
            task,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A connected client whose token (insecure mode) is `user`.
    pub async fn client(&self, user: &str) -> Client {
        Client::connect(&self.ws_url(), ClientOptions::user(user))
            .await
            .expect("client connects")
    }

    pub fn wt_url(&self) -> String {
        format!("https://{}/wt", self.wt_addr.expect("webtransport enabled"))
    }

    /// The SHA-256 (hex) of the node's current WebTransport certificate.
    pub fn cert_hash_hex(&self) -> String {
        self.ctx
            .webtransport_cert
            .as_ref()
            .and_then(|c| c.get())
            .expect("a webtransport certificate")
            .hex
    }

    /// Client options trusting the node's generated certificate by its SHA-256.
    pub fn wt_options(&self, user: &str) -> ClientOptions {
        let hex = self.cert_hash_hex();
        let hash = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        ClientOptions {
            cert_hashes: vec![hash],
            ..ClientOptions::user(user)
        }
    }

    /// A client connected over WebTransport whose token (insecure mode) is `user`.
    pub async fn wt_client(&self, user: &str) -> Client {
        Client::connect(&self.wt_url(), self.wt_options(user))
            .await
            .expect("webtransport client connects")
    }

    /// A raw WebSocket connection with no Connect sent yet.
    pub async fn raw(&self) -> RawWs {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url())
            .await
            .expect("raw websocket connects");
        ws
    }

    /// A raw WebSocket connection that has sent Connect as `user` and read Connected.
    pub async fn raw_connected(&self, user: &str) -> RawWs {
        let mut ws = self.raw().await;
        send_frame(
            &mut ws,
            1,
            client_frame::Kind::Connect(proto::Connect {
                token: user.into(),
                ..Default::default()
            }),
        )
        .await;
        let frame = read_frame(&mut ws).await.expect("Connected");
        assert!(
            matches!(frame.kind, Some(proto::server_frame::Kind::Connected(_))),
            "{frame:?}"
        );
        ws
    }

    /// Current value of a metric line, e.g. `roomwire_slow_consumer_drops_total` or
    /// `roomwire_sessions_closed_total{reason="idle_timeout"}`; 0 when absent.
    pub fn metric(&self, line_prefix: &str) -> f64 {
        self.ctx
            .metrics
            .render()
            .lines()
            .find_map(|l| {
                l.strip_prefix(line_prefix)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// One HTTP/1.1 request on a fresh connection; returns (status, body).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        http_request(self.addr, method, path, key, body).await
    }

    /// Starts the graceful shutdown (the drain) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Whether the node has finished (drained and stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Triggers the graceful shutdown and waits for the node to finish draining.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("node drains in time")
            .unwrap()
            .unwrap();
    }
}

pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    try_http_request(addr, method, path, key, body)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// [`http_request`] for polling: a refused or reset connection is an error, not a panic. Answers
/// sent with `Transfer-Encoding: chunked` (Go's net/http, e.g. nats-server's monitoring port,
/// for larger bodies) are de-chunked.
pub async fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.unwrap_or("");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no http response in time")
        })??;
    let response = String::from_utf8_lossy(&response).to_string();
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The payload of a complete HTTP/1.1 chunked body.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

pub async fn send_frame<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    request_id: u64,
    kind: client_frame::Kind,
) {
    let frame = ClientFrame {
        request_id,
        kind: Some(kind),
    };
    ws.send(WsMessage::Binary(Bytes::from(frame.encode_to_vec())))
        .await
        .unwrap();
}

/// The next ServerFrame on a raw connection (`None` when it closed first).
pub async fn read_frame<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Option<ServerFrame> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(WsMessage::Binary(b))) => {
                return Some(ServerFrame::decode(b).expect("decodable ServerFrame"));
            }
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Reads a raw connection until it closes; returns the close code, if a close frame came.
pub async fn close_code<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Option<u16> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("connection closes in time")
        {
            Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return None,
        }
    }
}

/// The next Message event of a client, skipping nothing else silently: any other event fails.
/// Runs `command` to completion: its standard output, trimmed (a panic with its standard error
/// if it failed).
pub fn stdout_of(command: &mut std::process::Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The addresses `section.listen` names in a configuration as `--print-config` writes it.
pub fn listen_addrs(config: &toml::Value, section: &str) -> Vec<std::net::SocketAddr> {
    config[section]["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect()
}

pub async fn next_message(client: &mut Client) -> proto::Message {
    match tokio::time::timeout(DEADLINE, client.next_event())
        .await
        .expect("a message in time")
    {
        Some(Event::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The client's events until it closes; returns the close code.
pub async fn closed_code(client: &mut Client) -> Option<u16> {
    loop {
        match tokio::time::timeout(DEADLINE, client.next_event())
            .await
            .expect("close in time")
        {
            Some(Event::Closed { code, .. }) => return code,
            Some(_) => continue,
            None => return None,
        }
    }
}

/// The error code of a request the node refused (`None` for any other failure).
pub fn refused_code(error: &ClientError) -> Option<proto::ErrorCode> {
    match error {
        ClientError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

/// Polls `condition` until it holds or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
