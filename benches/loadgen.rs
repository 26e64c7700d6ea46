//! The load generator: opens WebSocket sessions against a roomwire node or, as the peer, a
//! nats-server WebSocket listener (speaking the NATS text protocol), and measures what
//! docs/BENCHMARKS.md reports. Each run prints one JSON object per measured step.
//!
//! ```text
//! loadgen idle   --target roomwire --url ws://127.0.0.1:8080/ws --sessions 10000 --pid <node pid>
//! loadgen fanout --target nats --url ws://127.0.0.1:8222 --members 2000 --size 64 --rates 100,200,400
//! loadgen chat   --target roomwire --url ... --rooms 1000 --members-per-room 10 --rate 0.5 --secs 20
//! ```
//!
//! Payloads carry the publisher's sequence number and a send timestamp (Unix nanoseconds; the
//! generator and the server share this machine's clock), so every receiver measures
//! publish-to-receive latency and checks for loss and reordering.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use prost::Message as _;
use roomwire::proto::{self, ClientFrame, ServerFrame, client_frame, server_frame};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;
type SharedSink = Arc<Mutex<SplitSink<Stream, Ws>>>;

/// Receivers fold their local latency histograms into the shared one this often.
const MERGE_EVERY: Duration = Duration::from_millis(100);

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Target {
    Roomwire,
    Nats,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Transport {
    Ws,
    Wt,
}

/// One member session.
enum Member {
    Ws(Stream),
    /// Through the library client, which speaks WebTransport.
    Wt(roomwire::client::Client),
}

#[derive(clap::Args, Clone)]
struct Common {
    #[arg(long, value_enum)]
    target: Target,
    /// WebSocket URL of the server.
    #[arg(long)]
    url: String,
    /// Source addresses to spread connections over (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<String>,
    /// Server process to sample CPU and RSS from.
    #[arg(long)]
    pid: Option<u32>,
    /// Label written into every result line.
    #[arg(long, default_value = "")]
    label: String,
    /// roomwire only: members over WebSocket (`ws`) or WebTransport (`wt`; the publisher stays on
    /// WebSocket, the protocol is the same).
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// WebTransport URL (with --transport wt), e.g. https://127.0.0.1:4433/wt.
    #[arg(long, default_value = "")]
    wt_url: String,
    /// SHA-256 (hex) of the node's WebTransport certificate, from /webtransport/certhash.
    #[arg(long, default_value = "")]
    cert_hash: String,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold idle sessions; report the server's RSS per session.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        sessions: usize,
    },
    /// One publisher, many members in one room; the offered rate is stepped up.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2000)]
        members: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Messages per second offered by the publisher, one step each.
        #[arg(long, value_delimiter = ',', default_value = "50,100,200")]
        rates: Vec<u64>,
        #[arg(long, default_value_t = 10)]
        step_secs: u64,
    },
    /// Many small rooms, every member publishing slowly.
    Chat {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        rooms: usize,
        #[arg(long, default_value_t = 10)]
        members_per_room: usize,
        /// Messages per second per member.
        #[arg(long, default_value_t = 0.5)]
        rate: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 20)]
        secs: u64,
    },
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// CPU seconds (user + system) and RSS bytes of a process, from /proc.
fn proc_sample(pid: &str) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, rss_kb * 1024))
}

struct Sampler {
    server: Option<String>,
    start: Instant,
    server0: Option<(f64, u64)>,
    own0: Option<(f64, u64)>,
}

impl Sampler {
    fn start(pid: Option<u32>) -> Self {
        let server = pid.map(|p| p.to_string());
        Self {
            server0: server.as_deref().and_then(proc_sample),
            own0: proc_sample("self"),
            server,
            start: Instant::now(),
        }
    }

    /// CPU cores used by the server and by this generator since start, and the server's RSS.
    fn finish(&self) -> serde_json::Value {
        let secs = self.start.elapsed().as_secs_f64();
        let server = self.server.as_deref().and_then(proc_sample);
        let own = proc_sample("self");
        let cores = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| match (a, b) {
            (Some(a), Some(b)) => json!((b.0 - a.0) / secs),
            _ => json!(null),
        };
        json!({
            "server_cpu_cores": cores(self.server0, server),
            "loadgen_cpu_cores": cores(self.own0, own),
            "server_rss_bytes": server.map(|s| s.1),
        })
    }
}

/// Payload: publisher sequence number, send time, padding to `size`.
fn payload(seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::zeroed(size.max(16));
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&now_ns().to_le_bytes());
    b.freeze()
}

