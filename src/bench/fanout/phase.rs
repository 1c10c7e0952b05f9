//! One phase of the fan-out rig: how it sends ([`Pace`]), what it measured
//! ([`PhaseResult`]), and the whole run's series and checks once the rig has finished
//! ([`End`]), each able to add itself to a [`Report`].

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::BUCKET;
use crate::bench::Sample;
use crate::bench::check::Violations;
use crate::bench::report::{Latency, Report, Series, Table};
use crate::bench::timeline::Timeline;

/// How a phase sends.
#[derive(Debug, Clone)]
pub(crate) enum Pace {
    /// `count` messages in total, each sender keeping `window` in flight and at most
    /// `lag` sent and not yet delivered.
    Max {
        count: usize,
        window: usize,
        lag: usize,
    },
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
    pub(super) fn times(&self, sender: usize, senders: usize) -> Vec<Duration> {
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

    pub(super) fn planned(&self) -> usize {
        match self {
            Pace::Max { count, .. } => *count,
            Pace::Schedule(segments) => segments.iter().map(|&(_, count)| count).sum(),
        }
    }
}

/// What one phase measured.
pub(crate) struct PhaseResult {
    pub planned: usize,
    pub acked: u64,
    pub errors: BTreeMap<String, u64>,
    pub ack_latency: Histogram<u64>,
    /// Open loop: how long after its scheduled time each send was written (the load
    /// tool's own lateness, which every latency counted from the schedule includes).
    pub send_lateness: Histogram<u64>,
    pub deliveries: u64,
    pub deliver_latency: Histogram<u64>,
    /// From the phase's start to its last ack.
    pub send_time: Duration,
    /// From the phase's start to its last delivery.
    pub deliver_time: Duration,
    /// Server CPU seconds over the phase (from its `/metrics`; every node's together).
    pub server_cpu: Option<f64>,
    /// The bench process's own CPU seconds over the phase: mostly its senders and
    /// receivers, with its scrapes of `/metrics` and its wait for the phase's start. They
    /// share the machine with a spawned server: what they take is the measurement's weight.
    pub load_cpu: Option<f64>,
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
        }
        report.cpu_per_million_deliveries("server", self.server_cpu, self.deliveries);
        report.cpu_per_million_deliveries("load", self.load_cpu, self.deliveries);
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
        if !self.send_lateness.is_empty() {
            report
                .latencies
                .push(Latency::from_micros("send lateness", &self.send_lateness));
        }
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
                window: 2,
                lag: 8
            }
            .times(0, 1)
            .is_empty()
        );
    }

    /// A phase of well under a second, started (as phases are) on the rig's second 1: its
    /// latency timelines hold one second each, and its CPU one pair of samples. Each
    /// series is still drawn, on labelled axes.
    #[test]
    fn a_short_run_still_draws_every_series() {
        let mut deliver_by_second = Timeline::default();
        let mut ack_by_second = Timeline::default();
        for us in [900, 1_500, 3_200] {
            deliver_by_second.record(1, us);
            ack_by_second.record(1, us / 2);
        }
        let sample = |cpu: f64, queued: f64| Sample {
            cpu_seconds: Some(cpu),
            buffered_bytes: Some(queued),
            ..Sample::default()
        };
        let end = End {
            checks: Violations::default(),
            deliveries_per_bucket: vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40, 80],
            acks_per_bucket: vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 20],
            deliver_by_second,
            ack_by_second,
            samples: vec![(0.4, sample(1.0, 0.0)), (1.3, sample(1.2, 2048.0))],
        };
        let mut report = Report::new("fanout");
        end.describe(&mut report);
        assert_eq!(report.series.len(), 6);
        let html = report.to_html();
        let charts: Vec<&str> = html.split("<svg").skip(1).collect();
        assert_eq!(charts.len(), 6);
        for (chart, series) in charts.iter().zip(&report.series) {
            let drawn = chart.contains("<circle") || chart.contains("<polyline");
            assert!(drawn, "{} is not drawn: {chart}", series.name);
            let y_ticks = chart.matches("text-anchor=\"end\"").count();
            assert!(y_ticks >= 2, "{}: no y ticks", series.name);
        }
        // A second of x axis, in fifths; deliveries up to 800/s.
        assert!(charts[0].contains(">1.2</text>") && charts[0].contains(">800</text>"));
        assert!(charts[0].contains(">deliveries/s</text>"));
        // p99 of 3.2 ms at second 1: one dot, on a 0–4 ms axis.
        assert_eq!(charts[2].matches("<circle").count(), 1);
        assert!(charts[2].contains(">4</text>") && charts[2].contains(">ms</text>"));
        assert!(charts[4].contains(">cores</text>") && charts[5].contains(">KiB</text>"));
    }
}
