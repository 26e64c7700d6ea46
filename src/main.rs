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
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Certs { action }) => match roomwire::cli::run_certs(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
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
            toml::to_string_pretty(&config).expect("config serializes")
        );
        return ExitCode::SUCCESS;
    }
    init_tracing(config.log.format, "info");
    let result = runtime.block_on(async move {
        let node = Node::bind(config).await?;
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
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
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
