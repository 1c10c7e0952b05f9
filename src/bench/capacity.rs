//! `natter bench capacity`: steps the offered send rate up (open loop, each step a
//! [`Rig::phase`] at a fixed rate) until a step's p99 latency or error rate crosses its
//! bound, narrows the edge down between the last good and the first bad step, and reports
//! the highest sustainable rate and the peak it can carry with 1.5x headroom (seed 004:
//! build for 1.5 times the peak).

use super::RunArgs;
use super::fanout::{Pace, PhaseResult, Rig, Shape, ShapeArgs};
use super::report::{Report, Table};

#[derive(Debug, Clone, clap::Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// The first step's rate, in messages/s.
    #[arg(long, default_value_t = 1000.0)]
    pub start_rate: f64,
    /// Each step offers this many times the last one's rate.
    #[arg(long, default_value_t = 1.5)]
    pub growth: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 5.0)]
    pub step_secs: f64,
    /// Steps at most before narrowing down.
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
    /// Extra steps between the last good and the first bad rate.
    #[arg(long, default_value_t = 2)]
    pub refine: usize,
    /// A step fails when its ack or send→deliver p99 is above this many ms.
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,
    /// A step fails when more than this share of its sends got an error.
    #[arg(long, default_value_t = 0.001)]
    pub max_error_ratio: f64,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn run(args: CapacityArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    super::emit(&report, &args.run)
}

/// Why a step is not sustainable, if it is not.
fn verdict(args: &CapacityArgs, r: &PhaseResult) -> Option<String> {
    if r.lagging > 0 {
        return Some(format!(
            "{} receivers never caught up within 30 s",
            r.lagging
        ));
    }
    if r.error_ratio() > args.max_error_ratio {
        return Some(format!("{:.2} % errors", r.error_ratio() * 100.0));
    }
    if r.ack_p99_ms() > args.max_p99_ms {
        return Some(format!("ack p99 {:.1} ms", r.ack_p99_ms()));
    }
    if r.deliver_p99_ms() > args.max_p99_ms {
        return Some(format!("send→deliver p99 {:.1} ms", r.deliver_p99_ms()));
    }
    // Open loop, so a server (or a load generator) that falls behind the schedule shows
    // in the latencies above, which count from each message's scheduled time.
    None
}

pub async fn measure(args: &CapacityArgs) -> anyhow::Result<Report> {
    let shape = args.shape.or(Shape::CAPACITY);
    let step = args.step_secs.max(0.1);
    let growth = args.growth.max(1.01);
    let mut rig = Rig::start(&shape, &args.run).await?;
    let mut table = Table {
        title: "steps".into(),
        columns: [
            "offered msgs/s",
            "acked msgs/s",
            "deliveries/s",
            "ack p99 ms",
            "deliver p99 ms",
            "errors",
            "server CPU s",
            "verdict",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let (mut good, mut bad): (Option<f64>, Option<f64>) = (None, None);
    let mut best: Option<PhaseResult> = None;
    let mut rate = args.start_rate.max(1.0);
    let (mut steps, mut refined) = (0, 0);
    loop {
        // Narrowing down starts once there is both a good and a bad rate.
        let narrowing = good.is_some() && bad.is_some();
        if narrowing && refined >= args.refine || !narrowing && steps >= args.max_steps {
            break;
        }
        refined += usize::from(narrowing);
        steps += 1;
        let label = format!("step {steps}: {rate:.0} msgs/s");
        let r = rig
            .phase(Pace::Schedule(vec![Pace::lasting(rate, step)]), &label)
            .await?;
        let why = verdict(args, &r);
        table.rows.push(vec![
            format!("{rate:.0}"),
            format!("{:.0}", r.acked_rate()),
            format!("{:.0}", r.delivery_rate()),
            format!("{:.2}", r.ack_p99_ms()),
            format!("{:.2}", r.deliver_p99_ms()),
            format!("{}", r.errors.values().sum::<u64>()),
            r.server_cpu.map_or("-".into(), |c| format!("{c:.2}")),
            why.clone().unwrap_or_else(|| "sustained".into()),
        ]);
        if why.is_none() {
            good = Some(good.map_or(rate, |g: f64| g.max(rate)));
            if good == Some(rate) {
                best = Some(r);
            }
        } else {
            bad = Some(bad.map_or(rate, |b: f64| b.min(rate)));
        }
        rate = match (good, bad) {
            (Some(g), Some(b)) => (g * b).sqrt(),
            (Some(g), None) => g * growth,
            // Even the first rate failed: halve until one holds.
            (None, Some(b)) => b / 2.0,
            (None, None) => unreachable!("a step was just judged"),
        };
    }
    let end = rig.finish().await?;

    let mut report = Report::new("capacity");
    shape.describe(&mut report);
    report.param("start rate", args.start_rate);
    report.param("growth", growth);
    report.param("step s", step);
    report.param("bound: p99 ms", args.max_p99_ms);
    report.param("bound: error ratio", args.max_error_ratio);
    report.param("server", args.run.server());
    let sustainable = good.unwrap_or(0.0);
    report.figure("highest sustainable rate", sustainable, "msgs/s");
    report.figure(
        "deliveries/s at that rate",
        sustainable * shape.members as f64,
        "1/s",
    );
    report.figure(
        "peak to plan for (1.5x headroom)",
        sustainable / 1.5,
        "msgs/s",
    );
    if let Some(b) = bad {
        report.figure("lowest failing rate", b, "msgs/s");
    }
    if let Some(best) = &best {
        best.describe(&mut report);
    }
    report.tables.push(table);
    end.describe(&mut report);
    // A capacity run measures; it fails only when the stream itself broke.
    report.passed = report.checks.total() == 0;
    Ok(report)
}
