//! The `roomwire` binary: parses the command line, sets up logging, binds and runs the node (or
//! the command-line client). Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use roomwire::Node;
use roomwire::cli::{Cli, Command, ServeArgs};
use roomwire::config::{Config, ConfigError, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// sysexits.h EX_USAGE: the configuration is unusable.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.command {
        Some(Command::Client(args)) => {
            init_tracing(LogFormat::Text, "warn");
            match runtime.block_on(roomwire::cli::run_client(args)) {
                Ok(code) => code,
                Err(error) => {
                    eprintln!("error: {}", causes(&error));
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Token(args)) => match roomwire::cli::run_token(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {}", causes(&error));
                ExitCode::FAILURE
            }
        },
        Some(Command::Certs { action }) => match roomwire::cli::run_certs(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {}", causes(&error));
                ExitCode::FAILURE
            }
        },
        Some(Command::Serve(args)) => serve(&runtime, args),
        None => serve(&runtime, cli.serve),
    }
}

fn serve(runtime: &tokio::runtime::Runtime, args: ServeArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), std::env::vars(), &args.overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("roomwire: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.print_config {
        print!(
            "{}",
            toml::to_string_pretty(&config.redacted()).expect("config serializes")
        );
        return ExitCode::SUCCESS;
    }
    init_tracing(config.log.format, "info");
    let result = runtime.block_on(async move {
        let node = Node::bind(config).await?;
        banner(&node);
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        node.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A file the configuration names could not be used: found before anything was bound.
        Err(error) if error.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("roomwire: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(error) => {
            tracing::error!("{}", causes(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many errors repeat their source in
/// their own message (`websocket: IO error: refused` caused by `IO error: refused`), and a cause
/// already said is not said again.
fn causes(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// What a person starting a node needs first, on standard error: where to point a browser and a
/// client, and the API key when one was generated (the logs carry the rest).
fn banner(node: &Node) {
    let ctx = node.context();
    let config = &ctx.config;
    let http = if config.tls.enabled { "https" } else { "http" };
    let ws = if config.tls.enabled { "wss" } else { "ws" };
    // An address the browser on this machine can open (0.0.0.0 is not one).
    let shown = |addr: std::net::SocketAddr| match addr.ip() {
        ip if ip.is_unspecified() && addr.is_ipv4() => format!("127.0.0.1:{}", addr.port()),
        ip if ip.is_unspecified() => format!("[::1]:{}", addr.port()),
        _ => addr.to_string(),
    };
    let mut lines = vec![format!(
        "roomwire {} ready: node {} in region {} ({})",
        env!("CARGO_PKG_VERSION"),
        ctx.node_id,
        config.node.region,
        if config.mesh.nats_urls.is_empty() {
            "standalone"
        } else {
            "mesh"
        }
    )];
    for addr in node.local_addrs() {
        let addr = shown(addr);
        lines.push(format!("  demo page      {http}://{addr}/"));
        lines.push(format!("  WebSocket      {ws}://{addr}/ws"));
    }
    for addr in node.webtransport_addrs() {
        lines.push(format!("  WebTransport   https://{}/wt", shown(addr)));
    }
    match node.generated_api_key() {
        Some(key) => lines.push(format!(
            "  API key        {key}   (generated for this run; set api.keys to keep one)"
        )),
        None => lines.push("  API key        from api.keys".into()),
    }
    if config.auth.mode == roomwire::config::AuthMode::Insecure {
        lines.push(
            "  auth           insecure development mode: the token is the user id (try: roomwire client --token alice chat lobby)".into(),
        );
    }
    eprintln!("{}", lines.join("\n"));
}

/// web-transport-quinn's CONNECT-stream reader warns "failed to read capsule" whenever a
/// WebTransport connection is closed without the session being closed first, which is how the
/// node ends every session (and how the client sees it end): quiet, unless `RUST_LOG` names the
/// crate.
const QUIET_CAPSULE_READER: &str = "web_transport_quinn::session=error";

/// Logging from `RUST_LOG`, else `default`, to standard error.
fn init_tracing(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let names_it = std::env::var("RUST_LOG").is_ok_and(|spec| spec.contains("web_transport_quinn"));
    let filter = if names_it {
        filter
    } else {
        filter.add_directive(QUIET_CAPSULE_READER.parse().expect("a valid directive"))
    };
    // Colour only for a person at a terminal, never into files or log shippers.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn signal_shutdown(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
