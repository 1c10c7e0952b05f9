//! `natter bench`: the load generator. Every scenario but `store` measures a server given
//! by `--url`, or one it starts as a child process (`--spawn`, the default; see
//! [`Target`]), and ends with a [`report::Report`]: a table, `--json`, and a
//! self-contained `--report FILE.html`.
//!
//! - `store`: the storage engine alone, in this process (group commit, no HTTP).
//! - `http`: durable sends through the HTTP API from concurrent clients.
//! - [`fanout`]: real-time delivery over WebSockets, every stream checked ([`check`]).
//! - [`capacity`] and [`spike`]: phases of the fan-out rig at stepped or bursting rates.
//! - [`history`]: readers paging through a channel's history.
//! - [`connections`]: many idle WebSockets, and the server's memory per connection.
//! - [`floor`]: a bare durable fan-out server on plain TCP, the host's floor under `fanout`.

mod alarm;
pub mod capacity;
mod chart;
pub mod check;
pub mod connections;
pub mod fanout;
pub mod floor;
pub mod history;
pub mod report;
pub mod search;
pub mod spike;
pub mod timeline;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::config::Config;
use crate::model::ChannelKind;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, clap::Subcommand)]
pub enum Scenario {
    /// Durable sends straight into the store: the group-commit writer's throughput
    /// (in this process; --url does not apply).
    Store(HttpArgs),
    /// Durable sends through `POST /v1/channels/{id}/messages`.
    Http(HttpArgs),
    /// Channels of online members and senders over WebSockets: acked msgs/s, deliveries/s,
    /// ack and send→deliver latency; every received stream is checked.
    Fanout(fanout::FanoutArgs),
    /// Readers paging through a channel's history: pages/s and page latency.
    History(history::HistoryArgs),
    /// Searches over a large store (in this process): latency by kind of query.
    Search(search::SearchArgs),
    /// Many idle WebSockets: connect rate and server memory per connection.
    Connections(connections::ConnectionsArgs),
    /// Steps the offered rate up until latency or errors cross a bound: the highest
    /// sustainable rate, and the peak to plan for with 1.5x headroom.
    Capacity(capacity::CapacityArgs),
    /// A steady rate with a sudden burst: errors, latency and queues, and recovery time.
    Spike(spike::SpikeArgs),
    /// The least any durable fan-out server can do on this host (a bare epoll loop over
    /// plain TCP and a preallocated log), to set `fanout`'s figures against.
    Floor(floor::FloorArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    /// Messages to send in total.
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 1024)]
    pub concurrency: usize,
    /// Channels the messages are spread over.
    #[arg(long, default_value_t = 64)]
    pub channels: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub text_bytes: usize,
    /// Every text starts with `@` and the sender's own name: a mention the store
    /// resolves, so each send takes the slow path (what mentions cost a send).
    #[arg(long)]
    pub mention: bool,
    /// Texts of words (a Zipf-distributed vocabulary, as `bench search` writes) instead
    /// of one long run of `x`: what indexing real text costs a send.
    #[arg(long)]
    pub words: bool,
    /// Send at this many messages/s on a fixed schedule (open loop; latency counted from
    /// each send's scheduled time), instead of as fast as `--concurrency` allows.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Data directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    #[command(flatten)]
    pub write: WriteArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Store(a) => emit(&measure_store(&a).await?, &a.run),
        Scenario::Http(h) => emit(&measure_http(&h).await?, &h.run),
        Scenario::Fanout(f) => fanout::run(f).await,
        Scenario::History(h) => history::run(h).await,
        Scenario::Search(s) => search::run(s).await,
        Scenario::Connections(c) => connections::run(c).await,
        Scenario::Capacity(c) => capacity::run(c).await,
        Scenario::Spike(s) => spike::run(s).await,
        Scenario::Floor(f) => floor::run(f).await,
    }
}

/// A data directory that is removed on drop unless the user named it.
pub(crate) struct Scratch {
    path: PathBuf,
    remove: bool,
}

impl Scratch {
    fn new(given: Option<PathBuf>) -> anyhow::Result<Self> {
        let (path, remove) = match given {
            Some(p) => (p, false),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos();
                (
                    std::env::temp_dir()
                        .join(format!("natter-bench-{}-{nanos}", std::process::id())),
                    true,
                )
            }
        };
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path, remove })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The server a run measures: one given by `--url`, or (`--spawn`, the default) a
/// `natter serve` child process on a temporary directory, with limits that let the run
/// through, stopped with SIGTERM by [`Target::stop`]. A child is its own process, so its
/// CPU time and memory are the server's alone.
pub(crate) struct Target {
    pub base: String,
    /// Every node given by `--url` (the first is `base`); one for a spawned server.
    pub bases: Vec<String>,
    child: Option<tokio::process::Child>,
    http: reqwest::Client,
    _scratch: Option<Scratch>,
}

