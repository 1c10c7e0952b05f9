//! The `natter` binary: a thin command-line shell over the library.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use natter::config::{Config, Feature, Features, LogFormat, ServeArgs};

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
    /// Run the server (on the embedded SQLite store unless `--store` names PostgreSQL).
    Serve(ServeArgs),
    /// Apply the store's schema migrations (and, on PostgreSQL, check or create the
    /// cluster's bucket map), then exit without serving.
    Migrate(StoreArgs),
    /// Print the effective configuration of `natter serve` (file < environment < flags)
    /// as TOML, after checking it as `serve` would.
    Config(ServeArgs),
    /// Copy a consistent snapshot of a running (or stopped) server's database.
    Backup(BackupArgs),
    /// Measure throughput and latency.
    Bench(natter::bench::BenchArgs),
    /// Send one message to a channel (over the WebSocket).
    Send(natter::cli::SendArgs),
    /// Print a channel's events as they arrive.
    Tail(natter::cli::TailArgs),
}

#[derive(clap::Args)]
struct StoreArgs {
    /// The server's data directory (the SQLite file's, unless `--store` is given).
    #[arg(long, env = "NATTER_DATA_DIR", default_value = "natter-data")]
    data_dir: PathBuf,
    /// `sqlite://PATH` or comma-separated `postgres://` URLs, shard 0 first.
    #[arg(long, env = "NATTER_STORE", value_name = "URL")]
    store: Option<String>,
}

impl StoreArgs {
    fn location(&self) -> anyhow::Result<natter::store::StoreLocation> {
        match &self.store {
            Some(s) => {
                natter::store::StoreLocation::parse(s).map_err(|e| anyhow::anyhow!("--store: {e}"))
            }
            None => Ok(natter::store::StoreLocation::Sqlite(
                natter::config::db_path(&self.data_dir),
            )),
        }
    }
}

