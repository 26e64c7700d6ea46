//! The Rust client library: connects over WebSocket or WebTransport, correlates replies with requests, and hands
//! everything the node sends unasked (messages, GoAway, the close) to [`Client::next_event`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), roomwire::client::ClientError> {
//! use roomwire::client::{Client, ClientOptions, Event};
//! let mut client = Client::connect("ws://127.0.0.1:8080/ws", ClientOptions::user("alice")).await?;
//! client.join("lobby").await?;
//! client.publish("lobby", "hello", &client.next_message_id()).await?;
//! while let Some(Event::Message(m)) = client.next_event().await {
//!     println!("{} #{}: {:?}", m.room, m.seq, m.payload);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::proto::framing::{self};
use crate::proto::{self, ClientFrame, ServerFrame, WS_SUBPROTOCOL, client_frame, server_frame};

mod presence;
mod transport;

pub use presence::{JoinOptions, PresenceView};

use transport::{connect_webtransport, rustls_config, ws_read_loop, wt_read_loop};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a client introduces itself.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub token: String,
    pub client_name: String,
    /// Events (messages, GoAway) buffered before the client stops reading the socket; the node
    /// then sees a slow consumer. Size it for the application's bursts.
    pub event_buffer: usize,
    /// How long to wait for any reply, `Connected` included.
    pub request_timeout: Duration,
    /// WebTransport: SHA-256 hashes of certificates to trust (a node's generated certificate,
    /// from `/webtransport/certhash`), instead of CA roots.
    pub cert_hashes: Vec<Vec<u8>>,
    /// `wss://` and WebTransport: a PEM file of CA certificates to trust instead of the system
    /// roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// `wss://`, or WebTransport with `ca_file`: a client certificate and its key (PEM files) to
    /// present, for nodes that identify services by mutual TLS.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// WebTransport: interval of the application Pings that keep the session alive (the node
    /// closes sessions silent for its idle timeout; WebSocket pongs do this job there).
    pub ping_interval: Duration,
    /// Rooms to rejoin from where a previous session left off (`Connect.resume`): each comes
    /// back as [`Event::Joined`], after the messages it missed.
    pub resume: Vec<proto::RoomPosition>,
    /// Rooms of `resume` whose presence diffs this session receives again.
    pub resume_presence_events: Vec<String>,
    /// A stable id of this device (`Connect.device_id`): the node delivers what was sent to the
    /// user while this device was away, on its next connect. Empty: no offline delivery.
    pub device_id: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: String::new(),
            client_name: concat!("roomwire-rs/", env!("CARGO_PKG_VERSION")).into(),
            event_buffer: 4096,
            request_timeout: Duration::from_secs(10),
            cert_hashes: Vec::new(),
            ca_file: None,
            client_cert: None,
            ping_interval: Duration::from_secs(20),
            resume: Vec::new(),
            resume_presence_events: Vec::new(),
            device_id: String::new(),
        }
    }
}

impl ClientOptions {
    /// Options with a token; in the node's insecure development mode the token is the user id.
    pub fn user(token: &str) -> Self {
        Self {
            token: token.into(),
            ..Self::default()
        }
    }

    /// These options with another token.
    pub fn with_token(self, token: &str) -> Self {
        Self {
            token: token.into(),
            ..self
        }
    }
}

