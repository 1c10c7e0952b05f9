//! The `natter` binary: a thin command-line shell over the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use natter::config::{Config, ServeArgs};

#[derive(Parser)]
#[command(
    name = "natter",
    version,
    about = "A self-hostable real-time messaging backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server on the embedded SQLite store.
    Serve(ServeArgs),
    /// Measure throughput and latency.
    Bench(natter::bench::BenchArgs),
    /// Send one message to a channel (over the WebSocket).
    Send(natter::cli::SendArgs),
    /// Print a channel's events as they arrive.
    Tail(natter::cli::TailArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NATTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            let config = Config::from_args(&args)?;
            match natter::process::raise_open_files(1 << 20) {
                Some(limit) => tracing::info!(limit, "open-files limit"),
                None => tracing::warn!("cannot read the open-files limit"),
            }
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("listen on {}", config.listen))?;
                natter::serve(listener, config, shutdown_signal()).await
            })
        }
        Command::Bench(args) => runtime.block_on(natter::bench::run(args)),
        Command::Send(args) => runtime.block_on(natter::cli::send(args)),
        Command::Tail(args) => runtime.block_on(natter::cli::tail(args)),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
