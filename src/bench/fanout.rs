//! `natter bench fanout`: C channels with M members each online over WebSockets, and S
//! senders (each a member of one channel) sending at a fixed total rate (open loop:
//! latency counts from each message's scheduled send time, so a stalled server cannot
//! hide its delay) or as fast as the server acknowledges (`--rate max`, a window of sends
//! in flight per sender). Every receiving connection runs the delivery [`Checker`]; any
//! missing, duplicate or reordered event fails the run.
//!
//! The machinery is a [`Rig`]: users, channels and connections set up once, then driven
//! through one or more [`Rig::phase`]s (the `capacity` and `spike` scenarios are phases
//! of the same rig), with the receivers and their checkers running across all of them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{mpsc, watch};

use super::check::{Checker, Violations};
use super::report::{Latency, Report, Series, Table};
use super::timeline::Timeline;
use super::{RunArgs, Sample, Target, bench_username, emit, histogram};
use crate::client::{Api, Frame, Incoming, Realtime};

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Messages to send in total.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Total send rate in messages/s, or `max`.
    #[arg(long, default_value = "max")]
    pub rate: Rate,
    /// With a fixed rate: send for this many seconds (overrides --messages).
    #[arg(long)]
    pub duration: Option<f64>,
    /// With `--rate max`: sends in flight per sender.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Who takes part: channels, their online members, the senders, the message size. A flag
/// not given takes the scenario's default ([`Shape`]s named `FANOUT`, `CAPACITY`, …).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShapeArgs {
    /// Channels [fanout: 1, capacity: 100, spike: 10].
    #[arg(long)]
    pub channels: Option<usize>,
    /// Receiving members online per channel, each on its own WebSocket [fanout: 1000,
    /// capacity: 1, spike: 10].
    #[arg(long)]
    pub members: Option<usize>,
    /// Sending members, spread over the channels (sender i sends to channel i mod C)
    /// [fanout: 1, capacity: 10, spike: 10].
    #[arg(long)]
    pub senders: Option<usize>,
    /// Bytes of text per message, at least the timestamp's [64].
    #[arg(long)]
    pub text_bytes: Option<usize>,
}

/// A resolved [`ShapeArgs`].
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub channels: usize,
    pub members: usize,
    pub senders: usize,
    pub text_bytes: usize,
}

impl Shape {
    pub const FANOUT: Shape = Shape::new(1, 1000, 1);
    pub const CAPACITY: Shape = Shape::new(100, 1, 10);
    pub const SPIKE: Shape = Shape::new(10, 10, 10);

    const fn new(channels: usize, members: usize, senders: usize) -> Self {
        Self {
            channels,
            members,
            senders,
            text_bytes: 64,
        }
    }
}

impl ShapeArgs {
    /// The flags given, the scenario's defaults for the rest; each count at least 1.
    pub fn or(&self, defaults: Shape) -> Shape {
        Shape {
            channels: self.channels.unwrap_or(defaults.channels).max(1),
            members: self.members.unwrap_or(defaults.members).max(1),
            senders: self.senders.unwrap_or(defaults.senders).max(1),
            text_bytes: self.text_bytes.unwrap_or(defaults.text_bytes),
        }
    }
}

/// A send rate: a number of messages per second, or as fast as acknowledged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Fixed(f64),
    Max,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 => Ok(Rate::Fixed(r)),
            _ => Err(format!(
                "a rate is a positive number of messages/s or `max`, not {s:?}"
            )),
        }
    }
}

/// Time buckets of the throughput series.
const BUCKET: Duration = Duration::from_millis(100);
/// How long receivers may take, after the last ack, to see the last event.
const SETTLE: Duration = Duration::from_secs(30);
/// The most messages one phase sends (the open-loop schedule is planned up front, 16
/// bytes a message).
const MAX_PHASE_MESSAGES: usize = 50_000_000;
/// How often a phase samples the server's CPU and queues.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    emit(&report, &args.run)
}

