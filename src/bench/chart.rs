//! The report's charts as inline SVG, each with axes a reader can read values off: ticks
//! at "nice" steps (1, 2 or 5 × 10^k) with labels, and the axes' units. A latency
//! histogram is drawn on a log axis of milliseconds, a value over time on seconds since
//! the run's start; a series of one point is drawn as a dot.

use std::fmt::Write;

/// The plot area, in px, and the margins around it that hold the axes' labels.
const PLOT_W: f64 = 560.0;
const PLOT_H: f64 = 200.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 42.0;
/// Series with at most this many points get a dot at each point.
const DOTS_UP_TO: usize = 60;

/// The smallest step of 1, 2 or 5 × 10^k that splits `0..max` into at most `most`
/// intervals; 1 for an empty or unusable range.
pub(crate) fn nice_step(max: f64, most: usize) -> f64 {
    if !max.is_finite() || max <= 0.0 {
        return 1.0;
    }
    let raw = max / most.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// Ticks from 0 to the first multiple of [`nice_step`] at or above `max` (at least one
/// step): the axis ends on the last.
pub(crate) fn linear_ticks(max: f64, most: usize) -> Vec<f64> {
    let step = nice_step(max, most);
    let steps = if max.is_finite() && max > 0.0 {
        (max / step - 1e-9).ceil().max(1.0) as usize
    } else {
        1
    };
    (0..=steps).map(|i| i as f64 * step).collect()
}

/// The values 1, 2 and 5 × 10^k within `lo..=hi` (only the powers of ten when those
/// would crowd the axis).
pub(crate) fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        return Vec::new();
    }
    let within = |v: &f64| *v >= lo * (1.0 - 1e-9) && *v <= hi * (1.0 + 1e-9);
    let decades = lo.log10().floor() as i32..=hi.log10().ceil() as i32;
    let all: Vec<f64> = decades
        .clone()
        .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k)))
        .filter(within)
        .collect();
    if all.len() <= 12 {
        return all;
    }
    decades.map(|k| 10f64.powi(k)).filter(within).collect()
}

/// A tick's label on a linear axis of `step`s ending at `top`: as many decimals as the
/// step needs, and k or M for large values.
pub(crate) fn linear_label(v: f64, step: f64, top: f64) -> String {
    let (scale, suffix) = if top >= 1e6 {
        (1e6, "M")
    } else if top >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let decimals = (-((step / scale).log10() + 1e-9).floor()).max(0.0) as usize;
    format!("{:.*}{suffix}", decimals, v / scale)
}

/// A tick's label on a log axis: as many decimals as the value needs.
fn log_label(v: f64) -> String {
    let decimals = (-(v.log10() + 1e-9).floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn open_svg() -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" role=\"img\" \
         font-size=\"10\" font-family=\"system-ui,sans-serif\">",
        LEFT + PLOT_W + RIGHT,
        TOP + PLOT_H + BOTTOM
    )
}

/// The y axis (gridlines, ticks and labels, the unit above) and the x axis line.
fn y_axis(svg: &mut String, ticks: &[f64], unit: &str) {
    let top = ticks.last().copied().unwrap_or(1.0);
    let step = ticks.get(1).copied().unwrap_or(top);
    let bottom = TOP + PLOT_H;
    for &v in ticks {
        let y = bottom - v / top * PLOT_H;
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/>\
             <line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{LEFT}\" y2=\"{y:.1}\" stroke=\"#444\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + PLOT_W,
            LEFT - 4.0,
            LEFT - 6.0,
            y + 3.5,
            linear_label(v, step, top)
        );
    }
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{bottom}\" stroke=\"#444\"/>\
         <line x1=\"{LEFT}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"#444\"/>\
         <text x=\"{LEFT}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
        LEFT + PLOT_W,
        TOP - 8.0,
        esc(unit)
    );
}

