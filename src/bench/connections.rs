//! `natter bench connections`: opens N idle WebSockets (hello, `ready`, then silence),
//! spread over source addresses 127.0.0.2, 127.0.0.3, … so one address's ~28k ephemeral
//! ports do not cap the count. Reports the connect rate, failures by cause, and the
//! server's memory per connection, read from `/proc` of a server this run starts as a
//! child process (or from the `/metrics` of a `--url` server).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::report::{Latency, Report};
use super::{RunArgs, Target, bench_username, emit, histogram};
use crate::client::Api;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionsArgs {
    /// Idle WebSockets to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connects in progress at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Connections per source address (127.0.0.2 upwards).
    #[arg(long, default_value_t = 20_000)]
    pub per_source: usize,
    /// Seconds to hold them open before measuring (the server drops silent connections
    /// after three ping intervals, 30 s by default).
    #[arg(long, default_value_t = 3.0)]
    pub hold: f64,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn run(args: ConnectionsArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    emit(&report, &args.run)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens one idle connection from `source`: hello, then waits for `ready`.
async fn open(server: SocketAddr, source: IpAddr, token: &str) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(source, 0))
        .context("bind the source address")?;
    let stream = socket.connect(server).await.context("connect")?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{server}/v1/ws"), stream)
        .await
        .context("upgrade")?;
    ws.send(Message::text(
        json!({"op": "hello", "token": token}).to_string(),
    ))
    .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"ready""#) => return Ok(ws),
            Some(Ok(Message::Close(f))) => anyhow::bail!("closed before ready: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed before ready"),
        }
    }
}

pub async fn measure(args: &ConnectionsArgs) -> anyhow::Result<Report> {
    let per_source = args.per_source.max(1);
    let sources = args.connections.div_ceil(per_source);
    if sources > 253 {
        anyhow::bail!(
            "{} connections at {per_source} per source address need {sources} addresses; 127.0.0.2–127.0.0.254 has 253",
            args.connections
        );
    }
    let wanted = args.connections as u64 + 1024;
    match crate::process::raise_open_files(wanted) {
        Some(limit) if limit >= wanted => {}
        limit => eprintln!(
            "the open-files limit is {limit:?}, below the {wanted} this run needs (the hard limit caps it; raise it with ulimit -Hn as root): expect EMFILE failures"
        ),
    }
    let target = Target::start(&args.run, None).await?;
    let base = target.base.clone();
    // A child's memory straight from /proc; a --url server's from its /metrics.
    let rss = async || match target.pid() {
        Some(pid) => crate::process::rss_bytes(Some(pid)),
        None => target.sample().await.rss_bytes.map(|b| b as u64),
    };
    let server: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .context("--url must be http://IP:PORT for this scenario")?;
    let mut api = Api::new(&base);
    api.register(&bench_username(), "bench-password").await?;
    let token = api.token().unwrap_or_default().to_owned();
    let before = rss().await;

    let bar = super::fanout::progress(
        args.run.quiet,
        args.connections as u64,
        "opening idle WebSockets",
    );
    let start = Instant::now();
    let mut latency = histogram();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut open_sockets = Vec::with_capacity(args.connections);
    let indices: Vec<usize> = (0..args.connections).collect();
    for chunk in indices.chunks(args.concurrency.max(1)) {
        let attempts = chunk.iter().map(|&i| {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / per_source) as u8)); // ≤ 254: checked above
            let token = token.as_str();
            async move {
                let t = Instant::now();
                (open(server, source, token).await, t.elapsed())
            }
        });
        for (result, took) in futures_util::future::join_all(attempts).await {
            bar.inc(1);
            match result {
                Ok(ws) => {
                    let _ = latency.record(took.as_micros().max(1) as u64);
                    open_sockets.push(ws);
                }
                Err(e) => *failures.entry(format!("{e:#}")).or_default() += 1,
            }
        }
    }
    let connect_time = start.elapsed();
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs_f64(args.hold.max(0.0))).await;
    let after = rss().await;
    let opened = open_sockets.len();
    drop(open_sockets);

    let mut report = Report::new("connections");
    report.param("connections", args.connections);
    report.param("concurrency", args.concurrency);
    report.param("per source address", per_source);
    report.param("server", args.run.server());
    report.figure("opened", opened as f64, "");
    report.figure(
        "connects/s",
        opened as f64 / connect_time.as_secs_f64(),
        "1/s",
    );
    if let (Some(b), Some(a)) = (before, after) {
        report.figure("server RSS before", b as f64 / 1024.0, "KiB");
        report.figure("server RSS with them open", a as f64 / 1024.0, "KiB");
        report.figure(
            "server memory per connection",
            a.saturating_sub(b) as f64 / opened.max(1) as f64,
            "bytes",
        );
    }
    report
        .latencies
        .push(Latency::from_micros("connect + hello + ready", &latency));
    report.errors = failures;
    report.passed = report.errors.is_empty();
    target.stop().await?;
    Ok(report)
}
