//! The load generator: opens WebSocket sessions against a roomwire node or, as the peer, a
//! nats-server WebSocket listener (speaking the NATS text protocol), and measures what
//! docs/BENCHMARKS.md reports. Each run prints one JSON object per measured step.
//!
//! ```text
//! loadgen idle    --target roomwire --url ws://127.0.0.1:8080/ws --sessions 10000 --pid <node pid>
//! loadgen fanout  --target nats --url ws://127.0.0.1:8222 --members 2000 --size 64 --rates 100,200,400
//! loadgen latency --target roomwire --url ... --rates 100,1000,10000 --step-secs 3
//! loadgen chat    --target roomwire --url ... --rooms 1000 --members-per-room 10 --rate 0.5 --secs 20
//! loadgen storm   --target roomwire --url ws://a/ws,ws://b/ws --kill-pid <a> --rooms 100 --members-per-room 100
//! loadgen presence --target roomwire --url ws://a/ws,ws://b/ws --members 10000 --expect-users 10100 --churn 1000 --owner-pid <a>
//! loadgen --threads 2 fanout --url ws://a/ws,ws://b/ws --pid <a>,<b>,<nats> ...   (two nodes)
//! ```
//!
//! Payloads carry the publisher's sequence number and a send timestamp (Unix nanoseconds; the
//! generator and the server share this machine's clock), so every receiver measures
//! publish-to-receive latency and checks for loss and reordering.
//!
//! Throughput is measured at the end of the publishing window (what arrived while the publisher
//! was still publishing), and the time the backlog then takes to arrive is reported beside it:
//! a system that falls behind shows it in both, not as a late 100 %.

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

mod presence;
mod storm;

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;
type SharedSink = Arc<Mutex<SplitSink<Stream, Ws>>>;

/// Shards of the shared tally (see [`Received`]): enough that receivers on different worker
/// threads rarely meet on one lock.
const SHARDS: usize = 16;

/// A step keeps up when what arrived within the publishing window is at least this share of
/// what was offered (and the backlog drains within [`KEEP_UP_DRAIN`]); benches/report.py
/// applies the same rule to find each system's ceiling.
const KEEP_UP_SHARE: f64 = 0.95;
const KEEP_UP_DRAIN: Duration = Duration::from_secs(1);

/// After publishing stops, the drain gives up when no delivery arrives for this long.
const DRAIN_STALL: Duration = Duration::from_secs(2);

#[derive(Parser)]
struct Args {
    /// Worker threads of the generator's tokio runtime; 1 runs everything on one thread (a
    /// current-thread runtime), leaving the other core of a 2-core box to the server.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
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
// Built once per member and split at once: the size of the WebSocket variant (it can hold a
// rustls client connection inline) costs nothing on the measured path.
#[allow(clippy::large_enum_variant)]
enum Member {
    Ws(Stream),
    /// Through the library client, which speaks WebTransport.
    Wt(roomwire::client::Client),
}

#[derive(clap::Args, Clone)]
struct Common {
    #[arg(long, value_enum)]
    target: Target,
    /// WebSocket URL of the server, or a comma-separated list (several nodes, or clustered
    /// nats-servers): member i connects to url[i % n], publishers of one-room scenarios to the
    /// first.
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// Source addresses to spread connections over (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<String>,
    /// Server processes to sample CPU and RSS from (comma-separated); the figures are summed.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
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
    /// Pause between the last member joining and the first publish, so that interest reaches
    /// every server of a cluster (NATS routes propagate subscriptions asynchronously).
    #[arg(long, default_value_t = 0)]
    settle_ms: u64,
}

/// How a one-room scenario (fanout, latency) steps its rate.
#[derive(clap::Args, Clone)]
struct Steps {
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per second offered by the publisher, one step each.
    #[arg(long, value_delimiter = ',', default_value = "50,100,200")]
    rates: Vec<u64>,
    #[arg(long, default_value_t = 10)]
    step_secs: u64,
    /// Stop stepping after this many consecutive steps that do not keep up (less than 95 % of
    /// the offered deliveries within the window, or a drain longer than 1 s); 0 runs every rate.
    #[arg(long, default_value_t = 0)]
    stop_after_misses: usize,
    /// Longest wait for the backlog after a step's publishing window.
    #[arg(long, default_value_t = 30)]
    drain_max_secs: u64,
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
        #[command(flatten)]
        steps: Steps,
    },
    /// One publisher, one member (by default): the latency of a lightly loaded path.
    Latency {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1)]
        members: usize,
        #[command(flatten)]
        steps: Steps,
    },
    /// Reconnect storm (roomwire mesh): every member on the first URL's node, a publisher on the
    /// second; the first node is killed and every member resumes on the others.
    Storm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        storm: storm::Storm,
    },
    /// Presence at scale (roomwire): one room, every member asking for its diffs, then churn.
    Presence {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        presence: presence::Presence,
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
        #[arg(long, default_value_t = 30)]
        drain_max_secs: u64,
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

/// The summed RSS of the server processes, when every one of them could be read.
fn servers_rss(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|p| proc_sample(&p.to_string()).map(|s| s.1))
        .sum()
}