/// Runs the scenario and returns its report.
pub async fn measure(args: &FanoutArgs) -> anyhow::Result<Report> {
    let shape = args.shape.or(Shape::FANOUT);
    let mut rig = Rig::start(&shape, &args.run).await?;
    let pace = match (args.rate, args.duration) {
        (Rate::Max, _) => Pace::Max {
            count: args.messages.max(1),
            window: args.window.max(1),
        },
        (Rate::Fixed(r), Some(d)) => Pace::Schedule(vec![Pace::lasting(r, d)]),
        (Rate::Fixed(r), None) => Pace::Schedule(vec![(r, args.messages.max(1))]),
    };
    let phase = rig.phase(pace, "sending").await?;
    let end = rig.finish().await?;

    let mut report = Report::new("fanout");
    shape.describe(&mut report);
    report.param("rate", format!("{:?}", args.rate));
    report.param("server", args.run.server());
    phase.describe(&mut report);
    end.describe(&mut report);
    report.passed = report.checks.total() == 0 && phase.answered() == phase.planned;
    Ok(report)
}

impl Shape {
    pub(crate) fn describe(&self, report: &mut Report) {
        report.param("channels", self.channels);
        report.param("members per channel", self.members);
        report.param("senders", self.senders);
        report.param("text bytes", self.text_bytes);
    }
}

/// How a phase sends.
#[derive(Debug, Clone)]
pub(crate) enum Pace {
    /// `count` messages in total, each sender keeping `window` in flight.
    Max { count: usize, window: usize },
    /// Open loop: segments of (total msgs/s, messages), one after the other.
    Schedule(Vec<(f64, usize)>),
}

impl Pace {
    /// A segment at `rate` msgs/s lasting `secs` seconds.
    pub fn lasting(rate: f64, secs: f64) -> (f64, usize) {
        (rate, (rate * secs).round() as usize)
    }

    /// Offsets from the phase's start at which one of `senders` sends (sender `s`
    /// takes every `senders`-th message of the total schedule, so the total rate holds
    /// whatever the count).
    fn times(&self, sender: usize, senders: usize) -> Vec<Duration> {
        let Pace::Schedule(segments) = self else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let (mut at, mut n) = (Duration::ZERO, 0usize);
        for &(rate, count) in segments {
            for i in 0..count {
                if n % senders == sender {
                    out.push(at + Duration::from_secs_f64(i as f64 / rate));
                }
                n += 1;
            }
            at += Duration::from_secs_f64(count as f64 / rate);
        }
        out
    }

    fn planned(&self) -> usize {
        match self {
            Pace::Max { count, .. } => *count,
            Pace::Schedule(segments) => segments.iter().map(|&(_, count)| count).sum(),
        }
    }
}

/// What the controller tells the receivers.
#[derive(Debug, Clone)]
enum Control {
    Running,
    /// Phase `phase` is over once every channel has reached these seqs.
    PhaseEnd {
        phase: u32,
        expected: Arc<HashMap<i64, i64>>,
    },
    /// Close and report.
    Finish,
}

/// One receiver's share of a phase.
struct Share {
    deliveries: u64,
    latency_us: Histogram<u64>,
    last_at: Option<Instant>,
    caught_up: bool,
    /// Drops of the connection by close code (the client library resumes).
    drops: BTreeMap<String, u64>,
}

impl Share {
    fn new() -> Self {
        Self {
            deliveries: 0,
            latency_us: receiver_histogram(),
            last_at: None,
            caught_up: true,
            drops: BTreeMap::new(),
        }
    }
}

/// What one receiver saw over the whole run.
struct Seen {
    violations: Violations,
    per_bucket: Vec<u64>,
    by_second: Timeline,
}

/// Two significant digits: a thousand receivers at 3 digits would cost ~128 MiB.
fn receiver_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// Users, channels and open connections, driven through phases.
pub(crate) struct Rig {
    pub target: Target,
    owner: Api,
    channel_ids: Vec<i64>,
    senders: Vec<Option<Realtime>>,
    control: watch::Sender<Control>,
    shares: mpsc::UnboundedReceiver<Share>,
    receivers: Vec<tokio::task::JoinHandle<anyhow::Result<Seen>>>,
    start: Instant,
    phases: u32,
    pad: String,
    quiet: bool,
    // Accumulated over phases, for the final report.
    acks_per_bucket: Vec<u64>,
    ack_by_second: Timeline,
    samples: Vec<(f64, Sample)>,
}

