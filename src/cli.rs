//! The command line: `roomwire` (serve, the default) and `roomwire client ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tokio::io::AsyncBufReadExt;

use crate::client::{Client, ClientOptions, Event};
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
    },
}

/// Runs `roomwire certs ...`.
pub fn run_certs(action: CertsAction) -> anyhow::Result<()> {
    match action {
        CertsAction::Init {
            dir,
            names,
            services,
        } => {
            for path in crate::certs::init(&dir, &names, &services)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
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
    /// WebTransport: trust certificates signed by the CA in this PEM file.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// WebTransport with --ca-file: a client certificate (PEM) to present (mutual TLS).
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
        /// Client message id (default: a random one).
        #[arg(long)]
        id: Option<String>,
    },
    /// Join a room, print its messages, and publish each line typed on standard input.
    Chat { room: String },
}

/// Runs `roomwire client ...`; returns the process exit code.
pub async fn run_client(args: ClientArgs) -> anyhow::Result<()> {
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
    let mut client = Client::connect(&args.url, options).await?;
    let c = client.connected();
    eprintln!(
        "connected: session {} as {} on node {} ({})",
        c.session_id, c.user_id, c.node_id, c.region
    );
    match args.action {
        ClientAction::Publish { room, text, id } => {
            let id = id.unwrap_or_else(|| crate::ids::random_hex(8));
            let ack = client.publish(&room, text, &id).await?;
            println!(
                "published to {} as epoch {} seq {} (id {})",
                ack.room, ack.epoch, ack.seq, ack.client_msg_id
            );
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
                    break;
                }
            }
        }
        ClientAction::Chat { room } => {
            let joined = client.join(&room).await?;
            eprintln!(
                "joined {} at seq {}; type a line and press enter to publish, Ctrl-D to quit",
                joined.room, joined.seq
            );
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            let mut counter = 0u64;
            loop {
                tokio::select! {
                    line = lines.next_line() => match line? {
                        Some(line) if line.trim().is_empty() => {}
                        Some(line) => {
                            counter += 1;
                            if let Err(error) = client.publish(&room, line, &format!("cli-{counter}")).await {
                                eprintln!("publish failed: {error}");
                            }
                        }
                        None => break,
                    },
                    event = client.next_event() => match event {
                        Some(event) => if print_event(&event) { break },
                        None => break,
                    },
                }
            }
            client.close().await;
        }
    }
    Ok(())
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

/// Prints one event; returns true when the session ended.
fn print_event(event: &Event) -> bool {
    match event {
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
            eprintln!("rejoined {} at #{}", j.room, j.seq);
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