/// One x tick at `x` with its label, and (once) the axis's title under them.
fn x_tick(svg: &mut String, x: f64, label: &str) {
    let bottom = TOP + PLOT_H;
    let _ = write!(
        svg,
        "<line x1=\"{x:.1}\" y1=\"{bottom}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#444\"/>\
         <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
        bottom + 4.0,
        bottom + 15.0
    );
}

fn x_title(svg: &mut String, title: &str) {
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
        LEFT + PLOT_W / 2.0,
        TOP + PLOT_H + 34.0,
        esc(title)
    );
}

/// Bars of counts per latency bucket ((upper bound in ms, count), log-spaced bounds) on a
/// log axis of milliseconds.
pub(crate) fn histogram(buckets: &[(f64, u64)]) -> String {
    let mut svg = open_svg();
    let counts = linear_ticks(buckets.iter().map(|b| b.1).max().unwrap_or(0) as f64, 5);
    let top = counts.last().copied().unwrap_or(1.0);
    y_axis(&mut svg, &counts, "count");
    // The first bar starts one bucket's ratio below its bound, like the others.
    let first = buckets.first().map_or(0.1, |b| b.0).max(1e-6);
    let ratio = match buckets {
        [a, b, ..] if b.0 > a.0 && a.0 > 0.0 => b.0 / a.0,
        _ => 1.5,
    };
    let lo = first / ratio;
    let hi = buckets.last().map_or(first, |b| b.0).max(first);
    let x = |v: f64| LEFT + PLOT_W * (v.max(lo) / lo).ln() / (hi / lo).ln();
    let mut from = lo;
    for (upper, count) in buckets {
        let height = *count as f64 / top * PLOT_H;
        let (x0, x1) = (x(from), x(*upper));
        let _ = write!(
            svg,
            "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"#4a7\">\
             <title>≤ {upper:.2} ms: {count}</title></rect>",
            TOP + PLOT_H - height,
            (x1 - x0 - 1.0).max(1.0)
        );
        from = *upper;
    }
    let mut ticks = log_ticks(lo, hi);
    if ticks.len() < 2 {
        // A narrow range: its ends, so that the axis still reads.
        ticks = vec![lo, hi];
    }
    for v in ticks {
        x_tick(&mut svg, x(v), &log_label(v));
    }
    x_title(&mut svg, "latency, ms (log scale)");
    if buckets.is_empty() {
        no_samples(&mut svg);
    }
    svg.push_str("</svg>");
    svg
}

/// A value over time, (seconds since the run's start, value), as a line (and a dot per
/// point when there are few, so a single point still shows).
pub(crate) fn series(points: &[(f64, f64)], unit: &str) -> String {
    let mut svg = open_svg();
    let v_ticks = linear_ticks(points.iter().map(|p| p.1).fold(0.0, f64::max), 5);
    let t_ticks = linear_ticks(points.iter().map(|p| p.0).fold(0.0, f64::max), 8);
    let v_top = v_ticks.last().copied().unwrap_or(1.0);
    let t_top = t_ticks.last().copied().unwrap_or(1.0);
    let t_step = t_ticks.get(1).copied().unwrap_or(t_top);
    y_axis(&mut svg, &v_ticks, unit);
    for &t in &t_ticks {
        x_tick(
            &mut svg,
            LEFT + t / t_top * PLOT_W,
            &linear_label(t, t_step, t_top),
        );
    }
    x_title(&mut svg, "seconds since the run's start");
    let xy: Vec<(f64, f64)> = points
        .iter()
        .map(|(t, v)| {
            (
                LEFT + t.max(0.0) / t_top * PLOT_W,
                TOP + PLOT_H - v.clamp(0.0, v_top) / v_top * PLOT_H,
            )
        })
        .collect();
    if xy.len() >= 2 {
        let path: Vec<String> = xy.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"#36c\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
    }
    if xy.len() <= DOTS_UP_TO {
        for ((x, y), (t, v)) in xy.iter().zip(points) {
            let _ = write!(
                svg,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#36c\">\
                 <title>{t:.2} s: {v:.2} {}</title></circle>",
                esc(unit)
            );
        }
    }
    if points.is_empty() {
        no_samples(&mut svg);
    }
    svg.push_str("</svg>");
    svg
}