/// What one phase measured.
pub(crate) struct PhaseResult {
    pub planned: usize,
    pub acked: u64,
    pub errors: BTreeMap<String, u64>,
    pub ack_latency: Histogram<u64>,
    pub deliveries: u64,
    pub deliver_latency: Histogram<u64>,
    /// From the phase's start to its last ack.
    pub send_time: Duration,
    /// From the phase's start to its last delivery.
    pub deliver_time: Duration,
    /// Server CPU seconds over the phase (from its `/metrics`; every node's together).
    pub server_cpu: Option<f64>,
    /// Per `--url` given (when more than one): its CPU seconds and the events it wrote
    /// to WebSockets over the phase, where its `/metrics` told.
    pub nodes: Vec<(String, Option<f64>, Option<f64>)>,
    /// Receivers that did not see the phase's last events within the settle time.
    pub lagging: usize,
    pub drops: BTreeMap<String, u64>,
    /// The phase's start, in seconds since the rig's.
    pub started_at: f64,
}

impl PhaseResult {
    pub fn answered(&self) -> usize {
        self.acked as usize + self.errors.values().sum::<u64>() as usize
    }

    pub fn acked_rate(&self) -> f64 {
        self.acked as f64 / self.send_time.as_secs_f64().max(1e-6)
    }

    pub fn delivery_rate(&self) -> f64 {
        self.deliveries as f64 / self.deliver_time.as_secs_f64().max(1e-6)
    }

    pub fn error_ratio(&self) -> f64 {
        self.errors.values().sum::<u64>() as f64 / self.planned.max(1) as f64
    }

    fn p99_ms(h: &Histogram<u64>) -> f64 {
        h.value_at_quantile(0.99) as f64 / 1000.0
    }

    pub fn ack_p99_ms(&self) -> f64 {
        Self::p99_ms(&self.ack_latency)
    }

    pub fn deliver_p99_ms(&self) -> f64 {
        Self::p99_ms(&self.deliver_latency)
    }

    /// Adds this phase's figures, latencies and errors to a report.
    pub fn describe(&self, report: &mut Report) {
        report.figure("messages acked", self.acked as f64, "");
        report.figure("acked msgs/s", self.acked_rate(), "1/s");
        report.figure("deliveries", self.deliveries as f64, "");
        report.figure("deliveries/s", self.delivery_rate(), "1/s");
        if let Some(cpu) = self.server_cpu {
            report.figure("server CPU", cpu, "s");
            if self.deliveries > 0 {
                report.figure(
                    "server CPU per million deliveries",
                    cpu * 1e6 / self.deliveries as f64,
                    "s",
                );
            }
        }
        if self.lagging > 0 {
            report.figure("receivers that never caught up", self.lagging as f64, "");
        }
        if !self.nodes.is_empty() {
            report.tables.push(Table {
                title: "per node".into(),
                columns: [
                    "node",
                    "CPU s",
                    "deliveries",
                    "CPU s per million deliveries",
                ]
                .map(String::from)
                .to_vec(),
                rows: self
                    .nodes
                    .iter()
                    .map(|(node, cpu, delivered)| {
                        let show = |v: Option<f64>, f: &dyn Fn(f64) -> String| {
                            v.map_or_else(|| "-".to_owned(), f)
                        };
                        vec![
                            node.clone(),
                            show(*cpu, &|c| format!("{c:.2}")),
                            show(*delivered, &|d| format!("{d:.0}")),
                            match (cpu, delivered) {
                                (Some(c), Some(d)) if *d > 0.0 => format!("{:.2}", c * 1e6 / d),
                                _ => "-".into(),
                            },
                        ]
                    })
                    .collect(),
            });
        }
        report
            .latencies
            .push(Latency::from_micros("ack", &self.ack_latency));
        report
            .latencies
            .push(Latency::from_micros("send→deliver", &self.deliver_latency));
        for (code, n) in &self.errors {
            *report.errors.entry(code.clone()).or_default() += n;
        }
        for (code, n) in &self.drops {
            *report
                .errors
                .entry(format!("receiver dropped ({code})"))
                .or_default() += n;
        }
    }
}

/// The whole run's series and checks, once the rig has finished.
pub(crate) struct End {
    pub checks: Violations,
    pub deliveries_per_bucket: Vec<u64>,
    pub acks_per_bucket: Vec<u64>,
    pub deliver_by_second: Timeline,
    pub ack_by_second: Timeline,
    pub samples: Vec<(f64, Sample)>,
}

