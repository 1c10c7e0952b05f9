//! `natter bench`: write-path measurements. `store` drives the storage engine directly
//! (group commit, no HTTP); `http` drives the HTTP API with concurrent clients, against a
//! server it spawns in-process or one given by `--url`; `fanout` measures real-time
//! delivery over WebSockets ([`fanout`]).

pub mod check;
pub mod connections;
pub mod fanout;
pub mod history;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::config::Config;
use crate::model::ChannelKind;
use crate::ratelimit::Rate;
use crate::server::open_store;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, clap::Subcommand)]
pub enum Scenario {
    /// Durable sends straight into the store: the group-commit writer's throughput.
    Store(WriteArgs),
    /// Durable sends through `POST /v1/channels/{id}/messages`.
    Http(HttpArgs),
    /// One channel, many online members: deliveries per second and send→deliver latency.
    Fanout(fanout::FanoutArgs),
    /// Readers paging through a channel's history: pages/s and page latency.
    History(history::HistoryArgs),
    /// Many idle WebSockets: connect rate and server memory per connection.
    Connections(connections::ConnectionsArgs),
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
    /// Data directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    #[command(flatten)]
    pub write: WriteArgs,
    /// A running server to measure; without it one is started in this process.
    #[arg(long)]
    pub url: Option<String>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Store(w) => bench_store(w).await,
        Scenario::Http(h) => bench_http(h).await,
        Scenario::Fanout(f) => fanout::run(f).await,
        Scenario::History(h) => history::run(h).await,
        Scenario::Connections(c) => connections::run(c).await,
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

/// The server a run measures: one given by `--url`, or one started in this process on a
/// temporary directory, stopped (and its directory removed) by [`Target::stop`].
pub(crate) struct Target {
    pub base: String,
    server: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    _scratch: Scratch,
}

impl Target {
    pub async fn start(url: Option<&str>, data_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let scratch = Scratch::new(data_dir)?;
        if let Some(url) = url {
            return Ok(Self {
                base: url.trim_end_matches('/').to_owned(),
                server: None,
                _scratch: scratch,
            });
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::serve(
            listener,
            bench_config(&scratch.path),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            base: format!("http://{addr}"),
            server: Some((stop, task)),
            _scratch: scratch,
        })
    }

    /// Stops a server this run started and waits until it has shut down.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            task.await??;
        }
        Ok(())
    }
}

/// What every scenario takes: the server to measure and where its report goes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// A running server to measure (its sign-up and send limits must allow the run);
    /// without it the run starts one of its own on a temporary directory.
    #[arg(long)]
    pub url: Option<String>,
    /// Print the report as JSON too.
    #[arg(long)]
    pub json: bool,
    /// Write the report as a self-contained HTML page.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Prints a report (and its JSON), writes its HTML page, and fails if its checks did.
pub(crate) fn emit(report: &report::Report, run: &RunArgs) -> anyhow::Result<()> {
    print!("{}", report.to_text());
    if run.json {
        println!("{}", report.to_json());
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
    config.limits.send = Rate {
        per_second: 1e9,
        burst: 1e9,
    };
    config.limits.signups_per_ip = Rate {
        per_second: 1e9,
        burst: 1e9,
    };
    config.write_queue = 1 << 20;
    config
}

/// What one run measured.
struct Report {
    name: &'static str,
    sent: usize,
    errors: usize,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Report {
    fn print(&self, w: &WriteArgs) {
        let rate = self.sent as f64 / self.elapsed.as_secs_f64();
        let q = |p: f64| self.latency_us.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "{}: {} durable messages in {:.2} s = {:.0} msgs/s ({} errors); concurrency {}, {} channels, {} B text",
            self.name,
            self.sent,
            self.elapsed.as_secs_f64(),
            rate,
            self.errors,
            w.concurrency,
            w.channels,
            w.text_bytes
        );
        println!(
            "  ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            self.latency_us.max() as f64 / 1000.0
        );
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs `concurrency` workers that together call `send` `messages` times.
async fn drive<F, Fut>(name: &'static str, w: &WriteArgs, send: F) -> Report
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let send = Arc::new(send);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..w.concurrency.max(1))
        .map(|_| {
            let send = send.clone();
            let next = next.clone();
            let total = w.messages;
            tokio::spawn(async move {
                let mut hist = histogram();
                let (mut ok, mut errors) = (0, 0);
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let t = Instant::now();
                    if send(n).await {
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
    let mut report = Report {
        name,
        sent: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: histogram(),
    };
    for worker in workers {
        let (hist, ok, errors) = worker.await.expect("bench worker");
        let _ = report.latency_us.add(&hist);
        report.sent += ok;
        report.errors += errors;
    }
    report.elapsed = start.elapsed();
    report
}

async fn bench_store(w: WriteArgs) -> anyhow::Result<()> {
    let scratch = Scratch::new(w.data_dir.clone())?;
    let config = bench_config(&scratch.path);
    let store: Arc<dyn Store> = Arc::new(open_store(&config, None)?);
    let author = store.create_user(&bench_username(), "-", None).await?.id;
    let mut channels = Vec::new();
    for i in 0..w.channels.max(1) {
        channels.push(
            store
                .create_channel(author, ChannelKind::Group, &format!("bench{i}"), &[])
                .await?
                .id,
        );
    }
    let text: Arc<str> = "x".repeat(w.text_bytes.max(1)).into();
    let channels = Arc::new(channels);
    let report = drive("store", &w, move |n| {
        let store = store.clone();
        let channels = channels.clone();
        let text = text.clone();
        async move {
            let ch = channels[n % channels.len()];
            store
                .post_message(author, ch, &text, Some(&n.to_string()))
                .await
                .is_ok()
        }
    })
    .await;
    report.print(&w);
    Ok(())
}

async fn bench_http(h: HttpArgs) -> anyhow::Result<()> {
    let w = h.write.clone();
    let target = Target::start(h.url.as_deref(), w.data_dir.clone()).await?;
    let base = target.base.clone();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(w.concurrency)
        .build()?;
    let signup = http
        .post(format!("{base}/v1/users"))
        .json(&json!({"username": bench_username(), "password": "bench-password"}))
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
    let text: Arc<str> = "x".repeat(w.text_bytes.max(1)).into();
    let urls = Arc::new(urls);
    let report = drive("http", &w, move |n| {
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
    report.print(&w);
    target.stop().await
}