fn no_samples(svg: &mut String) {
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">no samples</text>",
        LEFT + PLOT_W / 2.0,
        TOP + PLOT_H / 2.0
    );
}

fn esc(s: &str) -> String {
    super::report::esc(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_two_or_five_times_a_power_of_ten() {
        for (max, most, step) in [
            (1.0, 5, 0.2),
            (0.93, 5, 0.2),
            (7.0, 5, 2.0),
            (10.0, 5, 2.0),
            (11.0, 5, 5.0),
            (100.0, 5, 20.0),
            (1234.0, 5, 500.0),
            (48_000.0, 5, 10_000.0),
            (0.004, 4, 0.001),
            (1.3, 8, 0.2),
            (0.0, 5, 1.0),
            (f64::NAN, 5, 1.0),
        ] {
            let got = nice_step(max, most);
            assert!(
                (got - step).abs() < step * 1e-9,
                "{max} in {most}: {got}, not {step}"
            );
        }
    }

    #[test]
    fn linear_ticks_start_at_zero_and_end_at_or_above_the_max() {
        let t = linear_ticks(0.93, 5);
        assert_eq!(t.len(), 6);
        assert!((t[5] - 1.0).abs() < 1e-9);
        assert_eq!(linear_ticks(1234.0, 5), [0.0, 500.0, 1000.0, 1500.0]);
        assert_eq!(linear_ticks(10.0, 5), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(
            linear_ticks(0.0, 5),
            [0.0, 1.0],
            "an empty range is one step"
        );
        let labels: Vec<String> = linear_ticks(0.93, 5)
            .iter()
            .map(|&v| linear_label(v, 0.2, 1.0))
            .collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(linear_label(40_000.0, 10_000.0, 50_000.0), "40k");
        assert_eq!(linear_label(1_500_000.0, 500_000.0, 1_500_000.0), "1.5M");
        assert_eq!(linear_label(0.05, 0.05, 0.25), "0.05");
    }

    #[test]
    fn log_ticks_are_ones_twos_and_fives_within_the_range() {
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < y * 1e-9)
        };
        let t = log_ticks(0.067, 30.0);
        assert!(
            close(&t, &[0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]),
            "{t:?}"
        );
        // Seven decades would crowd the axis: powers of ten only.
        let t = log_ticks(0.05, 60_000.0);
        assert!(
            close(&t, &[0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0]),
            "{t:?}"
        );
        assert!(log_ticks(0.0, 1.0).is_empty());
        assert_eq!(log_label(0.2), "0.2");
        assert_eq!(log_label(0.05), "0.05");
        assert_eq!(log_label(20.0), "20");
    }

    #[test]
    fn a_single_point_is_drawn_as_a_dot_on_labelled_axes() {
        let svg = series(&[(1.0, 3.2)], "ms");
        assert!(
            svg.contains("<circle") && !svg.contains("<polyline"),
            "{svg}"
        );
        assert!(svg.contains(">ms</text>"), "the unit: {svg}");
        assert!(svg.contains(">4</text>"), "a y tick above 3.2: {svg}");
        assert!(svg.contains(">1.0</text>"), "an x tick at 1 s: {svg}");
        assert!(series(&[], "ms").contains("no samples"));
    }

    #[test]
    fn histogram_bars_sit_between_their_bounds_on_a_log_axis() {
        let svg = histogram(&[(0.1, 2), (0.15, 0), (0.225, 5), (0.3375, 1)]);
        assert_eq!(svg.matches("<rect").count(), 4);
        assert!(
            svg.contains(">0.1</text>") && svg.contains(">0.2</text>"),
            "{svg}"
        );
        assert!(svg.contains("latency, ms (log scale)"));
        // Counts up to 5: ticks 0..5 by 1.
        assert!(svg.contains(">5</text>") && svg.contains(">count</text>"));
    }
}