impl End {
    /// Adds the checks and the over-time series to a report.
    pub fn describe(&self, report: &mut Report) {
        report.checks.merge(&self.checks);
        let per_second = |b: &[u64]| -> Vec<(f64, f64)> {
            b.iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        i as f64 * BUCKET.as_secs_f64(),
                        *n as f64 / BUCKET.as_secs_f64(),
                    )
                })
                .collect()
        };
        let mut push = |name: &str, unit: &str, points: Vec<(f64, f64)>| {
            report.series.push(Series {
                name: name.into(),
                unit: unit.into(),
                points,
            });
        };
        push("deliveries", "1/s", per_second(&self.deliveries_per_bucket));
        push("acks", "1/s", per_second(&self.acks_per_bucket));
        push(
            "send→deliver p99 (per second of send time)",
            "ms",
            self.deliver_by_second.quantile_ms(0.99),
        );
        push(
            "ack p99 (per second of send time)",
            "ms",
            self.ack_by_second.quantile_ms(0.99),
        );
        let cpu: Vec<(f64, f64)> = self
            .samples
            .windows(2)
            .filter_map(|w| {
                let (t0, a) = w[0];
                let (t1, b) = w[1];
                Some((t1, (b.cpu_seconds? - a.cpu_seconds?) / (t1 - t0).max(1e-6)))
            })
            .collect();
        if !cpu.is_empty() {
            push("server CPU", "cores", cpu);
        }
        let queued: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|(t, s)| Some((*t, s.buffered_bytes? / 1024.0)))
            .collect();
        if !queued.is_empty() {
            push("server WebSocket queues", "KiB", queued);
        }
    }
}

impl Rig {
    /// Registers the users, creates the channels and connects everyone.
    pub async fn start(shape: &Shape, run: &RunArgs) -> anyhow::Result<Self> {
        let target = Target::start(run, None).await?;
        let base = target.base.clone();
        let Shape {
            channels,
            members,
            senders,
            ..
        } = *shape;

        let receivers = register(&base, channels * members, "r", run.quiet).await?;
        let sending = register(&base, senders, "s", run.quiet).await?;
        let owner = sending[0].0.clone();
        let mut channel_ids = Vec::with_capacity(channels);
        for c in 0..channels {
            let mut ids: Vec<i64> = receivers[c * members..(c + 1) * members]
                .iter()
                .map(|r| r.1)
                .collect();
            ids.extend(
                sending
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| s % channels == c)
                    .map(|(_, s)| s.1),
            );
            ids.retain(|&id| id != sending[0].1);
            // A channel takes at most 1000 initial members; the rest are added one by one.
            let (initial, later) = ids.split_at(ids.len().min(999));
            let channel = owner
                .create_channel(&format!("fanout{c}"), "group", initial)
                .await?;
            for &user in later {
                owner.add_member(channel, user).await?;
            }
            channel_ids.push(channel);
        }

        let bar = progress(
            run.quiet,
            (receivers.len() + senders) as u64,
            "connecting WebSockets",
        );
        let start = Instant::now();
        let (control, control_rx) = watch::channel(Control::Running);
        let (share_tx, shares) = mpsc::unbounded_channel();
        let mut receiving = Vec::with_capacity(receivers.len());
        // Clients are spread over the given nodes in turn (registered on the first: the
        // nodes of a cluster share their accounts).
        let on_node = |api: &Api, n: usize| {
            let node = &target.bases[n % target.bases.len()];
            Api::new(node).with_token(api.token().unwrap_or_default())
        };
        for (n, (api, _)) in receivers.iter().enumerate() {
            let (rt, ready) = Realtime::connect(&on_node(api, n), HashMap::new())
                .await
                .with_context(|| format!("connect receiver {n}"))?;
            let mut checker = Checker::new(format!("receiver {n}"));
            if let Frame::Ready { channels, .. } = &ready {
                for &(c, last) in channels {
                    checker.start(c, last);
                }
            }
            receiving.push(tokio::spawn(receive(
                rt,
                checker,
                start,
                control_rx.clone(),
                share_tx.clone(),
            )));
            bar.inc(1);
        }
        let mut sender_sockets = Vec::with_capacity(senders);
        for (s, (api, _)) in sending.iter().enumerate() {
            let (rt, _) = Realtime::connect(&on_node(api, s), HashMap::new())
                .await
                .with_context(|| format!("connect sender {s}"))?;
            sender_sockets.push(Some(rt));
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(Self {
            target,
            owner,
            channel_ids,
            senders: sender_sockets,
            control,
            shares,
            receivers: receiving,
            start,
            phases: 0,
            pad: "x".repeat(shape.text_bytes.saturating_sub(24)),
            quiet: run.quiet,
            acks_per_bucket: Vec::new(),
            ack_by_second: Timeline::default(),
            samples: Vec::new(),
        })
    }

