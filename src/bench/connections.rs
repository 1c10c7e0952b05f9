//! `natter bench connections`: opens N idle WebSockets (hello, `ready`, then silence),
//! spread over source addresses 127.0.0.2, 127.0.0.3, … so one address's ~28k ephemeral
//! ports do not cap the count. Reports the connect rate, failures by cause, and the
//! server's memory per connection, read from `/proc` of a server this run starts as a
//! child process (or of `--server-pid`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use super::report::{Latency, Report};
use super::{RunArgs, bench_username, emit, histogram};
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
    /// With --url: the server's process id, to read its memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The `natter` binary to start as the server (default: this one).
    #[arg(long, hide = true)]
    pub server_bin: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn run(args: ConnectionsArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    emit(&report, &args.run)
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Raises this process's open-files limit to its hard limit; says so when it cannot.
pub(crate) fn raise_open_files(wanted: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if !ok {
        eprintln!("cannot read the open-files limit; connections may fail with EMFILE");
        return;
    }
    if lim.rlim_cur >= wanted {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max.min(wanted.max(lim.rlim_cur)),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 || raised.rlim_cur < wanted {
        eprintln!(
            "the open-files limit is {} (hard {}), below the {wanted} this run needs: raise it (ulimit -n) or expect EMFILE failures",
            raised.rlim_cur, lim.rlim_max
        );
    }
}

/// A `natter serve` child process on a temporary directory.
struct Child {
    child: tokio::process::Child,
    base: String,
    _dir: super::Scratch,
}

async fn spawn_server(bin: Option<&std::path::Path>) -> anyhow::Result<Child> {
    let dir = super::Scratch::new(None)?;
    let exe = match bin {
        Some(b) => b.to_owned(),
        None => std::env::current_exe().context("find the natter binary")?,
    };
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir.path)
        .env("NATTER_INSECURE_FAST_PASSWORD_HASH", "1")
        .env("NATTER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start natter serve")?;
    let mut lines = BufReader::new(child.stderr.take().context("the child's stderr")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = crate::server::listening_addr(&line) {
                return Ok::<_, anyhow::Error>(addr);
            }
        }
        anyhow::bail!("natter serve exited before listening")
    })
    .await
    .context("natter serve did not listen within 30 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Child {
        child,
        base: format!("http://{addr}"),
        _dir: dir,
    })
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
    raise_open_files(args.connections as u64 + 1024);
    let (base, pid, child) = match &args.run.url {
        Some(url) => (url.trim_end_matches('/').to_owned(), args.server_pid, None),
        None => {
            let child = spawn_server(args.server_bin.as_deref()).await?;
            (child.base.clone(), child.child.id(), Some(child))
        }
    };
    let server: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .context("--url must be http://IP:PORT for this scenario")?;
    let mut api = Api::new(&base);
    api.register(&bench_username(), "bench-password").await?;
    let token = api.token().unwrap_or_default().to_owned();
    let before = pid.and_then(rss_bytes);

    eprintln!("opening {} idle WebSockets…", args.connections);
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
    tokio::time::sleep(Duration::from_secs_f64(args.hold.max(0.0))).await;
    let after = pid.and_then(rss_bytes);
    let opened = open_sockets.len();
    drop(open_sockets);

    let mut report = Report::new("connections");
    report.param("connections", args.connections);
    report.param("concurrency", args.concurrency);
    report.param("per source address", per_source);
    report.param(
        "server",
        args.run
            .url
            .clone()
            .unwrap_or_else(|| "child process".into()),
    );
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
    if let Some(mut c) = child {
        let _ = c.child.kill().await;
    }
    Ok(report)
}