/// The server's own readings at one moment (from its `/metrics`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<f64>,
    pub buffered_bytes: Option<f64>,
    /// Event frames the server has written to WebSockets.
    pub delivered: Option<f64>,
}

impl Sample {
    /// The sum of several nodes' readings (`None` where any node's is unknown).
    pub(crate) fn sum(samples: &[Sample]) -> Sample {
        let add = |f: fn(&Sample) -> Option<f64>| {
            samples
                .iter()
                .map(f)
                .try_fold(0.0, |acc, v| v.map(|v| acc + v))
        };
        Sample {
            cpu_seconds: add(|s| s.cpu_seconds),
            rss_bytes: add(|s| s.rss_bytes),
            buffered_bytes: add(|s| s.buffered_bytes),
            delivered: add(|s| s.delivered),
        }
    }
}

impl Target {
    pub async fn start(run: &RunArgs, data_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let http = reqwest::Client::new();
        if !run.url.is_empty() {
            let bases: Vec<String> = run
                .url
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect();
            return Ok(Self {
                base: bases[0].clone(),
                bases,
                child: None,
                http,
                _scratch: None,
            });
        }
        let scratch = Scratch::new(data_dir)?;
        let exe = match &run.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("find the natter binary")?,
        };
        let mut command = tokio::process::Command::new(exe);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&scratch.path);
        if let Some(store) = &run.store {
            command.args(["--store", store]);
        }
        let mut child = command
            .envs([
                ("NATTER_INSECURE_FAST_PASSWORD_HASH", "1"),
                ("NATTER_SEND_RATE", "1000000000"),
                ("NATTER_SEND_BURST", "1000000000"),
                ("NATTER_SIGNUPS_PER_IP", "1000000000"),
                ("NATTER_WRITE_RATE", "1000000000"),
                ("NATTER_PASSWORD_HASH_CONCURRENCY", "64"),
                ("NATTER_WRITE_BYTES_PER_SEC", "1000000000000"),
                ("NATTER_CHANNEL_CREATES_PER_HOUR", "1000000000000"),
                ("NATTER_MAX_CHANNELS_PER_USER", "1000000"),
                ("NATTER_WS_CONNECTIONS_PER_USER", "1000000"),
                ("NATTER_MAX_CONNECTIONS", "10000000"),
                ("NATTER_MAX_CONNECTIONS_PER_ADDRESS", "10000000"),
                ("NATTER_MAX_PENDING_DMS", "1000000"),
                ("NATTER_MAX_SESSIONS_PER_USER", "1000000"),
                ("NATTER_MEMBERSHIP_CONSENT", "open"),
                ("NATTER_WRITE_QUEUE", "262144"),
                ("NATTER_LOG", "info"),
            ])
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
            bail!("natter serve exited before listening")
        })
        .await
        .context("natter serve did not listen within 30 s")??;
        // Keep reading its log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            base: format!("http://{addr}"),
            bases: vec![format!("http://{addr}")],
            child: Some(child),
            http,
            _scratch: Some(scratch),
        })
    }

    /// The child server's process id (none for `--url`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// The servers' CPU time, memory and queued WebSocket bytes, from their `/metrics`,
    /// summed over every `--url` (unknown if any does not serve `/metrics`: a balancer).
    pub async fn sample(&self) -> Sample {
        Sample::sum(&self.sample_nodes().await)
    }

    /// Each `--url`'s readings, in order.
    pub async fn sample_nodes(&self) -> Vec<Sample> {
        futures_util::future::join_all(self.bases.iter().map(|b| self.sample_one(b))).await
    }

    async fn sample_one(&self, base: &str) -> Sample {
        let text = match self.http.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Sample {
            cpu_seconds: value("natter_process_cpu_seconds_total"),
            rss_bytes: value("natter_process_resident_memory_bytes"),
            buffered_bytes: value("natter_ws_buffered_bytes"),
            delivered: value("natter_events_delivered_total"),
        }
    }

    /// Stops a child server with SIGTERM and checks that it drained and exited cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            // SAFETY: kill only sends a signal to our own child process.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .context("the server did not exit within 60 s of SIGTERM")??;
        if !status.success() {
            bail!("the server exited with {status}");
        }
        Ok(())
    }
}