    /// Seconds since the rig started.
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Sends as `pace` says, waits for every answer and for every receiver to see the
    /// phase's last events, and reports what it measured.
    pub async fn phase(&mut self, pace: Pace, label: &str) -> anyhow::Result<PhaseResult> {
        let phase = self.phases;
        self.phases += 1;
        let planned = pace.planned();
        if planned == 0 {
            anyhow::bail!("nothing to send: the rate times the duration is under one message");
        }
        if planned > MAX_PHASE_MESSAGES {
            anyhow::bail!(
                "a phase of {planned} messages is past the bench's limit of {MAX_PHASE_MESSAGES}: lower the rate, the duration or --messages"
            );
        }
        let senders = self.senders.len();
        let answered = Arc::new(AtomicU64::new(0));
        let bar = progress(self.quiet, planned as u64, label);
        let nodes_before = self.target.sample_nodes().await;
        let before = Sample::sum(&nodes_before);
        self.samples.push((self.now(), before));
        // Phases start on a whole second of the rig's clock, so the per-second latency
        // timelines split exactly where a phase (or a spike's part) begins.
        let started_at = self.now().floor() + 1.0;
        let phase_start = self.start + Duration::from_secs_f64(started_at);
        tokio::time::sleep_until(phase_start.into()).await;
        let mut tasks = Vec::with_capacity(senders);
        for s in 0..senders {
            let rt = self.senders[s].take().context("a sender lost its socket")?;
            let plan = SendPlan {
                client_prefix: format!("p{phase}s{s}-"),
                channel: self.channel_ids[s % self.channel_ids.len()],
                times: pace.times(s, senders),
                count: match &pace {
                    Pace::Max { count, .. } => count / senders + usize::from(s < count % senders),
                    Pace::Schedule(_) => 0,
                },
                window: match &pace {
                    Pace::Max { window, .. } => *window,
                    Pace::Schedule(_) => usize::MAX,
                },
                pad: self.pad.clone(),
                answered: answered.clone(),
            };
            tasks.push(tokio::spawn(send(rt, plan, self.start, phase_start)));
        }
        let all_sent = futures_util::future::join_all(tasks);
        tokio::pin!(all_sent);
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        let results = loop {
            tokio::select! {
                results = &mut all_sent => break results,
                _ = tick.tick() => {
                    bar.set_position(answered.load(Ordering::Relaxed));
                    let sample = self.target.sample().await;
                    self.samples.push((self.now(), sample));
                }
            }
        };
        bar.finish_and_clear();
        let mut result = PhaseResult {
            planned,
            acked: 0,
            errors: BTreeMap::new(),
            ack_latency: histogram(),
            deliveries: 0,
            deliver_latency: histogram(),
            send_time: Duration::ZERO,
            deliver_time: Duration::ZERO,
            server_cpu: None,
            nodes: Vec::new(),
            lagging: 0,
            drops: BTreeMap::new(),
            started_at,
        };
        for (s, r) in results.into_iter().enumerate() {
            let (rt, sent) = r.context("a sender task")??;
            self.senders[s] = Some(rt);
            result.acked += sent.acked;
            result.ack_latency.add(&sent.latency_us)?;
            for (code, n) in sent.errors {
                *result.errors.entry(code).or_default() += n;
            }
            merge(&mut self.acks_per_bucket, &sent.per_bucket);
            self.ack_by_second.add(&sent.by_second);
            if let Some(last) = sent.last_at {
                result.send_time = result.send_time.max(last.duration_since(phase_start));
            }
        }

        let mut expected = HashMap::new();
        for &c in &self.channel_ids {
            let v = self
                .owner
                .call(reqwest::Method::GET, &format!("/v1/channels/{c}"), None)
                .await?;
            expected.insert(c, v["last_seq"].as_i64().unwrap_or(0));
        }
        let _ = self.control.send(Control::PhaseEnd {
            phase,
            expected: Arc::new(expected),
        });
        let waiting = progress(
            self.quiet,
            self.receivers.len() as u64,
            "waiting for deliveries",
        );
        for _ in 0..self.receivers.len() {
            let share = self.next_share().await?;
            result.deliveries += share.deliveries;
            result.deliver_latency.add(&share.latency_us)?;
            if let Some(last) = share.last_at {
                result.deliver_time = result.deliver_time.max(last.duration_since(phase_start));
            }
            result.lagging += usize::from(!share.caught_up);
            for (code, n) in share.drops {
                *result.drops.entry(code).or_default() += n;
            }
            waiting.inc(1);
        }
        waiting.finish_and_clear();
        let nodes_after = self.target.sample_nodes().await;
        let after = Sample::sum(&nodes_after);
        self.samples.push((self.now(), after));
        result.server_cpu = match (before.cpu_seconds, after.cpu_seconds) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        if self.target.bases.len() > 1 {
            let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
            result.nodes = self
                .target
                .bases
                .iter()
                .zip(nodes_before.iter().zip(&nodes_after))
                .map(|(node, (a, b))| {
                    (
                        node.clone(),
                        delta(a.cpu_seconds, b.cpu_seconds),
                        delta(a.delivered, b.delivered),
                    )
                })
                .collect();
        }
        Ok(result)
    }