struct Sampler {
    servers: Vec<String>,
    start: Instant,
    servers0: Vec<Option<(f64, u64)>>,
    own0: Option<(f64, u64)>,
}

impl Sampler {
    fn start(pids: &[u32]) -> Self {
        let servers: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
        Self {
            servers0: servers.iter().map(|p| proc_sample(p)).collect(),
            own0: proc_sample("self"),
            servers,
            start: Instant::now(),
        }
    }

    /// CPU cores used by the servers (summed, and each) and by this generator since start, and
    /// the servers' summed RSS.
    fn finish(&self) -> serde_json::Value {
        let secs = self.start.elapsed().as_secs_f64();
        let cores = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| match (a, b) {
            (Some(a), Some(b)) => Some((b.0 - a.0) / secs),
            _ => None,
        };
        let now: Vec<Option<(f64, u64)>> = self.servers.iter().map(|p| proc_sample(p)).collect();
        let each: Vec<Option<f64>> = self
            .servers0
            .iter()
            .zip(&now)
            .map(|(a, b)| cores(*a, *b))
            .collect();
        // A sum only when every process could be read: a partial sum would look like a figure.
        let cpu: Option<Vec<f64>> = each.iter().copied().collect();
        let rss: Option<Vec<u64>> = now.iter().map(|s| s.map(|s| s.1)).collect();
        json!({
            "server_cpu_cores": cpu.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>()),
            "server_cpu_cores_each": each,
            "loadgen_cpu_cores": cores(self.own0, proc_sample("self")),
            "server_rss_bytes": rss.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<u64>()),
        })
    }
}

/// Payload: publisher sequence number, send time, padding to `size`.
fn payload(seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::zeroed(size.max(24));
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&now_ns().to_le_bytes());
    b.freeze()
}

/// The server URL member `index` connects to.
fn url_of(common: &Common, index: usize) -> &str {
    &common.url[index % common.url.len()]
}

async fn open(common: &Common, index: usize, url: &str) -> anyhow::Result<Stream> {
    let source: std::net::IpAddr = common.sources[index % common.sources.len()].parse()?;
    let mut request = url.into_client_request()?;
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

/// Connects session `index` to `url` and makes it a member of `room` (none when empty).
async fn member(common: &Common, index: usize, url: &str, room: &str) -> anyhow::Result<Stream> {
    let mut ws = open(common, index, url).await?;
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
                    client_frame::Kind::Join(proto::Join {
                        room: room.into(),
                        ..Default::default()
                    }),
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
                    Transport::Ws => member(common, i, url_of(common, i), &room)
                        .await
                        .map(Member::Ws),
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

/// One shard of the shared tally.
struct Shard {
    latency: Histogram<u64>,
    count: u64,
    out_of_order: u64,
}

/// What every receiving session of a run saw. Receivers record straight into one of
/// [`SHARDS`] shards, each behind a std mutex held for one record: no histogram per receiver to
/// fold in (a histogram is ~150 KB, and adding or clearing one walks all of it), no merge timer
/// per receiver, and a step's figures are complete the moment its last message is counted.
struct Received {
    shards: Vec<std::sync::Mutex<Shard>>,
    /// Receivers whose stream ended (a server that drops slow consumers shows here).
    closed: AtomicU64,
}

impl Received {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS)
                .map(|_| {
                    std::sync::Mutex::new(Shard {
                        latency: Histogram::new_with_bounds(1, 120_000_000, 3).unwrap(),
                        count: 0,
                        out_of_order: 0,
                    })
                })
                .collect(),
            closed: AtomicU64::new(0),
        })
    }

    fn shard(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[i].lock().expect("tally shard poisoned")
    }

    fn count(&self) -> u64 {
        (0..SHARDS).map(|i| self.shard(i).count).sum()
    }

    fn out_of_order(&self) -> u64 {
        (0..SHARDS).map(|i| self.shard(i).out_of_order).sum()
    }

    fn latency(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, 120_000_000, 3).unwrap();
        for i in 0..SHARDS {
            all.add(&self.shard(i).latency).unwrap();
        }
        all
    }

    fn reset(&self) {
        for i in 0..SHARDS {
            let mut shard = self.shard(i);
            shard.latency.reset();
            shard.count = 0;
            shard.out_of_order = 0;
        }
    }
}

