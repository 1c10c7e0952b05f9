//! `natter bench spike`: a steady rate, a sudden burst (10x for 5 s by default), then the
//! steady rate again, all open loop in one [`Rig::phase`]. Reports latency per second of
//! send time before, during and after the burst, the errors the burst caused, how far the
//! server's WebSocket queues grew, and how long after the burst latency came back.

use super::RunArgs;
use super::fanout::{Pace, Rig, Shape, ShapeArgs};
use super::report::{Report, Table};
use super::timeline::Timeline;

#[derive(Debug, Clone, clap::Args)]
pub struct SpikeArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// The steady rate, in messages/s.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// The burst's rate as a multiple of the steady one.
    #[arg(long, default_value_t = 10.0)]
    pub burst: f64,
    /// Seconds of steady rate before the burst.
    #[arg(long, default_value_t = 5.0)]
    pub before: f64,
    /// Seconds the burst lasts.
    #[arg(long, default_value_t = 5.0)]
    pub burst_secs: f64,
    /// Seconds of steady rate after the burst.
    #[arg(long, default_value_t = 10.0)]
    pub after: f64,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn run(args: SpikeArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    super::emit(&report, &args.run)
}

/// Which part of the run a second of send time belongs to (partial seconds at the edges
/// belong to none).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Before,
    Burst,
    After,
}

fn part_of(second: usize, start: f64, burst_at: f64, burst_end: f64, end: f64) -> Option<Part> {
    let (s, e) = (second as f64, second as f64 + 1.0);
    if s >= start && e <= burst_at {
        Some(Part::Before)
    } else if s >= burst_at && e <= burst_end {
        Some(Part::Burst)
    } else if s >= burst_end && e <= end {
        Some(Part::After)
    } else {
        None
    }
}

/// Seconds from the burst's end until p99 is back under `bound` for good (every later
/// whole second under it); `None` if it never settles.
fn recovery(timeline: &Timeline, burst_end: f64, end: f64, bound_ms: f64) -> Option<f64> {
    let p99 = timeline.quantile_ms(0.99);
    let after: Vec<&(f64, f64)> = p99
        .iter()
        .filter(|(s, _)| *s >= burst_end.floor() && s + 1.0 <= end)
        .collect();
    let last_bad = after.iter().rposition(|(_, v)| *v > bound_ms);
    match last_bad {
        None => Some(0.0),
        Some(i) if i + 1 < after.len() => Some((after[i + 1].0 - burst_end).max(0.0)),
        Some(_) => None,
    }
}

pub async fn measure(args: &SpikeArgs) -> anyhow::Result<Report> {
    let shape = args.shape.or(Shape::SPIKE);
    let rate = args.rate.max(1.0);
    let secs = |s: f64| s.max(0.1);
    let mut rig = Rig::start(&shape, &args.run).await?;
    let pace = Pace::Schedule(vec![
        Pace::lasting(rate, secs(args.before)),
        Pace::lasting(rate * args.burst.max(1.0), secs(args.burst_secs)),
        Pace::lasting(rate, secs(args.after)),
    ]);
    let r = rig.phase(pace, "steady, burst, steady").await?;
    let end = rig.finish().await?;

    let start = r.started_at;
    let burst_at = start + secs(args.before);
    let burst_end = burst_at + secs(args.burst_secs);
    let stop = burst_end + secs(args.after);

    let mut report = Report::new("spike");
    shape.describe(&mut report);
    report.param("steady rate", rate);
    report.param(
        "burst",
        format!("{}x for {} s", args.burst, args.burst_secs),
    );
    report.param(
        "before / after s",
        format!("{} / {}", args.before, args.after),
    );
    report.param("server", args.run.server());
    r.describe(&mut report);

    let mut table = Table {
        title: "by part of the run (messages sent in whole seconds of it)".into(),
        columns: [
            "part",
            "messages",
            "ack p50 ms",
            "ack p99 ms",
            "deliver p50 ms",
            "deliver p99 ms",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut baseline_p99 = None;
    for (part, name) in [
        (Part::Before, "before"),
        (Part::Burst, "burst"),
        (Part::After, "after"),
    ] {
        let seconds: Vec<usize> = (0..stop.ceil() as usize)
            .filter(|&s| part_of(s, start, burst_at, burst_end, stop) == Some(part))
            .collect();
        let (Some(&from), Some(&to)) = (seconds.first(), seconds.last()) else {
            continue;
        };
        let ack = end.ack_by_second.span(from, to + 1);
        let deliver = end.deliver_by_second.span(from, to + 1);
        let ms = |q: Option<f64>| q.map_or("-".into(), |us| format!("{:.2}", us / 1000.0));
        if part == Part::Before {
            baseline_p99 = deliver.quantile(0.99).map(|us| us / 1000.0);
        }
        table.rows.push(vec![
            name.into(),
            ack.count().to_string(),
            ms(ack.quantile(0.5)),
            ms(ack.quantile(0.99)),
            ms(deliver.quantile(0.5)),
            ms(deliver.quantile(0.99)),
        ]);
    }
    report.tables.push(table);
    if let Some(peak) = end
        .samples
        .iter()
        .filter_map(|(_, s)| s.buffered_bytes)
        .reduce(f64::max)
    {
        report.figure("peak server WebSocket queues", peak / 1024.0, "KiB");
    }
    // Recovered: send→deliver p99 back within twice the steady p99 (at least 1 ms).
    let bound = baseline_p99.map_or(f64::INFINITY, |b| (2.0 * b).max(1.0));
    report.param("recovered means", format!("deliver p99 ≤ {bound:.2} ms"));
    match recovery(&end.deliver_by_second, burst_end, stop, bound) {
        Some(s) => report.figure("recovery after the burst", s, "s"),
        None => report.figure("recovery after the burst (did not recover)", -1.0, "s"),
    }
    end.describe(&mut report);
    report.passed = report.checks.total() == 0 && r.answered() == r.planned;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_is_the_first_second_after_which_latency_stays_low() {
        let mut t = Timeline::default();
        // p99 by second: 1 ms, 1, 80 (burst), 60, 1, 40, 1, 1.
        for (s, ms) in [1, 1, 80, 60, 1, 40, 1, 1].into_iter().enumerate() {
            for _ in 0..100 {
                t.record(s, ms * 1000);
            }
        }
        // Burst ends at 3.0; second 5 is still bad, so it settles from second 6.
        assert_eq!(recovery(&t, 3.0, 8.0, 2.0), Some(3.0));
        assert_eq!(recovery(&t, 6.0, 8.0, 2.0), Some(0.0));
        // Still bad in the last second: not recovered.
        t.record(7, 90_000);
        t.record(7, 90_000);
        assert_eq!(recovery(&t, 6.0, 8.0, 2.0), None);
        assert_eq!(
            part_of(0, 0.5, 2.0, 3.0, 8.0),
            None,
            "partly before the start"
        );
        assert_eq!(part_of(1, 0.5, 2.0, 3.0, 8.0), Some(Part::Before));
        assert_eq!(part_of(2, 0.5, 2.0, 3.0, 8.0), Some(Part::Burst));
        assert_eq!(part_of(7, 0.5, 2.0, 3.0, 8.0), Some(Part::After));
    }
}