/// Something the node sent that answers no request.
#[derive(Debug, Clone)]
pub enum Event {
    Message(proto::Message),
    /// An unreliable message that arrived as a QUIC datagram (WebTransport only; over WebSocket
    /// unreliable messages arrive as `Message` with seq 0).
    Datagram(proto::Message),
    GoAway(proto::GoAway),
    /// The node removed the session from a room (a refreshed token no longer allows it).
    Left(String),
    /// The session's token expires at this Unix millisecond: call [`Client::refresh`].
    TokenExpiring(u64),
    /// The room's owner changed without a hand-off: its sequence restarts in a new epoch (see
    /// `EpochChanged` in the protocol).
    EpochChanged(proto::EpochChanged),
    /// A room the Connect resumed is joined again (the messages it missed came before this).
    Joined(proto::Joined),
    /// Joins and leaves in a room joined with [`JoinOptions::presence_events`].
    PresenceDiff(proto::PresenceDiff),
    /// An Error frame that answers no request (e.g. a protocol violation, or a room the
    /// Connect's resume could not rejoin: `Error.room`).
    Error(proto::Error),
    /// The connection ended; `code` is the close code (WebSocket close frame, or the WebTransport
    /// session's close code), when one was sent.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("webtransport: {0}")]
    WebTransport(String),
    #[error("the node answered the WebTransport CONNECT with HTTP {0}")]
    Status(u16),
    #[error("bad URL or trust setting: {0}")]
    BadUrl(String),
    #[error("refused by the node: {code:?}: {message}")]
    Refused {
        code: proto::ErrorCode,
        message: String,
        retryable: bool,
    },
    #[error("connection closed (code {code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// Largest frame the client accepts from a node (a node sends at most its max_frame_bytes plus a
/// small envelope); a larger length prefix ends the session instead of a huge allocation.
const MAX_INBOUND_FRAME_BYTES: usize = 16 * 1024 * 1024;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

/// The write half of either transport.
// One Writer per client, behind an Arc: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Writer {
    Ws(tokio::sync::Mutex<SplitSink<Ws, WsMessage>>),
    Wt {
        session: web_transport_quinn::Session,
        send: tokio::sync::Mutex<web_transport_quinn::SendStream>,
    },
}

impl Writer {
    async fn send(&self, frame: Vec<u8>) -> Result<(), ClientError> {
        match self {
            Writer::Ws(sink) => {
                sink.lock()
                    .await
                    .send(WsMessage::Binary(frame.into()))
                    .await?;
            }
            Writer::Wt { send, .. } => {
                let mut buf = Vec::with_capacity(frame.len() + 5);
                framing::delimit_into(&frame, &mut buf);
                send.lock()
                    .await
                    .write_all(&buf)
                    .await
                    .map_err(|e| ClientError::WebTransport(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Ends our side: a WebSocket close (1000), or the WebTransport stream's FIN.
    async fn finish(&self) {
        match self {
            Writer::Ws(sink) => {
                let _ = sink.lock().await.send(WsMessage::Close(None)).await;
            }
            Writer::Wt { send, .. } => {
                let _ = send.lock().await.finish();
            }
        }
    }
}

/// Client message ids for reliable publishes: a random prefix (64 bits from the OS) and a
/// counter. The node de-duplicates ids per user for `rooms.dedupe_window_ms` (120 s by
/// default), so ids that merely count from 1 would collide between two processes of one user
/// (two terminals, or a restart within the window) and the later messages would be dropped as
/// duplicates. Take an id once per message and reuse it for every retry of that message.
#[derive(Debug)]
pub struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl MessageIds {
    pub fn new() -> Self {
        Self {
            prefix: crate::ids::random_hex(8),
            next: AtomicU64::new(1),
        }
    }

    /// The next id: `<16 hex digits>-<n>`.
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.prefix)
    }
}

impl Default for MessageIds {
    fn default() -> Self {
        Self::new()
    }
}

/// A connected session.
pub struct Client {
    writer: Arc<Writer>,
    pending: Pending,
    next_request: AtomicU64,
    message_ids: MessageIds,
    events: mpsc::Receiver<Event>,
    connected: proto::Connected,
    timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
    /// With a device id: the user room, whose messages are reported `seen` once handed to the
    /// application.
    user_room: Option<String>,
}

impl Client {
    /// Connects over WebSocket (`ws://host:8080/ws`, `wss://`) or WebTransport
    /// (`https://host:4433/wt`), sends Connect and waits for Connected.
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let pending: Pending = Arc::default();
        let (events_tx, events) = mpsc::channel(options.event_buffer.max(1));
        let dispatcher = Dispatcher {
            pending: pending.clone(),
            events: events_tx,
        };
        let (writer, reader) = if url.starts_with("https://") {
            let session = connect_webtransport(url, &options).await?;
            let (send, recv) = session
                .open_bi()
                .await
                .map_err(|e| ClientError::WebTransport(e.to_string()))?;
            let writer = Arc::new(Writer::Wt {
                session: session.clone(),
                send: tokio::sync::Mutex::new(send),
            });
            let reader = tokio::spawn(wt_read_loop(
                session,
                recv,
                writer.clone(),
                dispatcher,
                options.ping_interval,
            ));
            (writer, reader)
        } else {
            let mut request = url.into_client_request()?;
            request.headers_mut().insert(
                http::header::SEC_WEBSOCKET_PROTOCOL,
                http::HeaderValue::from_static(WS_SUBPROTOCOL),
            );
            let config = WebSocketConfig::default()
                .read_buffer_size(8 * 1024)
                .write_buffer_size(0);
            let connector = if url.starts_with("wss://") {
                let tls = rustls_config(&options, rustls::DEFAULT_VERSIONS).await?;
                Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls)))
            } else {
                None
            };
            let (ws, _response) = tokio_tungstenite::connect_async_tls_with_config(
                request,
                Some(config),
                true,
                connector,
            )
            .await?;
            let (sink, stream) = ws.split();
            let reader = tokio::spawn(ws_read_loop(stream, dispatcher));
            (Arc::new(Writer::Ws(tokio::sync::Mutex::new(sink))), reader)
        };
        let mut client = Client {
            writer,
            pending,
            next_request: AtomicU64::new(1),
            message_ids: MessageIds::new(),
            events,
            connected: proto::Connected::default(),
            timeout: options.request_timeout,
            reader,
            user_room: None,
        };
        let has_device = !options.device_id.is_empty();
        let reply = client
            .request(client_frame::Kind::Connect(proto::Connect {
                token: options.token,
                client_name: options.client_name,
                resume: (!options.resume.is_empty()).then_some(proto::Resume {
                    rooms: options.resume,
                    presence_events: options.resume_presence_events,
                }),
                device_id: options.device_id,
            }))
            .await;
        match reply {
            Ok(server_frame::Kind::Connected(connected)) => {
                if has_device {
                    client.user_room = Some(format!("$user.{}", connected.user_id));
                }
                client.connected = connected;
                Ok(client)
            }
            Ok(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            // The node's Error frame says most (code, retryable): report it whenever it came.
            Err(error @ ClientError::Refused { .. }) => Err(error),
            // No answer: the connection closed first; report its close code when it came.
            Err(error) => match client.events.try_recv() {
                Ok(Event::Closed { code, reason }) => Err(ClientError::Closed { code, reason }),
                _ => Err(error),
            },
        }
    }