/// One receiver's view: order per publisher, and the shard it records into.
struct Tally {
    last_seq: std::collections::HashMap<u64, u64>,
    shard: usize,
    received: Arc<Received>,
}

impl Tally {
    fn new(received: Arc<Received>, index: usize) -> Self {
        Self {
            last_seq: Default::default(),
            shard: index % SHARDS,
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
        let last = self.last_seq.entry(publisher).or_insert(0);
        let in_order = seq > *last;
        *last = seq;
        let mut shard = self.received.shard(self.shard);
        let _ = shard
            .latency
            .record((now_ns().saturating_sub(sent) / 1_000).max(1));
        shard.count += 1;
        if !in_order {
            shard.out_of_order += 1;
        }
    }
}

/// A WebTransport member (through the library client): records every Message it receives.
async fn receive_wt(mut client: roomwire::client::Client, mut tally: Tally) {
    loop {
        match client.next_event().await {
            Some(roomwire::client::Event::Message(m)) => tally.record(&m.payload),
            Some(roomwire::client::Event::Closed { .. }) | None => break,
            Some(_) => {}
        }
    }
    tally.received.closed.fetch_add(1, Ordering::Relaxed);
}

/// Reads a member's stream, recording every message: latency, count, and order per publisher.
async fn receive(
    target: Target,
    mut stream: SplitStream<Stream>,
    sink: SharedSink,
    mut tally: Tally,
) {
    let mut pending = BytesMut::new();
    while let Some(Ok(message)) = stream.next().await {
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
    tally.received.closed.fetch_add(1, Ordering::Relaxed);
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

/// Spawns a receiver per member; returns the shared tallies and each WebSocket member's sink
/// (in member order; WebTransport members have none).
fn spawn_receivers(target: Target, members: Vec<Member>) -> (Arc<Received>, Vec<SharedSink>) {
    let received = Received::new();
    let mut sinks = Vec::new();
    for (i, member) in members.into_iter().enumerate() {
        let tally = Tally::new(received.clone(), i);
        match member {
            Member::Ws(ws) => {
                let (sink, stream) = ws.split();
                let sink = Arc::new(Mutex::new(sink));
                sinks.push(sink.clone());
                tokio::spawn(receive(target, stream, sink, tally));
            }
            Member::Wt(client) => {
                tokio::spawn(receive_wt(client, tally));
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

/// Publishes `floor(rate × secs)` messages from one session, the k-th due `(k - 1) / rate`
/// seconds after the start (so the last is due `1 / rate` before the window ends, not at its
/// end), sequence numbers after `first_seq`, then waits out the window; returns the number sent.
/// The task sleeps until its next message is due (a 20,000-member chat at 0.5 msg/s wakes
/// 10,000 times a second, not once per member every few milliseconds); when it wakes late (timer
/// granularity, a busy thread, a server pushing back) it sends everything due in one batch, so
/// the rate stays exact. `Err` carries the number sent before the session failed.
async fn publish_steady(
    p: &Publisher,
    sink: &SharedSink,
    first_seq: u64,
    rate: f64,
    secs: f64,
) -> Result<u64, u64> {
    let start = tokio::time::Instant::now();
    let total = (rate * secs + 1e-9).floor() as u64;
    let mut sent = 0u64;
    while sent < total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate)).await;
        let due_now = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).clamp(sent + 1, total);
        let mut sink = sink.lock().await;
        while sent < due_now {
            sent += 1;
            let message = publish_message(p.target, &p.room, first_seq + sent, p.id, p.size);
            if sink.feed(Ws::Binary(message)).await.is_err() {
                return Err(sent);
            }
        }
        if sink.flush().await.is_err() {
            return Err(sent);
        }
    }
    tokio::time::sleep_until(start + Duration::from_secs_f64(secs)).await;
    Ok(sent)
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50_ms": h.value_at_quantile(0.50) as f64 / 1000.0,
        "p90_ms": h.value_at_quantile(0.90) as f64 / 1000.0,
        "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
        "p999_ms": h.value_at_quantile(0.999) as f64 / 1000.0,
        "max_ms": h.max() as f64 / 1000.0,
        "samples": h.len(),
    })
}

/// Waits, from `since` (the end of the publishing window), until `expected` deliveries have
/// arrived; gives up when none arrives for [`DRAIN_STALL`] or after `max`. Returns the count and,
/// when everything arrived, how long after `since` the last one did.
async fn drain(
    received: &Received,
    expected: u64,
    since: Instant,
    max: Duration,
) -> (u64, Option<Duration>) {
    let mut last = u64::MAX;
    let mut still = Instant::now();
    loop {
        let now = received.count();
        if now >= expected {
            return (now, Some(since.elapsed()));
        }
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > DRAIN_STALL || since.elapsed() > max {
            return (now, None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What a publishing window delivered.
struct Window {
    secs: f64,
    in_window: u64,
    drained: Option<Duration>,
    /// The fields every throughput line shares.
    figures: serde_json::Value,
    /// The servers' and the generator's CPU and memory over the window and its drain.
    resources: serde_json::Value,
}

/// Closes a step's publishing window: counts what arrived within it, then waits for the rest
/// of the `expected` deliveries (at most `drain_max`), and samples the resources used.
async fn end_window(
    received: &Received,
    sampler: &Sampler,
    expected: u64,
    drain_max: Duration,
) -> Window {
    let in_window = received.count();
    let window_end = Instant::now();
    let secs = sampler.start.elapsed().as_secs_f64();
    let (got, drained) = drain(received, expected, window_end, drain_max).await;
    let figures = json!({
        "expected": expected,
        "in_window_received": in_window,
        "in_window_deliveries_per_sec": in_window as f64 / secs,
        "window_secs": secs,
        "drain_secs": drained.map(|d| d.as_secs_f64()),
        "received": got,
        "lost": expected.saturating_sub(got),
        "out_of_order": received.out_of_order(),
        "closed_members": received.closed.load(Ordering::Relaxed),
    });
    Window {
        secs,
        in_window,
        drained,
        figures,
        resources: sampler.finish(),
    }
}

/// `roomwire` (WebSocket), `roomwire-wt` (WebTransport members) or `nats`.
fn target_name(common: &Common) -> String {
    match (common.target, common.transport) {
        (Target::Roomwire, Transport::Wt) => "roomwire-wt".into(),
        (target, _) => format!("{target:?}").to_lowercase(),
    }
}

/// Adds `extra`'s fields to `base` and prints it as one line.
fn emit(mut base: serde_json::Value, extra: serde_json::Value) {
    if let (Some(base), serde_json::Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    println!("{base}");
}

/// One publisher (on the first URL), `n` members in `room`, one measured step per rate.
async fn one_room(
    scenario: &str,
    room: &str,
    common: Common,
    n: usize,
    steps: Steps,
    threads: usize,
) -> anyhow::Result<()> {
    let (streams, connect_rate) = members(&common, n, |_| room.to_string()).await?;
    let (received, _sinks) = spawn_receivers(common.target, streams);
    let publisher = member(&common, n, &common.url[0], "").await?;
    let (pub_sink, mut pub_stream) = publisher.split();
    // The publisher's acks (roomwire) are read and dropped so its queue never fills.
    tokio::spawn(async move { while let Some(Ok(_)) = pub_stream.next().await {} });
    let pub_sink = Arc::new(Mutex::new(pub_sink));
    tokio::time::sleep(Duration::from_millis(common.settle_ms)).await;
    let publisher = Publisher {
        target: common.target,
        room: room.into(),
        id: 1,
        size: steps.size,
    };
    let mut seq = 0u64;
    let mut misses = 0;
    for rate in steps.rates {
        received.reset();
        let sampler = Sampler::start(&common.pid);
        let outcome = publish_steady(
            &publisher,
            &pub_sink,
            seq,
            rate as f64,
            steps.step_secs as f64,
        )
        .await;
        let sent = outcome.unwrap_or_else(|sent| sent);
        seq += sent;
        let expected = sent * n as u64;
        let window = end_window(
            &received,
            &sampler,
            expected,
            Duration::from_secs(steps.drain_max_secs),
        )
        .await;
        let offered = rate * n as u64;
        let kept_up = window.in_window as f64 / window.secs >= KEEP_UP_SHARE * offered as f64
            && window.drained.is_some_and(|d| d <= KEEP_UP_DRAIN);
        emit(
            json!({
                "scenario": scenario, "target": target_name(&common), "label": common.label,
                "nodes": common.url.len(), "threads": threads,
                "members": n, "size": steps.size, "offered_msgs_per_sec": rate,
                "offered_deliveries_per_sec": offered, "sent": sent, "kept_up": kept_up,
                "latency": percentiles(&received.latency()), "resources": window.resources,
                "connects_per_sec": connect_rate,
            }),
            window.figures,
        );
        // Later steps would measure nothing: the publisher is gone.
        anyhow::ensure!(
            outcome.is_ok(),
            "{scenario}: the server closed the publisher's session at {rate} msgs/s"
        );
        misses = if kept_up { 0 } else { misses + 1 };
        if steps.stop_after_misses > 0 && misses >= steps.stop_after_misses {
            eprintln!(
                "{scenario}: {misses} steps in a row did not keep up; stopping at {rate} msgs/s"
            );
            break;
        }
    }
    Ok(())
}

async fn run(scenario: Scenario, threads: usize) -> anyhow::Result<()> {
    match scenario {
        Scenario::Idle { common, sessions } => {
            let before = servers_rss(&common.pid);
            let (held, connect_rate) = members(&common, sessions, |_| String::new()).await?;
            // Let the server settle (allocators, lazy buffers) before reading its RSS.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = servers_rss(&common.pid);
            let per_session = match (before, after) {
                (Some(b), Some(a)) => json!((a as f64 - b as f64) / sessions as f64),
                _ => json!(null),
            };
            emit(
                json!({
                    "scenario": "idle", "target": target_name(&common), "label": common.label,
                    "nodes": common.url.len(), "threads": threads,
                    "sessions": sessions, "connects_per_sec": connect_rate,
                    "server_rss_before": before, "server_rss_after": after,
                    "rss_per_session_bytes": per_session,
                }),
                json!({}),
            );
            drop(held);
        }
        Scenario::Fanout {
            common,
            members,
            steps,
        } => one_room("fanout", "bench.fanout", common, members, steps, threads).await?,
        Scenario::Latency {
            common,
            members,
            steps,
        } => one_room("latency", "bench.latency", common, members, steps, threads).await?,
        Scenario::Storm { common, storm } => storm::run(common, storm, threads).await?,
        Scenario::Presence { common, presence } => presence::run(common, presence, threads).await?,
        Scenario::Chat {
            common,
            rooms,
            members_per_room,
            rate,
            size,
            secs,
            drain_max_secs,
        } => {
            anyhow::ensure!(
                common.transport == Transport::Ws,
                "chat runs over WebSocket only"
            );
            let n = rooms * members_per_room;
            let room_of = |i: usize| format!("bench.chat.r{}", i / members_per_room);
            let (streams, connect_rate) = members(&common, n, room_of).await?;
            let (received, sinks) = spawn_receivers(common.target, streams);
            tokio::time::sleep(Duration::from_millis(common.settle_ms)).await;
            let sampler = Sampler::start(&common.pid);
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
            let (mut sent, mut publishers_closed) = (0, 0);
            for task in tasks {
                match task.await? {
                    Ok(n) => sent += n,
                    Err(n) => {
                        sent += n;
                        publishers_closed += 1;
                    }
                }
            }
            let expected = sent * members_per_room as u64;
            let window = end_window(
                &received,
                &sampler,
                expected,
                Duration::from_secs(drain_max_secs),
            )
            .await;
            emit(
                json!({
                    "scenario": "chat", "target": target_name(&common), "label": common.label,
                    "nodes": common.url.len(), "threads": threads,
                    "rooms": rooms, "members_per_room": members_per_room, "rate_per_member": rate,
                    "size": size, "sent": sent, "publishers_closed": publishers_closed,
                    // What the publishers offered over the measured window (their starts are
                    // spread over a second, so this is a little under the nominal rate).
                    "offered_deliveries_per_sec": expected as f64 / window.secs,
                    "nominal_deliveries_per_sec": rate * n as f64 * members_per_room as f64,
                    "latency": percentiles(&received.latency()), "resources": window.resources,
                    "connects_per_sec": connect_rate,
                }),
                window.figures,
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = args.threads.max(1);
    // One thread by default: on a 2-core box the other core belongs to the server under test.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = builder.enable_all().build()?;
    // The scenario runs as a task, so that with N workers nothing runs on the main thread.
    runtime.block_on(async move { tokio::spawn(run(args.scenario, threads)).await? })
}
