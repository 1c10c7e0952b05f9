//! `natter bench fanout`: C channels with M members each online over WebSockets, and S
//! senders (each a member of one channel) sending at a fixed total rate (open loop:
//! latency counts from each message's scheduled send time, so a stalled server cannot
//! hide its delay) or as fast as the server acknowledges (`--rate max`, a window of sends
//! in flight per sender). Every receiving connection runs the delivery [`Checker`]; any
//! missing, duplicate or reordered event fails the run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::sync::watch;

use super::check::{Checker, Violations};
use super::report::{Latency, Report, Series};
use super::{RunArgs, Target, bench_username, emit, histogram};
use crate::client::{Api, Frame, Incoming, Realtime};

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Receiving members online per channel, each on its own WebSocket.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Sending members, spread over the channels (sender i sends to channel i mod C).
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
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
    /// Bytes of text per message (at least the timestamp's).
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
    #[command(flatten)]
    pub run: RunArgs,
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

pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    emit(&report, &args.run)
}

/// What one receiver saw.
struct Received {
    deliveries: u64,
    latency_us: Histogram<u64>,
    per_bucket: Vec<u64>,
    last_at: Instant,
    violations: Violations,
}

/// What one sender saw.
struct Sent {
    acked: u64,
    errors: HashMap<String, u64>,
    latency_us: Histogram<u64>,
    per_bucket: Vec<u64>,
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

/// Runs the scenario and returns its report.
pub async fn measure(args: &FanoutArgs) -> anyhow::Result<Report> {
    let target = Target::start(args.run.url.as_deref(), None).await?;
    let base = target.base.clone();
    let channels = args.channels.max(1);
    let members = args.members.max(1);
    let senders = args.senders.max(1);
    let messages = match (args.rate, args.duration) {
        (Rate::Fixed(r), Some(d)) => (r * d).round().max(1.0) as usize,
        _ => args.messages.max(1),
    };

    let receivers = register(&base, channels * members, "r").await?;
    let sending = register(&base, senders, "s").await?;
    let owner = &sending[0].0;
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

    eprintln!("connecting {} WebSockets…", receivers.len() + senders);
    let start = Instant::now();
    let (expect_tx, expect_rx) = watch::channel::<Option<HashMap<i64, i64>>>(None);
    let mut receiving = Vec::with_capacity(receivers.len());
    for (n, (api, _)) in receivers.iter().enumerate() {
        let (rt, ready) = Realtime::connect(api, HashMap::new())
            .await
            .with_context(|| format!("connect receiver {n}"))?;
        let mut checker = Checker::new(format!("receiver {n}"));
        if let Frame::Ready { channels, .. } = &ready {
            for &(c, last) in channels {
                checker.start(c, last);
            }
        }
        receiving.push(tokio::spawn(receive(rt, checker, start, expect_rx.clone())));
    }
    let per_sender = |s: usize| messages / senders + usize::from(s < messages % senders);
    let mut sending_tasks = Vec::with_capacity(senders);
    for (s, (api, _)) in sending.iter().enumerate() {
        let (rt, _) = Realtime::connect(api, HashMap::new())
            .await
            .with_context(|| format!("connect sender {s}"))?;
        let plan = SendPlan {
            sender: s,
            channel: channel_ids[s % channels],
            count: per_sender(s),
            rate: match args.rate {
                Rate::Fixed(r) => Rate::Fixed(r / senders as f64),
                Rate::Max => Rate::Max,
            },
            window: args.window.max(1),
            pad: "x".repeat(args.text_bytes.saturating_sub(24)),
        };
        sending_tasks.push(tokio::spawn(send(rt, plan, start)));
    }

    eprintln!("sending {messages} messages…");
    let send_start = Instant::now();
    let mut report = Report::new("fanout");
    let mut ack_latency = histogram();
    let mut acks_series = Vec::new();
    let mut acked = 0;
    for t in sending_tasks {
        let sent = t.await??;
        acked += sent.acked;
        ack_latency.add(&sent.latency_us)?;
        for (code, n) in sent.errors {
            *report.errors.entry(code).or_default() += n;
        }
        merge(&mut acks_series, &sent.per_bucket);
    }
    let sent_in = send_start.elapsed();
    let mut expected = HashMap::new();
    for &c in &channel_ids {
        let v = owner
            .call(reqwest::Method::GET, &format!("/v1/channels/{c}"), None)
            .await?;
        expected.insert(c, v["last_seq"].as_i64().unwrap_or(0));
    }
    let _ = expect_tx.send(Some(expected));

    let mut deliver_latency = histogram();
    let mut deliveries_series = Vec::new();
    let (mut deliveries, mut last) = (0u64, send_start);
    for r in receiving {
        let r = r.await??;
        deliveries += r.deliveries;
        deliver_latency.add(&r.latency_us)?;
        merge(&mut deliveries_series, &r.per_bucket);
        report.checks.merge(&r.violations);
        last = last.max(r.last_at);
    }
    let deliver_in = last
        .duration_since(send_start)
        .max(Duration::from_micros(1));

    for (k, v) in [
        ("channels", channels.to_string()),
        ("members per channel", members.to_string()),
        ("senders", senders.to_string()),
        ("messages", messages.to_string()),
        ("rate", format!("{:?}", args.rate)),
        ("text bytes", args.text_bytes.to_string()),
        (
            "server",
            args.run
                .url
                .clone()
                .unwrap_or_else(|| "spawned in process".into()),
        ),
    ] {
        report.param(k, v);
    }
    report.figure("messages acked", acked as f64, "");
    report.figure("acked msgs/s", acked as f64 / sent_in.as_secs_f64(), "1/s");
    report.figure("deliveries", deliveries as f64, "");
    report.figure(
        "deliveries/s",
        deliveries as f64 / deliver_in.as_secs_f64(),
        "1/s",
    );
    report
        .latencies
        .push(Latency::from_micros("ack", &ack_latency));
    report
        .latencies
        .push(Latency::from_micros("send→deliver", &deliver_latency));
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
    report.series.push(Series {
        name: "deliveries".into(),
        unit: "1/s".into(),
        points: per_second(&deliveries_series),
    });
    report.series.push(Series {
        name: "acks".into(),
        unit: "1/s".into(),
        points: per_second(&acks_series),
    });
    report.passed = report.checks.total() == 0
        && acked as usize + report.errors.values().sum::<u64>() as usize == messages;
    target.stop().await?;
    Ok(report)
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
async fn register(base: &str, n: usize, role: &str) -> anyhow::Result<Vec<(Api, i64)>> {
    eprintln!("registering {n} users…");
    let prefix = format!("{}-{role}", bench_username());
    let api = Api::new(base);
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let signups = chunk.iter().map(|i| {
            let (mut api, name) = (api.clone(), format!("{prefix}{i}"));
            async move {
                let id = api.register(&name, "bench-password").await?;
                anyhow::Ok((api, id))
            }
        });
        for r in futures_util::future::join_all(signups).await {
            out.push(r.context("register a bench user")?);
        }
    }
    Ok(out)
}

struct SendPlan {
    sender: usize,
    channel: i64,
    count: usize,
    rate: Rate,
    window: usize,
    pad: String,
}

/// Sends `plan.count` messages: on a schedule (open loop) or with a window in flight.
async fn send(mut rt: Realtime, plan: SendPlan, start: Instant) -> anyhow::Result<Sent> {
    let mut sent = Sent {
        acked: 0,
        errors: HashMap::new(),
        latency_us: histogram(),
        per_bucket: Vec::new(),
    };
    let mut due: HashMap<String, Instant> = HashMap::new();
    let t0 = Instant::now();
    let mut next = 0usize;
    let answered = |s: &Sent| s.acked as usize + s.errors.values().sum::<u64>() as usize;
    while answered(&sent) < plan.count {
        let scheduled = match plan.rate {
            Rate::Fixed(r) => t0 + Duration::from_secs_f64(next as f64 / r),
            Rate::Max => Instant::now(),
        };
        let may_send =
            next < plan.count && (plan.rate != Rate::Max || next - answered(&sent) < plan.window);
        tokio::select! {
            () = tokio::time::sleep_until(scheduled.into()), if may_send => {
                let client_id = format!("s{}-{next}", plan.sender);
                // The text carries the scheduled time, from which receivers measure.
                let text = format!("t{} {}", scheduled.duration_since(start).as_micros(), plan.pad);
                rt.send(plan.channel, &text, &client_id).await?;
                due.insert(client_id, scheduled);
                next += 1;
            }
            incoming = tokio::time::timeout(SETTLE, rt.next()) => {
                let now = Instant::now();
                match incoming.context("no answer from the server within 30 s")?? {
                    Incoming::Frame(Frame::Ack { client_id, .. }) => {
                        if let Some(at) = due.remove(&client_id) {
                            sent.acked += 1;
                            let _ = sent.latency_us.record((now - at).as_micros().max(1) as u64);
                            count_in(&mut sent.per_bucket, bucket_of(start, now));
                        }
                    }
                    Incoming::Frame(Frame::Error { client_id: Some(c), code, .. })
                        if due.remove(&c).is_some() =>
                    {
                        *sent.errors.entry(code).or_default() += 1;
                    }
                    // The client library reconnects, resumes and resends what is unanswered.
                    _ => {}
                }
            }
        }
    }
    rt.close().await;
    Ok(sent)
}

/// Reads one member's stream through the checker until it has seen every channel's last
/// seq (once the senders are done and the expectation is known).
async fn receive(
    mut rt: Realtime,
    mut checker: Checker,
    start: Instant,
    mut expect: watch::Receiver<Option<HashMap<i64, i64>>>,
) -> anyhow::Result<Received> {
    let mut r = Received {
        deliveries: 0,
        latency_us: histogram(),
        per_bucket: Vec::new(),
        last_at: Instant::now(),
        violations: Violations::default(),
    };
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if let Some(expected) = expect.borrow().as_ref()
            && expected
                .iter()
                .all(|(c, last)| checker.position(*c).is_none_or(|p| p >= *last))
        {
            break;
        }
        let until =
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = expect.changed() => {
                if changed.is_ok() {
                    deadline = Some(tokio::time::Instant::now() + SETTLE);
                }
            }
            () = tokio::time::sleep_until(until) => break,
            incoming = rt.next() => match incoming? {
                Incoming::Frame(Frame::Event(e)) => {
                    checker.observe(e.channel_id, e.seq);
                    if let Some(m) = e.message.filter(|_| e.kind == "message.created") {
                        let now = Instant::now();
                        r.deliveries += 1;
                        r.last_at = now;
                        count_in(&mut r.per_bucket, bucket_of(start, now));
                        let sent = m.text.split(' ').next().and_then(|t| t.strip_prefix('t')).and_then(|t| t.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            let at = now.duration_since(start).as_micros() as u64;
                            let _ = r.latency_us.record(at.saturating_sub(sent).max(1));
                        }
                    }
                }
                Incoming::Dropped { code } => bail!("a receiver was dropped ({code:?})"),
                _ => {}
            },
        }
    }
    let expected = expect.borrow().clone().unwrap_or_default();
    rt.close().await;
    r.violations = checker.finish(&expected);
    Ok(r)
}