async fn open(common: &Common, index: usize) -> anyhow::Result<Stream> {
    let source: std::net::IpAddr = common.sources[index % common.sources.len()].parse()?;
    let mut request = common.url.as_str().into_client_request()?;
    let host = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let addr: SocketAddr = tokio::net::lookup_host(&host)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    if common.target == Target::Roomwire {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", proto::WS_SUBPROTOCOL.parse()?);
    }
    // Small read buffers: thousands of these live in one process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        MaybeTlsStream::Plain(tcp),
        Some(config),
    )
    .await?;
    Ok(ws)
}

fn client_frame(request_id: u64, kind: client_frame::Kind) -> Ws {
    Ws::Binary(
        ClientFrame {
            request_id,
            kind: Some(kind),
        }
        .encode_to_vec()
        .into(),
    )
}

/// Reads until a frame satisfies `done` (handshake steps).
async fn roomwire_until(
    ws: &mut Stream,
    mut done: impl FnMut(&ServerFrame) -> bool,
) -> anyhow::Result<()> {
    while let Some(message) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
        if let Ws::Binary(b) = message?
            && done(&ServerFrame::decode(b)?)
        {
            return Ok(());
        }
    }
    anyhow::bail!("closed during handshake")
}

/// Reads NATS protocol lines until one starts with `prefix`.
async fn nats_until(ws: &mut Stream, prefix: &str) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
        match message? {
            Ws::Binary(b) => buf.extend_from_slice(&b),
            Ws::Text(t) => buf.extend_from_slice(t.as_bytes()),
            _ => continue,
        }
        if String::from_utf8_lossy(&buf)
            .lines()
            .any(|l| l.starts_with(prefix))
        {
            return Ok(());
        }
    }
    anyhow::bail!("closed before {prefix}")
}

/// Connects one session and makes it a member of `room`; `user` names it.
async fn member(common: &Common, index: usize, room: &str) -> anyhow::Result<Stream> {
    let mut ws = open(common, index).await?;
    match common.target {
        Target::Roomwire => {
            ws.send(client_frame(
                1,
                client_frame::Kind::Connect(proto::Connect {
                    token: format!("u{index}"),
                    ..Default::default()
                }),
            ))
            .await?;
            roomwire_until(&mut ws, |f| {
                matches!(f.kind, Some(server_frame::Kind::Connected(_)))
            })
            .await?;
            if !room.is_empty() {
                ws.send(client_frame(
                    2,
                    client_frame::Kind::Join(proto::Join { room: room.into() }),
                ))
                .await?;
                roomwire_until(&mut ws, |f| {
                    matches!(f.kind, Some(server_frame::Kind::Joined(_)))
                })
                .await?;
            }
        }
        Target::Nats => {
            nats_until(&mut ws, "INFO").await?;
            let mut hello =
                String::from("CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n");
            if !room.is_empty() {
                hello.push_str(&format!("SUB {room} 1\r\n"));
            }
            hello.push_str("PING\r\n");
            ws.send(Ws::Binary(hello.into_bytes().into())).await?;
            nats_until(&mut ws, "PONG").await?;
        }
    }
    Ok(ws)
}

/// A WebTransport member: connects with the node's certificate hash and joins `room`.
async fn wt_member(
    common: &Common,
    index: usize,
    room: &str,
) -> anyhow::Result<roomwire::client::Client> {
    let hash = (0..common.cert_hash.len() / 2)
        .map(|i| u8::from_str_radix(&common.cert_hash[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    let options = roomwire::client::ClientOptions {
        token: format!("u{index}"),
        cert_hashes: vec![hash],
        ..Default::default()
    };
    let client = roomwire::client::Client::connect(&common.wt_url, options).await?;
    if !room.is_empty() {
        client.join(room).await?;
    }
    Ok(client)
}

/// Opens `n` members, `concurrency` at a time; returns them and the connect rate.
async fn members(
    common: &Common,
    n: usize,
    room_of: impl Fn(usize) -> String,
) -> anyhow::Result<(Vec<Member>, f64)> {
    let start = Instant::now();
    let mut all = Vec::with_capacity(n);
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(common.connect_concurrency.max(1)) {
        let opened = futures_util::future::join_all(chunk.iter().map(|&i| {
            let room = room_of(i);
            async move {
                match common.transport {
                    Transport::Ws => member(common, i, &room).await.map(Member::Ws),
                    Transport::Wt => wt_member(common, i, &room).await.map(Member::Wt),
                }
            }
        }))
        .await;
        for member in opened {
            all.push(member?);
        }
    }
    Ok((all, n as f64 / start.elapsed().as_secs_f64()))
}

/// What one receiving session saw.
struct Received {
    count: AtomicU64,
    out_of_order: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

impl Received {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            count: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()),
        })
    }
}

