//! The Rust client library: connects over WebSocket, correlates replies with requests, and hands
//! everything the node sends unasked (messages, GoAway, the close) to [`Client::next_event`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), roomwire::client::ClientError> {
//! use roomwire::client::{Client, ClientOptions, Event};
//! let mut client = Client::connect("ws://127.0.0.1:8080/ws", ClientOptions::user("alice")).await?;
//! client.join("lobby").await?;
//! client.publish("lobby", "hello", "msg-1").await?;
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
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::proto::{self, ClientFrame, ServerFrame, WS_SUBPROTOCOL, client_frame, server_frame};

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
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: String::new(),
            client_name: concat!("roomwire-rs/", env!("CARGO_PKG_VERSION")).into(),
            event_buffer: 4096,
            request_timeout: Duration::from_secs(10),
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
}

/// Something the node sent that answers no request.
#[derive(Debug, Clone)]
pub enum Event {
    Message(proto::Message),
    GoAway(proto::GoAway),
    /// The node removed the session from a room (a refreshed token no longer allows it).
    Left(String),
    /// The session's token expires at this Unix millisecond: call [`Client::refresh`].
    TokenExpiring(u64),
    /// An Error frame that answers no request (e.g. a protocol violation).
    Error(proto::Error),
    /// The connection ended; `code` is the WebSocket close code, when one was sent.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
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

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

/// A connected session.
pub struct Client {
    sink: tokio::sync::Mutex<SplitSink<Ws, WsMessage>>,
    pending: Pending,
    next_request: AtomicU64,
    events: mpsc::Receiver<Event>,
    connected: proto::Connected,
    timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Opens the WebSocket (subprotocol `roomwire.v1`), sends Connect and waits for Connected.
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static(WS_SUBPROTOCOL),
        );
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0);
        let (ws, _response) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
        let (sink, stream) = ws.split();
        let pending: Pending = Arc::default();
        let (events_tx, events) = mpsc::channel(options.event_buffer.max(1));
        let reader = tokio::spawn(read_loop(stream, pending.clone(), events_tx));
        let mut client = Client {
            sink: tokio::sync::Mutex::new(sink),
            pending,
            next_request: AtomicU64::new(1),
            events,
            connected: proto::Connected::default(),
            timeout: options.request_timeout,
            reader,
        };
        let reply = client
            .request(client_frame::Kind::Connect(proto::Connect {
                token: options.token,
                client_name: options.client_name,
                resume: None,
            }))
            .await;
        match reply {
            Ok(server_frame::Kind::Connected(connected)) => {
                client.connected = connected;
                Ok(client)
            }
            Ok(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            // A refused Connect is followed by the close; report the close code when it came.
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
        match self
            .request(client_frame::Kind::Join(proto::Join { room: room.into() }))
            .await?
        {
            server_frame::Kind::Joined(joined) => Ok(joined),
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

    /// Publishes reliably and waits for the owner's acknowledgement (epoch, seq).
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

    /// Publishes without sequencing or acknowledgement (typing indicators, cursors).
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
        self.send(ClientFrame {
            request_id: 0,
            kind: Some(client_frame::Kind::Publish(publish)),
        })
        .await
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

    /// The next thing the node sent unasked; `None` after `Closed` has been returned.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Sends one already-built frame (for tests that need exact control of the wire).
    pub async fn send(&self, frame: ClientFrame) -> Result<(), ClientError> {
        let bytes = frame.encode_to_vec();
        self.sink
            .lock()
            .await
            .send(WsMessage::Binary(bytes.into()))
            .await?;
        Ok(())
    }

    /// Closes the session normally (1000).
    pub async fn close(mut self) {
        let _ = self.sink.lock().await.send(WsMessage::Close(None)).await;
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

async fn read_loop(mut stream: SplitStream<Ws>, pending: Pending, events: mpsc::Sender<Event>) {
    let closed = loop {
        let message = match stream.next().await {
            None => {
                break Event::Closed {
                    code: None,
                    reason: "connection ended".into(),
                };
            }
            Some(Err(error)) => {
                break Event::Closed {
                    code: None,
                    reason: error.to_string(),
                };
            }
            Some(Ok(message)) => message,
        };
        let bytes = match message {
            WsMessage::Binary(bytes) => bytes,
            WsMessage::Close(frame) => {
                // Reading on lets tungstenite send the close reply, completing the handshake.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while stream.next().await.is_some() {}
                })
                .await;
                break Event::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            _ => continue,
        };
        let Ok(frame) = ServerFrame::decode(bytes) else {
            continue;
        };
        if frame.request_id != 0 {
            let waiter = pending
                .lock()
                .expect("pending lock")
                .remove(&frame.request_id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(frame);
                continue;
            }
        }
        let event = match frame.kind {
            Some(server_frame::Kind::Message(m)) => Event::Message(m),
            Some(server_frame::Kind::GoAway(g)) => Event::GoAway(g),
            Some(server_frame::Kind::TokenExpiring(t)) => Event::TokenExpiring(t.expires_at_ms),
            Some(server_frame::Kind::Left(l)) => Event::Left(l.room),
            Some(server_frame::Kind::Error(e)) => Event::Error(e),
            _ => continue,
        };
        if events.send(event).await.is_err() {
            return;
        }
    };
    pending.lock().expect("pending lock").clear();
    let _ = events.send(closed).await;
}