/// What every scenario takes: the server to measure and where its report goes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// A running server to measure (its sign-up and send limits must allow the run).
    /// Several (repeated, or comma-separated): the nodes of a cluster, or a balancer in
    /// front of them; clients are spread over them in turn, and each one's `/metrics`
    /// gives per-node CPU and deliveries (a balancer's URL has none).
    #[arg(long, conflicts_with = "spawn", value_delimiter = ',')]
    pub url: Vec<String>,
    /// Start `natter serve` as a child process on a temporary directory for the run, and
    /// stop it at the end (the default without --url).
    #[arg(long)]
    pub spawn: bool,
    /// The `natter` binary --spawn starts (default: this one).
    #[arg(long, hide = true)]
    pub server_bin: Option<PathBuf>,
    /// The store of the spawned server (or of `bench store`): `sqlite://PATH` or
    /// PostgreSQL shards as comma-separated `postgres://` URLs (default: SQLite in the
    /// scratch directory). Use fresh databases: the run's data stays in them.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Print the report as JSON: one JSON value on stdout, the table on stderr.
    #[arg(long)]
    pub json: bool,
    /// Write the report as a self-contained HTML page.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// How the report names the server.
    pub fn server(&self) -> String {
        if self.url.is_empty() {
            "spawned child process".into()
        } else {
            self.url.join(",")
        }
    }
}

/// Prints a report, writes its HTML page, and fails if its checks did. With `--json`,
/// stdout holds the report's JSON alone (`natter bench fanout --json | jq .figures`) and
/// the table goes to stderr, with the progress bars and the log.
pub(crate) fn emit(report: &report::Report, run: &RunArgs) -> anyhow::Result<()> {
    if run.json {
        eprint!("{}", report.to_text());
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if let Some(path) = &run.report {
        std::fs::write(path, report.to_html())
            .with_context(|| format!("write {}", path.display()))?;
    }
    if !report.passed {
        bail!("the {} run failed its checks", report.scenario);
    }
    Ok(())
}

/// A username no earlier run has taken (runs may share a `--data-dir` or a `--url`).
fn bench_username() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("bench-{nanos:x}")
}

fn bench_config(dir: &std::path::Path) -> Config {
    let mut config = Config::with_data_dir(dir);
    config.hash_cost = crate::auth::HashCost::insecure_fast();
    config.limits.lift_per_user();
    config.write_queue = 1 << 20;
    config
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs `concurrency` workers that together call `send` `messages` times, and reports
/// the acknowledged rate and ack latency.
async fn drive<F, Fut>(name: &str, w: &WriteArgs, quiet: bool, send: F) -> report::Report
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let send = Arc::new(send);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let bar = fanout::progress(quiet, w.messages as u64, "sending");
    let start = Instant::now();
    let workers: Vec<_> = (0..w.concurrency.max(1))
        .map(|_| {
            let send = send.clone();
            let next = next.clone();
            let bar = bar.clone();
            let total = w.messages;
            let rate = w.rate.filter(|r| *r > 0.0);
            tokio::spawn(async move {
                let mut hist = histogram();
                let (mut ok, mut errors) = (0, 0);
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let t = match rate {
                        Some(r) => {
                            let due = start + Duration::from_secs_f64(n as f64 / r);
                            tokio::time::sleep_until(due.into()).await;
                            due
                        }
                        None => Instant::now(),
                    };
                    let ok_now = send(n).await;
                    bar.inc(1);
                    if ok_now {
                        ok += 1;
                        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                    } else {
                        errors += 1;
                    }
                }
                (hist, ok, errors)
            })
        })
        .collect();
    let mut latency = histogram();
    let (mut sent, mut errors) = (0u64, 0u64);
    for worker in workers {
        let (hist, ok, failed) = worker.await.expect("bench worker");
        let _ = latency.add(&hist);
        sent += ok;
        errors += failed;
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut report = report::Report::new(name);
    report.param("messages", w.messages);
    report.param("concurrency", w.concurrency);
    report.param("channels", w.channels);
    report.param("text bytes", w.text_bytes);
    if w.mention {
        report.param("mention", "every text");
    }
    if w.words {
        report.param("text", "words");
    }
    if let Some(r) = w.rate {
        report.param("rate", r);
    }
    report.figure("messages acked", sent as f64, "");
    report.figure("elapsed", elapsed.as_secs_f64(), "s");
    report.figure("acked msgs/s", sent as f64 / elapsed.as_secs_f64(), "1/s");
    report
        .latencies
        .push(report::Latency::from_micros("ack", &latency));
    if errors > 0 {
        report.errors.insert("failed sends".into(), errors);
    }
    // Every send here is within the limits the run set up; any failure is a finding.
    report.passed = errors == 0;
    report
}