/// One receiver's records: latency into a local histogram (folded into the shared one by
/// `merge`), count, and order per publisher.
struct Tally {
    local: Histogram<u64>,
    last_seq: std::collections::HashMap<u64, u64>,
    received: Arc<Received>,
}

impl Tally {
    fn new(received: Arc<Received>) -> Self {
        Self {
            local: Histogram::new_with_bounds(1, 120_000_000, 3).unwrap(),
            last_seq: Default::default(),
            received,
        }
    }

    fn record(&mut self, p: &[u8]) {
        if p.len() < 24 {
            return;
        }
        let seq = u64::from_le_bytes(p[..8].try_into().unwrap());
        let sent = u64::from_le_bytes(p[8..16].try_into().unwrap());
        let publisher = u64::from_le_bytes(p[16..24].try_into().unwrap());
        let _ = self
            .local
            .record((now_ns().saturating_sub(sent) / 1_000).max(1));
        let last = self.last_seq.entry(publisher).or_insert(0);
        if seq <= *last {
            self.received.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        *last = seq;
        self.received.count.fetch_add(1, Ordering::Relaxed);
    }

    async fn merge(&mut self) {
        if !self.local.is_empty() {
            self.received.latency.lock().await.add(&self.local).unwrap();
            self.local.reset();
        }
    }
}

/// A WebTransport member (through the library client): records every Message it receives.
async fn receive_wt(mut client: roomwire::client::Client, received: Arc<Received>) {
    let mut tally = Tally::new(received);
    let mut merge = tokio::time::interval(MERGE_EVERY);
    loop {
        tokio::select! {
            event = client.next_event() => match event {
                Some(roomwire::client::Event::Message(m)) => tally.record(&m.payload),
                Some(roomwire::client::Event::Closed { .. }) | None => break,
                Some(_) => {}
            },
            _ = merge.tick() => tally.merge().await,
        }
    }
    tally.merge().await;
}

/// Reads a member's stream, recording every message: latency, count, and order per publisher.
async fn receive(
    target: Target,
    mut stream: SplitStream<Stream>,
    sink: SharedSink,
    received: Arc<Received>,
) {
    let mut tally = Tally::new(received);
    let mut pending = BytesMut::new();
    let mut merge = tokio::time::interval(MERGE_EVERY);
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            _ = merge.tick() => {
                tally.merge().await;
                continue;
            }
        };
        let Some(Ok(message)) = message else { break };
        let data = match message {
            Ws::Binary(b) => b,
            Ws::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
            _ => continue,
        };
        match target {
            Target::Roomwire => {
                if let Some(payload) = message_payload(&data) {
                    tally.record(payload);
                }
            }
            Target::Nats => {
                // NATS packs several protocol messages into one WebSocket frame and may split one
                // across frames: MSG <subject> <sid> <size>\r\n<payload>\r\n, PING, +OK, INFO.
                pending.extend_from_slice(&data);
                while let Some(eol) = pending.windows(2).position(|w| w == b"\r\n") {
                    if pending.starts_with(b"MSG ") {
                        let size = ascii_number(
                            pending[..eol].rsplit(|b| *b == b' ').next().unwrap_or(b""),
                        );
                        if pending.len() < eol + 2 + size + 2 {
                            break;
                        }
                        let body = pending.split_to(eol + 2 + size + 2);
                        tally.record(&body[eol + 2..eol + 2 + size]);
                    } else {
                        let ping = &pending[..eol] == b"PING";
                        let _ = pending.split_to(eol + 2);
                        if ping {
                            let _ = sink
                                .lock()
                                .await
                                .send(Ws::Binary(Bytes::from_static(b"PONG\r\n")))
                                .await;
                        }
                    }
                }
            }
        }
    }
    tally.merge().await;
}

fn ascii_number(digits: &[u8]) -> usize {
    digits
        .iter()
        .fold(0, |n, d| n * 10 + usize::from(d.wrapping_sub(b'0')))
}