#[derive(clap::Args)]
struct BackupArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The uploaded files' directory (default: `files` in the data directory).
    #[arg(long, env = "NATTER_FILES_DIR")]
    files_dir: Option<PathBuf>,
    /// A new directory to write the backup into (as `PATH/natter.db` and `PATH/files`, so
    /// `natter serve --data-dir PATH` serves it); it must not hold a database already.
    path: PathBuf,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes on one line: a refused option or a failed start reads as
            // a message, not a backtrace.
            eprintln!("natter: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let sub = |name: &str| {
        matches
            .subcommand_matches(name)
            .expect("clap matched this subcommand")
            .clone()
    };
    match cli.command {
        Command::Serve(_) => {
            let matches = sub("serve");
            let args = ServeArgs::resolve(&matches)?;
            let config = Config::from_args(&args)?;
            let _log = init_logging(&args.log, args.log_format);
            match natter::process::raise_open_files(1 << 20) {
                Some(limit) => tracing::info!(limit, "open-files limit"),
                None => tracing::warn!("cannot read the open-files limit"),
            }
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("listen on {}", config.listen))?;
                tokio::spawn(reload_on_hangup(matches, Arc::clone(&config.features)));
                natter::serve(listener, config, shutdown_signal()).await
            })
        }
        Command::Config(_) => {
            let args = ServeArgs::resolve(&sub("config"))?;
            Config::from_args(&args)?;
            print!("{}", args.to_toml());
            Ok(())
        }
        Command::Migrate(args) => {
            let _log = init_logging("info", LogFormat::Human);
            let location = args.location()?;
            let report = runtime()?.block_on(natter::store::migrate(&location))?;
            println!("{report}");
            Ok(())
        }
        Command::Backup(args) => {
            let _log = init_logging("info", LogFormat::Human);
            let source = match args.store.location()? {
                natter::store::StoreLocation::Sqlite(path) => path,
                natter::store::StoreLocation::Postgres(urls) => anyhow::bail!(
                    "natter backup copies the SQLite store only. PostgreSQL keeps the data \
                     itself: back up each of the {} shard(s) with its own tools, at the same \
                     moment or with point-in-time recovery: `pg_dump --format=custom URL` per \
                     shard for a logical copy, or `pg_basebackup` with WAL archiving for \
                     continuous backups (see the README's section on backups)",
                    urls.len()
                ),
            };
            std::fs::create_dir_all(&args.path)
                .with_context(|| format!("create {}", args.path.display()))?;
            let report = natter::store::sqlite::backup::backup(
                &source,
                &natter::config::db_path(&args.path),
            )?;
            let files_from = args
                .files_dir
                .clone()
                .unwrap_or_else(|| args.store.data_dir.join("files"));
            let files = natter::store::sqlite::backup::copy_files(
                &report.path,
                &files_from,
                &args.path.join("files"),
            )?;
            println!(
                "backed up {} bytes ({} channels, {} events) to {} and {} uploaded files ({} bytes) in {:.2} s; integrity check ok",
                report.bytes,
                report.channels,
                report.events,
                report.path.display(),
                files.files,
                files.bytes,
                report.took.as_secs_f64()
            );
            if files.missing > 0 {
                eprintln!(
                    "natter: warning: {} file(s) of messages in the backup were gone from {} (see the log lines above)",
                    files.missing,
                    files_from.display()
                );
            }
            Ok(())
        }
        Command::Bench(args) => {
            let _log = init_logging_from_env();
            runtime()?.block_on(natter::bench::run(args))
        }
        Command::Send(args) => {
            let _log = init_logging_from_env();
            runtime()?.block_on(natter::cli::send(args))
        }
        Command::Tail(args) => {
            let _log = init_logging_from_env();
            runtime()?.block_on(natter::cli::tail(args))
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Logs to stderr through a writer thread, so a slow terminal or pipe never stalls a
/// request; the guard flushes what is queued when dropped.
fn init_logging(filter: &str, format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    guard
}

/// The client commands' logging: human lines, filtered by `NATTER_LOG`.
fn init_logging_from_env() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = std::env::var("NATTER_LOG").unwrap_or_else(|_| "info".into());
    init_logging(&filter, LogFormat::Human)
}

/// Resolves on the first SIGINT or SIGTERM. A second one ends the process at once: the
/// store is a WAL-mode SQLite database, so a transaction cut off mid-commit is rolled
/// back on the next start, and nothing it held had been acknowledged.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    let first = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = first, "draining; a second signal stops at once");
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = term.recv() => 128 + libc::SIGTERM,
            _ = int.recv() => 128 + libc::SIGINT,
        };
        // Straight to stderr: the log writer thread may not get to run again.
        eprintln!("natter: second signal; exiting now without draining");
        std::process::exit(code);
    });
}

/// On SIGHUP, reads the configuration again and applies its feature flags; other changed
/// options are reported and need a restart.
async fn reload_on_hangup(matches: clap::ArgMatches, features: Arc<Features>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; feature flags change only on restart");
        return;
    };
    let started = ServeArgs::resolve(&matches).ok();
    while hangup.recv().await.is_some() {
        let reloaded =
            ServeArgs::resolve(&matches).and_then(|a| Ok((Features::parse(&a.features)?, a)));
        let (fresh, args) = match reloaded {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration refused; nothing changed");
                continue;
            }
        };
        for feature in Feature::ALL {
            let on = fresh.enabled(feature);
            if features.enabled(feature) != on {
                features.set(feature, on);
                tracing::info!(feature = feature.name(), on, "SIGHUP: feature flag changed");
            }
        }
        if let Some(started) = &started {
            let mut without_features = args.clone();
            without_features.features.clone_from(&started.features);
            if without_features.to_toml() != started.to_toml() {
                tracing::warn!(
                    "SIGHUP: options other than feature flags changed; they apply on restart"
                );
            }
        }
    }
}