/// A send's text: `--text-bytes` of it, starting with a mention of `user` (the sender)
/// with `--mention`.
fn bench_text(w: &WriteArgs, user: &str) -> String {
    let mut text = if w.mention {
        format!("@{user} ")
    } else {
        String::new()
    };
    let pad = w.text_bytes.max(1).saturating_sub(text.len()).max(1);
    text.push_str(&"x".repeat(pad));
    text
}

/// `natter bench store`: sends straight into the embedded store, in this process.
pub async fn measure_store(args: &HttpArgs) -> anyhow::Result<report::Report> {
    if !args.run.url.is_empty() {
        bail!(
            "`bench store` measures the embedded store in this process; --url does not apply (use `bench http` or `bench fanout`)"
        );
    }
    let w = args.write.clone();
    let scratch = Scratch::new(w.data_dir.clone())?;
    let mut config = bench_config(&scratch.path);
    if let Some(s) = &args.run.store {
        config.store = Some(
            crate::store::StoreLocation::parse(s).map_err(|e| anyhow::anyhow!("--store: {e}"))?,
        );
    }
    let store: Arc<dyn Store> = crate::store::open(config.store_options(None)).await?;
    let closing = Arc::clone(&store);
    let name = bench_username();
    let author = store.create_user(&name, "-", None).await?.id;
    let mut channels = Vec::new();
    for i in 0..w.channels.max(1) {
        channels.push(
            store
                .create_channel(author, ChannelKind::Group, &format!("bench{i}"), &[])
                .await?
                .id,
        );
    }
    let text: Arc<str> = bench_text(&w, &name).into();
    let channels = Arc::new(channels);
    let words = w.words;
    let report = drive("store", &w, args.run.quiet, move |n| {
        let store = store.clone();
        let channels = channels.clone();
        let text = text.clone();
        async move {
            let ch = channels[n % channels.len()];
            let text = if words {
                search::words_text(&mut search::Rng::new(n as u64 + 1), text.len())
            } else {
                text.to_string()
            };
            store
                .post_message(author, ch, &text, Some(&n.to_string()))
                .await
                .is_ok()
        }
    })
    .await;
    closing.close().await;
    Ok(report)
}

/// `natter bench http`: durable sends through the HTTP API, from concurrent clients.
pub async fn measure_http(h: &HttpArgs) -> anyhow::Result<report::Report> {
    let w = h.write.clone();
    let target = Target::start(&h.run, w.data_dir.clone()).await?;
    let base = target.base.clone();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(w.concurrency)
        .build()?;
    let name = bench_username();
    let signup = http
        .post(format!("{base}/v1/users"))
        .json(&json!({"username": name, "password": "bench-password"}))
        .send()
        .await
        .context("register the bench user")?;
    if !signup.status().is_success() {
        bail!(
            "register the bench user: {} {}",
            signup.status(),
            signup.text().await.unwrap_or_default()
        );
    }
    let token = signup.json::<serde_json::Value>().await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut urls = Vec::new();
    for i in 0..w.channels.max(1) {
        let res = http
            .post(format!("{base}/v1/channels"))
            .bearer_auth(&token)
            .json(&json!({"name": format!("bench{i}"), "kind": "group"}))
            .send()
            .await?
            .error_for_status()?;
        let id = res.json::<serde_json::Value>().await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        urls.push(format!("{base}/v1/channels/{id}/messages"));
    }
    let text: Arc<str> = bench_text(&w, &name).into();
    let urls = Arc::new(urls);
    let mut report = drive("http", &w, h.run.quiet, move |n| {
        let http = http.clone();
        let urls = urls.clone();
        let text = text.clone();
        let token = token.clone();
        async move {
            let res = http
                .post(&urls[n % urls.len()])
                .bearer_auth(token)
                .json(&json!({"text": &*text, "client_id": n.to_string()}))
                .send()
                .await;
            matches!(res, Ok(r) if r.status().is_success())
        }
    })
    .await;
    report.param("server", h.run.server());
    target.stop().await?;
    Ok(report)
}
