//! `natter bench history`: R readers paging through one channel's history (newest first,
//! `before_seq` cursors) while nothing else runs. Each full pass is checked: every message
//! once, none missing, pages in order. Measures pages/s and page latency.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use super::check::Violations;
use super::report::{Latency, Report, Series};
use super::{RunArgs, Target, bench_username, emit, histogram};
use crate::client::Api;

#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// Messages in the channel.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Concurrent readers.
    #[arg(long, default_value_t = 32)]
    pub readers: usize,
    /// Messages per page (1–200).
    #[arg(long, default_value_t = 50)]
    pub page: usize,
    /// How long the readers read, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn run(args: HistoryArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    emit(&report, &args.run)
}

struct Read {
    pages: u64,
    passes: u64,
    latency_us: Histogram<u64>,
    /// Pages read per [`bucket`] of the run.
    per_bucket: Vec<u64>,
    errors: BTreeMap<String, u64>,
    violations: Violations,
}

/// The width of the pages/s series' buckets: a second, or a tenth of one for runs under
/// ten seconds, so that a short run still has points enough for a line.
fn bucket(duration: f64) -> Duration {
    if duration < 10.0 {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    }
}

pub async fn measure(args: &HistoryArgs) -> anyhow::Result<Report> {
    let target = Target::start(&args.run, None).await?;
    let base = target.base.clone();
    let page = args.page.clamp(1, 200);
    let mut owner = Api::new(&base);
    owner.register(&bench_username(), "bench-password").await?;
    let channel = owner.create_channel("history", "group", &[]).await?;
    let bar = super::fanout::progress(args.run.quiet, args.messages as u64, "writing messages");
    let mut first_seq = None;
    for chunk in (0..args.messages).collect::<Vec<_>>().chunks(64) {
        let sends = chunk.iter().map(|i| {
            let owner = &owner;
            async move {
                owner
                    .send(channel, &format!("history {i}"), Some(&format!("h{i}")))
                    .await
            }
        });
        for (i, m) in chunk
            .iter()
            .zip(futures_util::future::join_all(sends).await)
        {
            let m = m.with_context(|| format!("write message {i}"))?;
            first_seq.get_or_insert(m.seq);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let v = owner
        .call(
            reqwest::Method::GET,
            &format!("/v1/channels/{channel}"),
            None,
        )
        .await?;
    let last_seq = v["last_seq"].as_i64().unwrap_or(0);

    if !args.run.quiet {
        eprintln!("{} readers paging for {} s…", args.readers, args.duration);
    }
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(args.duration.max(0.1));
    let bucket = bucket(args.duration);
    let readers = (0..args.readers.max(1)).map(|_| {
        read(
            owner.clone(),
            channel,
            page,
            args.messages,
            until,
            start,
            bucket,
        )
    });
    let mut report = Report::new("history");
    let mut latency = histogram();
    let (mut pages, mut passes, mut series) = (0u64, 0u64, Vec::<u64>::new());
    for r in futures_util::future::join_all(readers).await {
        let r = r?;
        pages += r.pages;
        passes += r.passes;
        latency.add(&r.latency_us)?;
        if series.len() < r.per_bucket.len() {
            series.resize(r.per_bucket.len(), 0);
        }
        for (a, b) in series.iter_mut().zip(&r.per_bucket) {
            *a += b;
        }
        for (code, n) in r.errors {
            *report.errors.entry(code).or_default() += n;
        }
        report.checks.merge(&r.violations);
    }
    let elapsed = start.elapsed().as_secs_f64();
    report.param("messages", args.messages);
    report.param("readers", args.readers);
    report.param("page", page);
    report.param("duration s", args.duration);
    report.param("seqs", format!("{}..={last_seq}", first_seq.unwrap_or(0)));
    report.param("server", args.run.server());
    report.figure("pages read", pages as f64, "");
    report.figure("pages/s", pages as f64 / elapsed, "1/s");
    report.figure(
        "messages read/s",
        (pages as f64 * page as f64) / elapsed,
        "1/s",
    );
    report.figure("full passes", passes as f64, "");
    report
        .latencies
        .push(Latency::from_micros("page", &latency));
    report.series.push(Series {
        name: "pages".into(),
        unit: "1/s".into(),
        points: series
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let width = bucket.as_secs_f64();
                (i as f64 * width, *n as f64 / width)
            })
            .collect(),
    });
    report.passed = report.checks.total() == 0 && report.errors.is_empty();
    target.stop().await?;
    Ok(report)
}

/// Pages backwards through the whole history, again and again, until `until`.
async fn read(
    api: Api,
    channel: i64,
    page: usize,
    messages: usize,
    until: Instant,
    start: Instant,
    bucket: Duration,
) -> anyhow::Result<Read> {
    let mut r = Read {
        pages: 0,
        passes: 0,
        latency_us: histogram(),
        per_bucket: Vec::new(),
        errors: BTreeMap::new(),
        violations: Violations::default(),
    };
    while Instant::now() < until {
        let mut cursor: Option<i64> = None;
        let mut seen = 0usize;
        loop {
            let path = match cursor {
                Some(c) => format!("/v1/channels/{channel}/messages?limit={page}&before_seq={c}"),
                None => format!("/v1/channels/{channel}/messages?limit={page}"),
            };
            let t = Instant::now();
            let v = match api.call(reqwest::Method::GET, &path, None).await {
                Ok(v) => v,
                Err(e) => {
                    *r.errors.entry(e.to_string()).or_default() += 1;
                    break;
                }
            };
            let _ = r.latency_us.record(t.elapsed().as_micros().max(1) as u64);
            r.pages += 1;
            let b = (t.duration_since(start).as_micros() / bucket.as_micros()) as usize;
            if r.per_bucket.len() <= b {
                r.per_bucket.resize(b + 1, 0);
            }
            r.per_bucket[b] += 1;
            let seqs: Vec<i64> = v["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["seq"].as_i64())
                .collect();
            // Each page ascends and ends right below the previous page's first seq.
            let ascending = seqs.windows(2).all(|w| w[1] == w[0] + 1);
            let adjoins = match (cursor, seqs.last()) {
                (Some(c), Some(&l)) => l == c - 1,
                _ => true,
            };
            if !ascending || !adjoins {
                r.violations.reorders += 1;
                if r.violations.examples.len() < 10 {
                    r.violations
                        .examples
                        .push(format!("page before {cursor:?} held {seqs:?}"));
                }
            }
            seen += seqs.len();
            cursor = seqs.first().copied();
            if !v["has_more"].as_bool().unwrap_or(false) || seqs.is_empty() {
                break;
            }
        }
        if seen != messages {
            r.violations.missing += messages.abs_diff(seen) as u64;
            if r.violations.examples.len() < 10 {
                r.violations
                    .examples
                    .push(format!("a full pass saw {seen} of {messages} messages"));
            }
        }
        r.passes += 1;
    }
    Ok(r)
}