/// The payload of a ServerFrame carrying a Message, found by walking the Protobuf fields
/// (ServerFrame.message = 6, Message.payload = 4) without decoding the strings around it.
fn message_payload(frame: &[u8]) -> Option<&[u8]> {
    fn field(mut buf: &[u8], wanted: u64) -> Option<&[u8]> {
        while !buf.is_empty() {
            let key = prost::encoding::decode_varint(&mut buf).ok()?;
            match key & 7 {
                0 => {
                    prost::encoding::decode_varint(&mut buf).ok()?;
                }
                2 => {
                    let len = prost::encoding::decode_varint(&mut buf).ok()? as usize;
                    let (value, rest) = buf.split_at_checked(len)?;
                    if key >> 3 == wanted {
                        return Some(value);
                    }
                    buf = rest;
                }
                1 => buf = buf.get(8..)?,
                5 => buf = buf.get(4..)?,
                _ => return None,
            }
        }
        None
    }
    field(field(frame, 6)?, 4)
}

/// Spawns a receiver per member; returns the shared tallies.
fn spawn_receivers(target: Target, members: Vec<Member>) -> (Arc<Received>, Vec<SharedSink>) {
    let received = Received::new();
    let mut sinks = Vec::new();
    for member in members {
        match member {
            Member::Ws(ws) => {
                let (sink, stream) = ws.split();
                let sink = Arc::new(Mutex::new(sink));
                sinks.push(sink.clone());
                tokio::spawn(receive(target, stream, sink, received.clone()));
            }
            Member::Wt(client) => {
                tokio::spawn(receive_wt(client, received.clone()));
            }
        }
    }
    (received, sinks)
}

/// Encodes one publish for the target.
fn publish_message(target: Target, room: &str, seq: u64, publisher: u64, size: usize) -> Bytes {
    let mut body = BytesMut::from(&payload(seq, size)[..]);
    body[16..24].copy_from_slice(&publisher.to_le_bytes());
    let body = body.freeze();
    match target {
        Target::Roomwire => ClientFrame {
            request_id: seq,
            kind: Some(client_frame::Kind::Publish(proto::Publish {
                room: room.into(),
                payload: body,
                client_msg_id: String::new(),
                unreliable: false,
            })),
        }
        .encode_to_vec()
        .into(),
        Target::Nats => {
            let mut out = BytesMut::from(format!("PUB {room} {}\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\r\n");
            out.freeze()
        }
    }
}

/// Who publishes what, for [`publish_steady`].
#[derive(Clone)]
struct Publisher {
    target: Target,
    room: String,
    /// Distinguishes publishers in the payload, for per-publisher order checks.
    id: u64,
    size: usize,
}

/// Publishes at `rate` per second for `secs` from one session, sequence numbers after
/// `first_seq`; returns the number sent.
async fn publish_steady(
    p: &Publisher,
    sink: &SharedSink,
    first_seq: u64,
    rate: f64,
    secs: f64,
) -> u64 {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed().as_secs_f64() < secs {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).saturating_sub(sent);
        if due == 0 {
            continue;
        }
        let mut sink = sink.lock().await;
        for _ in 0..due {
            sent += 1;
            let message = publish_message(p.target, &p.room, first_seq + sent, p.id, p.size);
            if sink.feed(Ws::Binary(message)).await.is_err() {
                return sent;
            }
        }
        if sink.flush().await.is_err() {
            return sent;
        }
    }
    sent
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50_ms": h.value_at_quantile(0.50) as f64 / 1000.0,
        "p90_ms": h.value_at_quantile(0.90) as f64 / 1000.0,
        "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
        "p999_ms": h.value_at_quantile(0.999) as f64 / 1000.0,
        "max_ms": h.max() as f64 / 1000.0,
    })
}

