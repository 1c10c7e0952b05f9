//! `natter bench fanout`: C channels with M members each online over WebSockets, and S
//! senders (each a member of one channel) sending at a fixed total rate (open loop:
//! latency counts from each message's scheduled send time, so a stalled server cannot
//! hide its delay) or as fast as the server acknowledges and delivers (`--rate max`, a
//! window of sends in flight per sender, and at most `--lag` sent and not yet delivered
//! per sender). Every receiving connection runs the delivery [`Checker`]; any
//! missing, duplicate or reordered event fails the run.
//!
//! The machinery is a [`Rig`]: users, channels and connections set up once, then driven
//! through one or more [`Rig::phase`]s (the `capacity` and `spike` scenarios are phases
//! of the same rig), with the receivers and their checkers running across all of them.
//!
//! This file holds the scenario's flags, its entry points and the helpers the rig's parts
//! share; `phase.rs` how a phase sends and what it measured, `rig.rs` the rig, and
//! `workers.rs` the sender and receiver tasks.
//!
//! [`Checker`]: super::check::Checker

mod members;
mod phase;
mod rig;
mod workers;

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::Report;
use super::{RunArgs, emit};

pub(crate) use phase::{Pace, PhaseResult};
pub(crate) use rig::Rig;

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
    /// With `--rate max`: messages per sender sent and not yet delivered to the members,
    /// at most (the senders wait for the fan-out past it, so a run measures what the
    /// server sustains, not a backlog that grows).
    #[arg(long, default_value_t = 256)]
    pub lag: usize,
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
            lag: args.lag.max(1),
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

#[cfg(test)]
mod tests {
    use super::*;

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
