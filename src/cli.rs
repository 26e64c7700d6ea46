//! The command line: `roomwire` (serve, the default) and `roomwire client ...`.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::sync::mpsc;

use crate::client::{Client, ClientError, ClientOptions, Event, JoinOptions, MessageIds};
use crate::proto;

#[derive(Debug, Parser)]
#[command(
    name = "roomwire",
    version,
    about = "A regional edge node for real-time rooms"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Talk to a node: join rooms, publish, chat.
    Client(ClientArgs),
    /// Mint a JWT connection token the node accepts in JWT mode (auth.jwt from --config and
    /// --set, as the node reads them), printed on standard output.
    Token(TokenArgs),
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Create a development CA, a node certificate and service client certificates (keys are
    /// written as *-key.pem, git-ignored, mode 0600).
    Init {
        /// Directory to write into.
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Extra DNS names or IP addresses for the node certificate (localhost, 127.0.0.1 and ::1
        /// are always included). Repeatable.
        #[arg(long = "name")]
        names: Vec<String>,
        /// A service to issue a client certificate for (URI SAN spiffe://roomwire/service/NAME).
        /// Repeatable.
        #[arg(long = "service")]
        services: Vec<String>,
        /// Replace files already in the directory (a new CA: what the old one signed is no
        /// longer trusted).
        #[arg(long)]
        force: bool,
    },
}

/// Runs `roomwire certs ...`.
pub fn run_certs(action: CertsAction) -> anyhow::Result<()> {
    match action {
        CertsAction::Init {
            dir,
            names,
            services,
            force,
        } => {
            for path in crate::certs::init(&dir, &names, &services, force)? {
                println!("wrote {}", path.display());
            }
            let d = dir.display();
            println!(
                "\nnext: serve wss:// and https:// with the node certificate\n  \
                 roomwire --set tls.enabled=true --set tls.cert_file={d}/node.pem --set tls.key_file={d}/node-key.pem\n\
                 and connect trusting the CA\n  \
                 roomwire client --url wss://localhost:8080/ws --ca-file {d}/ca.pem --token alice chat lobby"
            );
            if let Some(service) = services.first() {
                println!(
                    "a service connects with its certificate (the node needs tls.client_auth, \
                     tls.client_ca_file = \"{d}/ca.pem\" and a [[tls.services]] entry named {service:?}):\n  \
                     roomwire client --url wss://localhost:8080/ws --ca-file {d}/ca.pem \
                     --client-cert {d}/service-{service}.pem --client-key {d}/service-{service}-key.pem publish {service}.events hello"
                );
            }
            Ok(())
        }
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// A room pattern the token may join (`chat.*`, `news.>`); repeatable.
    #[arg(long = "join", value_name = "PATTERN")]
    pub join: Vec<String>,
    /// A room pattern the token may publish to; repeatable.
    #[arg(long = "publish", value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// Lifetime: `90s`, `15m`, `1h`, `1d` (at most auth.jwt.max_lifetime_s).
    #[arg(long, default_value = "1h", value_parser = crate::auth::parse_ttl)]
    pub ttl: Duration,
    /// ES256 / RS256: the private key (PEM) whose public key the node is configured with. HS256:
    /// a file holding the secret, instead of the configured one.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// `kid` header, for nodes verifying with a JWKS file.
    #[arg(long)]
    pub kid: Option<String>,
    /// The `info` claim: the user's presence info in every room keeping presence (JSON, e.g.
    /// `'{"name":"Alice"}'`; text that is not JSON is taken as a string).
    #[arg(long, value_name = "JSON")]
    pub info: Option<String>,
    /// The node's TOML configuration file (for auth.jwt).
    #[arg(long, short, env = "ROOMWIRE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, as for the node (e.g. `--set auth.jwt.secret=...`); repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// Runs `roomwire token ...`: prints the token.
pub fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let config =
        crate::config::Config::load(args.config.as_deref(), std::env::vars(), &args.overrides)?;
    let key = args
        .key
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("--key {}: {e}", path.display()))
        })
        .transpose()?;
    let request = crate::auth::TokenRequest {
        sub: args.sub,
        join: args.join,
        publish: args.publish,
        ttl: args.ttl,
        kid: args.kid,
        info: args
            .info
            .map(|text| serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    println!(
        "{}",
        crate::auth::mint(&config.auth, &request, key.as_deref(), now)?
    );
    if config.auth.mode != crate::config::AuthMode::Jwt {
        eprintln!(
            "note: the configuration's auth.mode is not jwt; the node accepts this token only with auth.mode = \"jwt\""
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file; without it the embedded defaults serve on 127.0.0.1:8080.
    #[arg(long, short, env = "ROOMWIRE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set server.listen='["0.0.0.0:8080"]'` (repeatable). Environment
    /// variables ROOMWIRE__SECTION__KEY=value do the same.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// URL of the node: WebSocket `ws://host:8080/ws` (or `wss://`), or WebTransport
    /// `https://host:4433/wt`.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", env = "ROOMWIRE_URL")]
    pub url: String,
    /// WebTransport: trust the certificate with this SHA-256 (hex, as `/webtransport/certhash`
    /// gives it); repeatable.
    #[arg(long = "cert-hash", value_name = "HEX")]
    pub cert_hashes: Vec<String>,
    /// `wss://` and WebTransport: trust certificates signed by the CA in this PEM file (instead of
    /// the system's roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// With --ca-file: a client certificate (PEM) to present (mutual TLS; `wss://` or
    /// WebTransport).
    #[arg(long, requires = "client_key", requires = "ca_file")]
    pub client_cert: Option<PathBuf>,
    /// The key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Connection token (in the node's insecure development mode: the user id).
    #[arg(long, default_value = "", env = "ROOMWIRE_TOKEN")]
    pub token: String,
    #[command(subcommand)]
    pub action: ClientAction,
}

#[derive(Debug, Subcommand)]
pub enum ClientAction {
    /// Join rooms and print every message until interrupted.
    Join { rooms: Vec<String> },
    /// Publish one message and print the acknowledgement.
    Publish {
        room: String,
        text: String,
        /// Client message id (default: a random one). Publishing again with the same id within
        /// the node's de-duplication window is acknowledged as a duplicate and not delivered.
        #[arg(long)]
        id: Option<String>,
    },
    /// Join a room, print its messages, and publish each line typed on standard input.
    Chat {
        room: String,
        /// When the connection is lost or the node goes away, reconnect with backoff and resume
        /// the room from the last message seen (the node replays what was missed). Without it,
        /// chat exits when the session ends.
        #[arg(long)]
        reconnect: bool,
    },
    /// Print a page of a room's kept messages (the newest, unless --before or --after).
    History {
        room: String,
        /// Messages before this position (EPOCH:SEQ), newest first.
        #[arg(long, value_name = "EPOCH:SEQ", value_parser = parse_position, conflicts_with = "after")]
        before: Option<(u64, u64)>,
        /// Messages after this position (EPOCH:SEQ), oldest first.
        #[arg(long, value_name = "EPOCH:SEQ", value_parser = parse_position)]
        after: Option<(u64, u64)>,
        /// At most this many messages (0: the node's page size).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Print who is in a room (every page), or only the counts with --stats; with --watch,
    /// join the room and print its joins and leaves as they come.
    Presence {
        room: String,
        /// Only the numbers of users and sessions (works in rooms of any size).
        #[arg(long, conflicts_with = "watch")]
        stats: bool,
        /// Join the room (present as this client's user) and print its presence diffs until
        /// interrupted.
        #[arg(long)]
        watch: bool,
        /// Shown with this user in the room's presence while watching (e.g. a display name).
        #[arg(long, requires = "watch", default_value = "")]
        info: String,
    },
}

/// Runs `roomwire client ...`; returns the process exit code (1 when the node ended the session).
pub async fn run_client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let cert_hashes = args
        .cert_hashes
        .iter()
        .map(|hex| {
            parse_hex(hex)
                .ok_or_else(|| anyhow::anyhow!("--cert-hash {hex:?}: expected 64 hex digits"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = ClientOptions {
        token: args.token,
        cert_hashes,
        ca_file: args.ca_file,
        client_cert: args.client_cert.zip(args.client_key),
        client_name: concat!("roomwire-cli/", env!("CARGO_PKG_VERSION")).into(),
        ..ClientOptions::default()
    };
    if let ClientAction::Chat { room, reconnect } = args.action {
        return chat(&args.url, options, &room, reconnect).await;
    }
    let mut client = connect(&args.url, options).await?;
    match args.action {
        ClientAction::Publish { room, text, id } => {
            let id = id.unwrap_or_else(|| client.next_message_id());
            let ack = client.publish(&room, text, &id).await?;
            if ack.duplicate {
                println!(
                    "duplicate: id {} was already published to {} as epoch {} seq {}; not delivered again",
                    ack.client_msg_id, ack.room, ack.epoch, ack.seq
                );
            } else {
                println!(
                    "published to {} as epoch {} seq {} (id {})",
                    ack.room, ack.epoch, ack.seq, ack.client_msg_id
                );
            }
            client.close().await;
        }
        ClientAction::Join { rooms } => {
            for room in &rooms {
                let joined = client.join(room).await?;
                eprintln!(
                    "joined {} at epoch {} seq {}",
                    joined.room, joined.epoch, joined.seq
                );
            }
            while let Some(event) = client.next_event().await {
                if print_event(&event) {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        ClientAction::History {
            room,
            before,
            after,
            limit,
        } => {
            let page = client.history(&room, after, before, limit).await?;
            for m in &page.messages {
                println!(
                    "[{} {}:{}] {}: {}",
                    m.room,
                    m.epoch,
                    m.seq,
                    m.publisher,
                    String::from_utf8_lossy(&m.payload)
                );
            }
            let more = match (page.more, page.messages.last()) {
                (true, Some(last)) if after.is_some() => {
                    format!("; more: --after {}:{}", last.epoch, last.seq)
                }
                (true, Some(last)) => format!("; more: --before {}:{}", last.epoch, last.seq),
                _ => String::new(),
            };
            eprintln!(
                "{} messages; the room is at {}:{} and keeps from {}:{}{more}",
                page.messages.len(),
                page.epoch,
                page.seq,
                page.oldest_epoch,
                page.oldest_seq
            );
            client.close().await;
        }
        ClientAction::Presence {
            room,
            stats,
            watch,
            info,
        } => {
            if stats {
                let stats = client.presence_stats(&room).await?;
                println!(
                    "{}: {} users, {} sessions",
                    room, stats.users, stats.sessions
                );
                client.close().await;
                return Ok(ExitCode::SUCCESS);
            }
            if watch {
                let options = JoinOptions {
                    presence_events: true,
                    presence_info: info.into_bytes().into(),
                    ..JoinOptions::default()
                };
                client.join_with(&room, options).await?;
            }
            let view = client.presence(&room).await?;
            for m in &view.members {
                println!(
                    "{} ({} sessions){}",
                    m.user_id,
                    m.sessions,
                    info_suffix(&m.info)
                );
            }
            eprintln!("{}: {} users, {} sessions", room, view.users, view.sessions);
            if !watch {
                client.close().await;
                return Ok(ExitCode::SUCCESS);
            }
            while let Some(event) = client.next_event().await {
                if print_event(&event) {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        ClientAction::Chat { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Connects and says so on standard error.
async fn connect(url: &str, options: ClientOptions) -> anyhow::Result<Client> {
    let client = Client::connect(url, options).await?;
    let c = client.connected();
    eprintln!(
        "connected: session {} as {} on node {} ({})",
        c.session_id, c.user_id, c.node_id, c.region
    );
    Ok(client)
}

/// First and largest wait between reconnect attempts; each failed attempt doubles it.
const RECONNECT_INITIAL: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// `client chat`: one room, standard input published line by line, every message printed. Ends
/// on end of input (exit 0) or, without `reconnect`, as soon as the session ends (exit 1).
async fn chat(
    url: &str,
    options: ClientOptions,
    room: &str,
    reconnect: bool,
) -> anyhow::Result<ExitCode> {
    // One id sequence for the whole process, across reconnects: a line retried after a
    // reconnect would keep its id, and no two lines ever share one.
    let ids = MessageIds::new();
    let mut lines = stdin_lines();
    let mut client = connect(url, options.clone()).await?;
    let joined = client.join(room).await?;
    eprintln!(
        "joined {} at seq {}; type a line and press enter to publish, Ctrl-D to quit",
        joined.room, joined.seq
    );
    // The last position seen in the room: what a reconnect resumes from.
    let mut position = (joined.epoch, joined.seq);
    loop {
        let mut go_away_after = None;
        let closed_code = loop {
            tokio::select! {
                line = lines.recv() => match line {
                    Some(line) if line.trim().is_empty() => {}
                    Some(line) => match client.publish(room, line, &ids.next_id()).await {
                        Ok(ack) if ack.duplicate => eprintln!(
                            "duplicate: id {} was already published as #{}; not delivered again",
                            ack.client_msg_id, ack.seq
                        ),
                        Ok(_) => {}
                        Err(error) => eprintln!("publish failed: {error}"),
                    },
                    None => {
                        client.close().await;
                        return Ok(ExitCode::SUCCESS);
                    }
                },
                event = client.next_event() => {
                    let Some(event) = event else { break None };
                    match &event {
                        Event::Message(m) if m.room == room && m.seq > 0 => {
                            position = (m.epoch, m.seq);
                        }
                        Event::Joined(j) if j.room == room => position = (j.epoch, j.seq),
                        Event::GoAway(g) => {
                            go_away_after = Some(Duration::from_millis(g.reconnect_after_ms.into()));
                        }
                        _ => {}
                    }
                    if print_event(&event) {
                        let Event::Closed { code, .. } = event else { unreachable!() };
                        break code;
                    }
                }
            }
        };
        if !reconnect || !worth_reconnecting(closed_code) {
            return Ok(ExitCode::FAILURE);
        }
        let mut delay = go_away_after
            .unwrap_or(RECONNECT_INITIAL)
            .min(RECONNECT_MAX);
        client = loop {
            // Jitter, so that the clients of a drained node do not all come back at once.
            let wait = delay + delay.mul_f64(jitter()) / 2;
            eprintln!("reconnecting in {} ms", wait.as_millis());
            tokio::time::sleep(wait).await;
            let resume = ClientOptions {
                resume: vec![proto::RoomPosition {
                    room: room.into(),
                    epoch: position.0,
                    seq: position.1,
                }],
                ..options.clone()
            };
            match connect(url, resume).await {
                Ok(client) => break client,
                Err(error) => {
                    eprintln!("reconnect failed: {error}");
                    // A refused token stays refused: stop instead of retrying for ever.
                    let hopeless = match error.downcast_ref::<ClientError>() {
                        Some(ClientError::Refused { retryable, .. }) => !retryable,
                        Some(ClientError::Closed { code, .. }) => !worth_reconnecting(*code),
                        Some(ClientError::Status(status)) => *status == 401 || *status == 403,
                        _ => false,
                    };
                    if hopeless {
                        return Ok(ExitCode::FAILURE);
                    }
                    delay = (delay * 2).clamp(RECONNECT_INITIAL, RECONNECT_MAX);
                }
            }
        };
    }
}

/// Whether a session that ended with this close code is worth reconnecting (PROTOCOL.md section
/// 11): network loss, the node going away or failing, slow consumer, idle timeout. Not after an
/// operator's disconnect, a refused or expired token, or a client bug.
fn worth_reconnecting(code: Option<u16>) -> bool {
    matches!(code, None | Some(1000 | 1001 | 1006 | 1011 | 4001 | 4002))
}

/// A random fraction in [0, 1).
fn jitter() -> f64 {
    (crate::ids::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Lines of standard input, read on a thread of their own: a blocking read there does not keep
/// the process alive once the session ends (tokio's stdin would: the runtime waits for its
/// blocking read at shutdown). The channel closes at end of input.
fn stdin_lines() -> mpsc::Receiver<String> {
    // Bounded: while a publish waits for its ack, at most this many typed lines wait too; the
    // reading thread then blocks, which only delays reading the terminal.
    let (tx, rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the stdin thread");
    rx
}

/// `EPOCH:SEQ`, a position in a room.
fn parse_position(s: &str) -> Result<(u64, u64), String> {
    let (epoch, seq) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected EPOCH:SEQ"))?;
    let number = |n: &str| {
        n.parse::<u64>()
            .map_err(|_| format!("{s:?}: expected EPOCH:SEQ"))
    };
    Ok((number(epoch)?, number(seq)?))
}

/// A SHA-256 digest written as 64 hex digits (colons allowed, as browsers print them).
fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = hex.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// `info` of a presence entry, for printing (`""` when empty).
fn info_suffix(info: &[u8]) -> String {
    match info {
        [] => String::new(),
        info => format!(" {}", String::from_utf8_lossy(info)),
    }
}

/// Prints one event; returns true when the session ended.
fn print_event(event: &Event) -> bool {
    match event {
        Event::PresenceDiff(d) => {
            if d.reset {
                eprintln!("{}: presence rebuilt by a new owner", d.room);
            }
            for m in &d.joined {
                println!(
                    "[{}] + {} ({} sessions){}",
                    d.room,
                    m.user_id,
                    m.sessions,
                    info_suffix(&m.info)
                );
            }
            for user in &d.left {
                println!("[{}] - {user}", d.room);
            }
            eprintln!("{}: {} users, {} sessions", d.room, d.users, d.sessions);
            false
        }
        Event::Message(m) | Event::Datagram(m) => {
            println!(
                "[{} #{}] {}: {}",
                m.room,
                m.seq,
                m.publisher,
                String::from_utf8_lossy(&m.payload)
            );
            false
        }
        Event::GoAway(g) => {
            eprintln!(
                "node going away: {} (reconnect after {} ms)",
                g.reason, g.reconnect_after_ms
            );
            false
        }
        Event::Left(room) => {
            eprintln!("removed from {room}");
            false
        }
        Event::TokenExpiring(at) => {
            eprintln!("token expires at {at} (Unix ms); reconnect with a fresh token");
            false
        }
        Event::EpochChanged(e) => {
            eprintln!(
                "{}: new epoch {} (the previous one ended after seq {}; later messages of it were lost)",
                e.room, e.epoch, e.previous_seq
            );
            false
        }
        Event::Joined(j) => {
            match &j.recovery {
                Some(r) if r.recovered => eprintln!(
                    "rejoined {} at #{}: recovered, {} missed messages replayed",
                    j.room, j.seq, r.replayed
                ),
                Some(r) => eprintln!(
                    "rejoined {} at #{}: reset, missed messages are gone (the room keeps from {}:{}; see `client history`)",
                    j.room, j.seq, r.oldest_epoch, r.oldest_seq
                ),
                None => eprintln!("rejoined {} at #{}", j.room, j.seq),
            }
            false
        }
        Event::Error(e) => {
            let code = proto::ErrorCode::try_from(e.code).map_or("UNKNOWN", |c| c.as_str_name());
            eprintln!("error {code}: {}", e.message);
            false
        }
        Event::Closed { code, reason } => {
            eprintln!(
                "closed ({}): {reason}",
                code.map_or("no code".into(), |c| c.to_string())
            );
            true
        }
    }
}