    /// What the node said in `Connected` (session id, node, limits, user id).
    pub fn connected(&self) -> &proto::Connected {
        &self.connected
    }

    pub async fn join(&self, room: &str) -> Result<proto::Joined, ClientError> {
        self.join_since(room, None).await
    }

    /// Joins `room` from where this client left off (`since`: the last message it has, as
    /// (epoch, seq)); the messages after it arrive before the answer (see `Joined.recovery`).
    pub async fn join_since(
        &self,
        room: &str,
        since: Option<(u64, u64)>,
    ) -> Result<proto::Joined, ClientError> {
        self.join_with(
            room,
            JoinOptions {
                since,
                ..JoinOptions::default()
            },
        )
        .await
    }

    /// Joins `room` with every option of `Join` (position, presence diffs, presence info).
    pub async fn join_with(
        &self,
        room: &str,
        options: JoinOptions,
    ) -> Result<proto::Joined, ClientError> {
        let since = options.since.map(|(epoch, seq)| proto::RoomPosition {
            room: room.into(),
            epoch,
            seq,
        });
        match self
            .request(client_frame::Kind::Join(proto::Join {
                room: room.into(),
                since,
                presence_events: options.presence_events,
                presence_info: options.presence_info,
            }))
            .await?
        {
            server_frame::Kind::Joined(joined) => Ok(joined),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A page of `room`'s kept messages: after a position (oldest first), before one (newest
    /// first), or the newest; `limit` 0 is the node's page size.
    pub async fn history(
        &self,
        room: &str,
        after: Option<(u64, u64)>,
        before: Option<(u64, u64)>,
        limit: u32,
    ) -> Result<proto::HistoryPage, ClientError> {
        let position = |(epoch, seq)| proto::RoomPosition {
            room: room.into(),
            epoch,
            seq,
        };
        match self
            .request(client_frame::Kind::History(proto::History {
                room: room.into(),
                after: after.map(position),
                before: before.map(position),
                limit,
            }))
            .await?
        {
            server_frame::Kind::HistoryPage(page) => Ok(page),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        match self
            .request(client_frame::Kind::Leave(proto::Leave {
                room: room.into(),
            }))
            .await?
        {
            server_frame::Kind::Left(_) => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A new client message id, unique to this client (see [`MessageIds`]); reuse it when
    /// retrying the same message.
    pub fn next_message_id(&self) -> String {
        self.message_ids.next_id()
    }

    /// Publishes reliably and waits for the owner's acknowledgement (epoch, seq). A retry with
    /// the same `client_msg_id` that already reached the room is answered with
    /// `PublishAck.duplicate` and the original position, and is not delivered again.
    pub async fn publish(
        &self,
        room: &str,
        payload: impl Into<Bytes>,
        client_msg_id: &str,
    ) -> Result<proto::PublishAck, ClientError> {
        let publish = proto::Publish {
            room: room.into(),
            payload: payload.into(),
            client_msg_id: client_msg_id.into(),
            unreliable: false,
        };
        match self.request(client_frame::Kind::Publish(publish)).await? {
            server_frame::Kind::PublishAck(ack) => Ok(ack),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Publishes without sequencing or acknowledgement (typing indicators, cursors). Over
    /// WebTransport the Publish itself travels as a datagram (and may be lost).
    pub async fn publish_unreliable(
        &self,
        room: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        let publish = proto::Publish {
            room: room.into(),
            payload: payload.into(),
            client_msg_id: String::new(),
            unreliable: true,
        };
        let frame = ClientFrame {
            request_id: 0,
            kind: Some(client_frame::Kind::Publish(publish)),
        };
        match &*self.writer {
            Writer::Wt { session, .. } => session
                .send_datagram(frame.encode_to_vec().into())
                .map_err(|e| ClientError::WebTransport(e.to_string())),
            Writer::Ws(_) => self.send(frame).await,
        }
    }

    /// Tells the node that this device (`ClientOptions::device_id`) has handled its user room
    /// up to `(epoch, seq)`; its next connection replays only what follows (offline delivery).
    /// No reply; a refusal arrives as an `Error` event.
    pub async fn seen(&self, room: &str, epoch: u64, seq: u64) -> Result<(), ClientError> {
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        self.send(ClientFrame {
            request_id,
            kind: Some(client_frame::Kind::Seen(proto::RoomPosition {
                room: room.into(),
                epoch,
                seq,
            })),
        })
        .await
    }

    /// Which transport the client speaks.
    pub fn transport(&self) -> &'static str {
        match &*self.writer {
            Writer::Ws(_) => "ws",
            Writer::Wt { .. } => "webtransport",
        }
    }

    /// Opens one more bidirectional WebTransport stream (tests of the one-stream rule); `None`
    /// over WebSocket.
    pub async fn open_extra_stream(
        &self,
    ) -> Option<
        Result<
            (
                web_transport_quinn::SendStream,
                web_transport_quinn::RecvStream,
            ),
            ClientError,
        >,
    > {
        match &*self.writer {
            Writer::Wt { session, .. } => Some(
                session
                    .open_bi()
                    .await
                    .map_err(|e| ClientError::WebTransport(e.to_string())),
            ),
            Writer::Ws(_) => None,
        }
    }

    /// Replaces the session's token (same user); returns the new expiry, Unix milliseconds.
    pub async fn refresh(&self, token: &str) -> Result<u64, ClientError> {
        match self
            .request(client_frame::Kind::Refresh(proto::Refresh {
                token: token.into(),
            }))
            .await?
        {
            server_frame::Kind::Refreshed(r) => Ok(r.expires_at_ms),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Application-level ping; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self
            .request(client_frame::Kind::Ping(proto::Ping { nonce: 0 }))
            .await?
        {
            server_frame::Kind::Pong(_) => Ok(start.elapsed()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The next thing the node sent unasked; `None` after `Closed` has been returned. With a
    /// device id, a message of the user room is reported `seen` as it is handed over (offline
    /// delivery then resumes after it).
    pub async fn next_event(&mut self) -> Option<Event> {
        let event = self.events.recv().await;
        if let (Some(Event::Message(m)), Some(user_room)) = (&event, &self.user_room)
            && &m.room == user_room
        {
            // A lost report only means the message may be delivered again.
            let _ = self.seen(&m.room, m.epoch, m.seq).await;
        }
        event
    }

    /// Sends one already-built frame (for tests that need exact control of the wire).
    pub async fn send(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.writer.send(frame.encode_to_vec()).await
    }

    /// Sends raw bytes on the session's stream or socket, unframed by the client: over
    /// WebTransport the caller writes the length prefix itself (tests of bad framing).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        match &*self.writer {
            Writer::Ws(_) => self.writer.send(bytes.to_vec()).await,
            Writer::Wt { send, .. } => send
                .lock()
                .await
                .write_all(bytes)
                .await
                .map_err(|e| ClientError::WebTransport(e.to_string())),
        }
    }

    /// WebTransport: closes the WebTransport session with `code`, as a browser's
    /// `WebTransport.close()` does (a CLOSE_WEBTRANSPORT_SESSION capsule on the CONNECT stream,
    /// then the QUIC connection); returns false over WebSocket.
    pub fn close_webtransport_session(&self, code: u32, reason: &str) -> bool {
        match &*self.writer {
            Writer::Wt { session, .. } => {
                session.close(code, reason.as_bytes());
                true
            }
            Writer::Ws(_) => false,
        }
    }

    /// WebTransport: closes the QUIC connection at once, without closing the session first (a
    /// process or tab that goes away); returns false over WebSocket.
    pub fn close_quic_connection(&self) -> bool {
        match &*self.writer {
            Writer::Wt { session, .. } => {
                let conn: &quinn::Connection = session;
                conn.close(quinn::VarInt::from_u32(0), b"gone");
                true
            }
            Writer::Ws(_) => false,
        }
    }

    /// Closes the session normally (1000).
    pub async fn close(mut self) {
        self.writer.finish().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
    }

    async fn request(&self, kind: client_frame::Kind) -> Result<server_frame::Kind, ClientError> {
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending lock")
            .insert(request_id, tx);
        if let Err(error) = self
            .send(ClientFrame {
                request_id,
                kind: Some(kind),
            })
            .await
        {
            self.pending
                .lock()
                .expect("pending lock")
                .remove(&request_id);
            return Err(error);
        }
        let frame = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(_)) => {
                return Err(ClientError::Closed {
                    code: None,
                    reason: "connection closed".into(),
                });
            }
            Err(_) => {
                self.pending
                    .lock()
                    .expect("pending lock")
                    .remove(&request_id);
                return Err(ClientError::Timeout(self.timeout));
            }
        };
        match frame.kind {
            Some(server_frame::Kind::Error(e)) => Err(ClientError::Refused {
                code: proto::ErrorCode::try_from(e.code).unwrap_or(proto::ErrorCode::Unspecified),
                message: e.message,
                retryable: e.retryable,
            }),
            Some(kind) => Ok(kind),
            None => Err(ClientError::Unexpected("empty frame".into())),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Routes what the node sends, whichever transport it came on: replies to their waiting request,
/// everything else to the event channel. The one dispatcher of both transports.
struct Dispatcher {
    pending: Pending,
    events: mpsc::Sender<Event>,
}

impl Dispatcher {
    /// Routes one encoded ServerFrame; `false` once the application dropped the client.
    async fn frame(&self, bytes: Bytes, datagram: bool) -> bool {
        let Ok(frame) = ServerFrame::decode(bytes) else {
            return true;
        };
        if frame.request_id != 0 {
            let waiter = self
                .pending
                .lock()
                .expect("pending lock")
                .remove(&frame.request_id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(frame);
                return true;
            }
        }
        let event = match frame.kind {
            Some(server_frame::Kind::Message(m)) if datagram => Event::Datagram(m),
            Some(server_frame::Kind::Message(m)) => Event::Message(m),
            Some(server_frame::Kind::GoAway(g)) => Event::GoAway(g),
            Some(server_frame::Kind::TokenExpiring(t)) => Event::TokenExpiring(t.expires_at_ms),
            Some(server_frame::Kind::Left(l)) => Event::Left(l.room),
            Some(server_frame::Kind::Error(e)) => Event::Error(e),
            Some(server_frame::Kind::Joined(j)) => Event::Joined(j),
            Some(server_frame::Kind::EpochChanged(e)) => Event::EpochChanged(e),
            Some(server_frame::Kind::PresenceDiff(d)) => Event::PresenceDiff(d),
            _ => return true,
        };
        self.events.send(event).await.is_ok()
    }

    /// The connection ended: pending requests fail, the application gets `Closed`.
    async fn closed(self, code: Option<u16>, reason: String) {
        self.pending.lock().expect("pending lock").clear();
        let _ = self.events.send(Event::Closed { code, reason }).await;
    }
}