    /// The next receiver's share of the phase. A receiver that failed (its connection
    /// could not be resumed) fails the phase with its own error.
    async fn next_share(&mut self) -> anyhow::Result<Share> {
        let deadline = tokio::time::Instant::now() + SETTLE + Duration::from_secs(10);
        loop {
            let wait = tokio::time::timeout(Duration::from_secs(1), self.shares.recv()).await;
            if let Ok(share) = wait {
                return share.context("every receiver ended");
            }
            if let Some(i) = self.receivers.iter().position(|h| h.is_finished()) {
                let failed = self.receivers.swap_remove(i).await;
                return Err(match failed {
                    Ok(Err(e)) => e.context("a receiver failed"),
                    Ok(Ok(_)) => anyhow::anyhow!("a receiver ended before the phase did"),
                    Err(e) => anyhow::Error::new(e).context("a receiver task panicked"),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("receivers did not report within the settle time");
            }
        }
    }

    /// Closes every connection, collects the checks and series, and stops the server.
    pub async fn finish(mut self) -> anyhow::Result<End> {
        let _ = self.control.send(Control::Finish);
        let mut end = End {
            checks: Violations::default(),
            deliveries_per_bucket: Vec::new(),
            acks_per_bucket: std::mem::take(&mut self.acks_per_bucket),
            deliver_by_second: Timeline::default(),
            ack_by_second: std::mem::take(&mut self.ack_by_second),
            samples: std::mem::take(&mut self.samples),
        };
        for r in self.receivers.drain(..) {
            let seen = r.await??;
            end.checks.merge(&seen.violations);
            merge(&mut end.deliveries_per_bucket, &seen.per_bucket);
            end.deliver_by_second.add(&seen.by_second);
        }
        for rt in self.senders.drain(..).flatten() {
            rt.close().await;
        }
        self.target.stop().await?;
        Ok(end)
    }
}

/// A progress bar on stderr: drawn only on a terminal, never with `--quiet`.
pub(crate) fn progress(quiet: bool, len: u64, label: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg:<24} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_owned());
    bar
}

fn bucket_of(start: Instant, at: Instant) -> usize {
    (at.duration_since(start).as_millis() / BUCKET.as_millis()) as usize
}

fn count_in(buckets: &mut Vec<u64>, i: usize) {
    if buckets.len() <= i {
        buckets.resize(i + 1, 0);
    }
    buckets[i] += 1;
}