/// Waits until `expected` messages arrived or the count stops growing for two seconds.
async fn drain(received: &Received, expected: u64) -> u64 {
    let mut last = u64::MAX;
    let mut still = Instant::now();
    loop {
        let now = received.count.load(Ordering::Relaxed);
        if now >= expected {
            return now;
        }
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > Duration::from_secs(2) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `roomwire` (WebSocket), `roomwire-wt` (WebTransport members) or `nats`.
fn target_name(common: &Common) -> String {
    match (common.target, common.transport) {
        (Target::Roomwire, Transport::Wt) => "roomwire-wt".into(),
        (target, _) => format!("{target:?}").to_lowercase(),
    }
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

// One thread: on a 2-core box the other core belongs to the server under test.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.scenario {
        Scenario::Idle { common, sessions } => {
            let before = common.pid.and_then(|p| proc_sample(&p.to_string()));
            let (held, connect_rate) = members(&common, sessions, |_| String::new()).await?;
            // Let the server settle (allocators, lazy buffers) before reading its RSS.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = common.pid.and_then(|p| proc_sample(&p.to_string()));
            let per_session = match (before, after) {
                (Some(b), Some(a)) => json!((a.1 as f64 - b.1 as f64) / sessions as f64),
                _ => json!(null),
            };
            emit(json!({
                "scenario": "idle", "target": target_name(&common), "label": common.label,
                "sessions": sessions, "connects_per_sec": connect_rate,
                "server_rss_before": before.map(|b| b.1), "server_rss_after": after.map(|a| a.1),
                "rss_per_session_bytes": per_session,
            }));
            drop(held);
        }
        Scenario::Fanout {
            common,
            members: n,
            size,
            rates,
            step_secs,
        } => {
            let room = "bench.fanout";
            let (streams, connect_rate) = members(&common, n, |_| room.to_string()).await?;
            let (received, _sinks) = spawn_receivers(common.target, streams);
            let publisher = member(&common, n, "").await?;
            let (pub_sink, mut pub_stream) = publisher.split();
            // The publisher's acks (roomwire) are read and dropped so its queue never fills.
            tokio::spawn(async move { while let Some(Ok(_)) = pub_stream.next().await {} });
            let pub_sink = Arc::new(Mutex::new(pub_sink));
            let mut seq = 0u64;
            for rate in rates {
                received.count.store(0, Ordering::Relaxed);
                received.out_of_order.store(0, Ordering::Relaxed);
                received.latency.lock().await.reset();
                let sampler = Sampler::start(common.pid);
                let publisher = Publisher {
                    target: common.target,
                    room: room.into(),
                    id: 1,
                    size,
                };
                let sent =
                    publish_steady(&publisher, &pub_sink, seq, rate as f64, step_secs as f64).await;
                seq += sent;
                let window = sampler.start.elapsed().as_secs_f64();
                let got = drain(&received, sent * n as u64).await;
                // Let every receiver fold its last latencies in.
                tokio::time::sleep(MERGE_EVERY * 3).await;
                let resources = sampler.finish();
                let latency = received.latency.lock().await.clone();
                emit(json!({
                    "scenario": "fanout", "target": target_name(&common), "label": common.label,
                    "members": n, "size": size, "offered_msgs_per_sec": rate,
                    "offered_deliveries_per_sec": rate * n as u64,
                    "sent": sent, "expected": sent * n as u64, "received": got,
                    "lost": (sent * n as u64).saturating_sub(got), "out_of_order": received.out_of_order.load(Ordering::Relaxed),
                    "deliveries_per_sec": got as f64 / window, "window_secs": window,
                    "latency": percentiles(&latency), "resources": resources, "connects_per_sec": connect_rate,
                }));
            }
        }
        Scenario::Chat {
            common,
            rooms,
            members_per_room,
            rate,
            size,
            secs,
        } => {
            anyhow::ensure!(
                common.transport == Transport::Ws,
                "chat runs over WebSocket only"
            );
            let n = rooms * members_per_room;
            let room_of = |i: usize| format!("bench.chat.r{}", i / members_per_room);
            let (streams, connect_rate) = members(&common, n, room_of).await?;
            let (received, sinks) = spawn_receivers(common.target, streams);
            let sampler = Sampler::start(common.pid);
            let mut tasks = Vec::new();
            for (i, sink) in sinks.into_iter().enumerate() {
                let publisher = Publisher {
                    target: common.target,
                    room: room_of(i),
                    id: i as u64 + 1,
                    size,
                };
                tasks.push(tokio::spawn(async move {
                    // Spread the members' start over a second so they do not publish in lockstep.
                    tokio::time::sleep(Duration::from_millis((i % 1000) as u64)).await;
                    publish_steady(&publisher, &sink, 0, rate, secs as f64 - 1.0).await
                }));
            }
            let mut sent = 0;
            for task in tasks {
                sent += task.await?;
            }
            let window = sampler.start.elapsed().as_secs_f64();
            let expected = sent * members_per_room as u64;
            let got = drain(&received, expected).await;
            tokio::time::sleep(MERGE_EVERY * 3).await;
            let resources = sampler.finish();
            let latency = received.latency.lock().await.clone();
            emit(json!({
                "scenario": "chat", "target": target_name(&common), "label": common.label,
                "rooms": rooms, "members_per_room": members_per_room, "rate_per_member": rate, "size": size,
                "sent": sent, "expected": expected, "received": got, "lost": expected.saturating_sub(got),
                "out_of_order": received.out_of_order.load(Ordering::Relaxed),
                "deliveries_per_sec": got as f64 / window, "latency": percentiles(&latency),
                "resources": resources, "connects_per_sec": connect_rate,
            }));
        }
    }
    Ok(())
}