fn merge(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Registers `n` users (32 at a time) on one shared HTTP client.
async fn register(
    base: &str,
    n: usize,
    role: &str,
    quiet: bool,
) -> anyhow::Result<Vec<(Api, i64)>> {
    let bar = progress(quiet, n as u64, "registering users");
    let prefix = format!("{}-{role}", bench_username());
    let api = Api::new(base);
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let signups = chunk.iter().map(|i| {
            let (mut api, name) = (api.clone(), format!("{prefix}{i}"));
            async move {
                // A server bounds the password hashes it runs at once: a busy answer is
                // retried after a pause, a bounded number of times.
                let mut tries = 0;
                let id = loop {
                    match api.register(&name, "bench-password").await {
                        Err(crate::client::ClientError::Api { status: 503, .. }) if tries < 100 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => break other?,
                    }
                };
                anyhow::Ok((api, id))
            }
        });
        for r in futures_util::future::join_all(signups).await {
            out.push(r.context("register a bench user")?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

struct SendPlan {
    client_prefix: String,
    channel: i64,
    /// Open loop: when to send each message, from the phase's start.
    times: Vec<Duration>,
    /// Closed loop: how many to send, `window` in flight.
    count: usize,
    window: usize,
    pad: String,
    answered: Arc<AtomicU64>,
}

/// What one sender saw in a phase.
struct Sent {
    acked: u64,
    errors: HashMap<String, u64>,
    latency_us: Histogram<u64>,
    per_bucket: Vec<u64>,
    by_second: Timeline,
    last_at: Option<Instant>,
}

/// Sends one phase's messages: on a schedule (open loop) or with a window in flight.
/// Returns the socket for the next phase.
async fn send(
    mut rt: Realtime,
    plan: SendPlan,
    start: Instant,
    phase_start: Instant,
) -> anyhow::Result<(Realtime, Sent)> {
    let mut sent = Sent {
        acked: 0,
        errors: HashMap::new(),
        latency_us: histogram(),
        per_bucket: Vec::new(),
        by_second: Timeline::default(),
        last_at: None,
    };
    let open_loop = !plan.times.is_empty();
    let total = if open_loop {
        plan.times.len()
    } else {
        plan.count
    };
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut next = 0usize;
    let answered = |s: &Sent| s.acked as usize + s.errors.values().sum::<u64>() as usize;
    while answered(&sent) < total {
        // Send everything due now (a sleep, even to a time already past, costs a timer
        // tick of ~1 ms), in bursts of at most 64 so answers are read in between.
        let now = Instant::now();
        for _ in 0..64 {
            let due_at = match plan.times.get(next) {
                Some(&t) => phase_start + t,
                None if !open_loop && next < total => now,
                None => break,
            };
            if due_at > now || (!open_loop && next - answered(&sent) >= plan.window) {
                break;
            }
            let client_id = format!("{}{next}", plan.client_prefix);
            // The text carries the scheduled time, from which receivers measure.
            let text = format!("t{} {}", due_at.duration_since(start).as_micros(), plan.pad);
            rt.send(plan.channel, &text, &client_id).await?;
            due.insert(client_id, due_at);
            next += 1;
        }
        let wake = plan.times.get(next).map(|&t| phase_start + t);
        // Behind schedule: read what has arrived, then go straight back to sending.
        let overdue = wake.is_some_and(|w| w <= Instant::now());
        tokio::select! {
            biased;
            incoming = tokio::time::timeout(SETTLE, rt.next()) => {
                let now = Instant::now();
                match incoming.context("no answer from the server within 30 s")?? {
                    Incoming::Frame(Frame::Ack { client_id, .. }) => {
                        if let Some(at) = due.remove(&client_id) {
                            sent.acked += 1;
                            let us = (now - at).as_micros().max(1) as u64;
                            let _ = sent.latency_us.record(us);
                            sent.by_second.record(at.duration_since(start).as_secs() as usize, us);
                            count_in(&mut sent.per_bucket, bucket_of(start, now));
                            sent.last_at = Some(now);
                            plan.answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Incoming::Frame(Frame::Error { client_id: Some(c), code, .. })
                        if due.remove(&c).is_some() =>
                    {
                        *sent.errors.entry(code).or_default() += 1;
                        sent.last_at = Some(now);
                        plan.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    // The client library reconnects, resumes and resends what is unanswered.
                    _ => {}
                }
            }
            () = std::future::ready(()), if overdue => {}
            () = tokio::time::sleep_until(wake.unwrap_or(now).into()), if wake.is_some() && !overdue => {}
        }
    }
    Ok((rt, sent))
}

/// Reads one member's stream through the checker for the whole run, handing the
/// controller its share of each phase once it has seen that phase's last events.
async fn receive(
    mut rt: Realtime,
    mut checker: Checker,
    start: Instant,
    mut control: watch::Receiver<Control>,
    shares: mpsc::UnboundedSender<Share>,
) -> anyhow::Result<Seen> {
    let mut share = Share::new();
    let mut per_bucket = Vec::new();
    let mut by_second = Timeline::default();
    let mut phase = 0u32;
    let mut last_expected: Arc<HashMap<i64, i64>> = Arc::default();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let now_control = control.borrow().clone();
        match now_control {
            Control::Finish => break,
            Control::PhaseEnd {
                phase: p,
                ref expected,
            } if p == phase => {
                last_expected = expected.clone();
                let reached = expected
                    .iter()
                    .all(|(c, last)| checker.position(*c).is_none_or(|p| p >= *last));
                let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                if reached || timed_out {
                    share.caught_up = reached;
                    let done = std::mem::replace(&mut share, Share::new());
                    if shares.send(done).is_err() {
                        break;
                    }
                    phase += 1;
                    deadline = None;
                    continue;
                }
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
            }
            _ => {}
        }
        let until =
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(until) => {}
            incoming = rt.next() => match incoming? {
                Incoming::Frame(Frame::Event(e)) => {
                    checker.observe(e.channel_id, e.seq);
                    if let Some(m) = e.message.filter(|_| e.kind == "message.created") {
                        let now = Instant::now();
                        share.deliveries += 1;
                        share.last_at = Some(now);
                        count_in(&mut per_bucket, bucket_of(start, now));
                        let sent = m.text.split(' ').next().and_then(|t| t.strip_prefix('t')).and_then(|t| t.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            let at = now.duration_since(start).as_micros() as u64;
                            let us = at.saturating_sub(sent).max(1);
                            let _ = share.latency_us.record(us);
                            by_second.record((sent / 1_000_000) as usize, us);
                        }
                    }
                }
                Incoming::Dropped { code } => {
                    let code = code.map_or_else(|| "no close frame".to_owned(), |c| c.to_string());
                    *share.drops.entry(code).or_default() += 1;
                }
                _ => {}
            },
        }
    }
    rt.close().await;
    Ok(Seen {
        violations: checker.finish(&last_expected),
        per_bucket,
        by_second,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_splits_over_senders_at_the_total_rate() {
        // 100/s for 1 s, then 1000/s for 0.5 s: 600 messages.
        let pace = Pace::Schedule(vec![Pace::lasting(100.0, 1.0), Pace::lasting(1000.0, 0.5)]);
        assert_eq!(pace.planned(), 600);
        let shares: Vec<Vec<Duration>> = (0..3).map(|s| pace.times(s, 3)).collect();
        assert_eq!(shares.iter().map(Vec::len).sum::<usize>(), 600);
        let mut all: Vec<Duration> = shares.concat();
        all.sort();
        assert_eq!(all[0], Duration::ZERO);
        assert_eq!(
            all[99],
            Duration::from_millis(990),
            "the first segment's last"
        );
        assert_eq!(
            all[100],
            Duration::from_secs(1),
            "the second starts on time"
        );
        assert!(all[599] < Duration::from_millis(1500));
        for share in &shares {
            assert!(
                share.windows(2).all(|w| w[0] < w[1]),
                "each sender in order"
            );
        }
        assert!(
            Pace::Max {
                count: 7,
                window: 2
            }
            .times(0, 1)
            .is_empty()
        );
    }

    #[test]
    fn unset_shape_flags_take_the_scenario_defaults() {
        let given = ShapeArgs {
            members: Some(0),
            senders: Some(4),
            ..ShapeArgs::default()
        };
        let s = given.or(Shape::CAPACITY);
        assert_eq!(
            (s.channels, s.members, s.senders, s.text_bytes),
            (100, 1, 4, 64)
        );
    }
}
