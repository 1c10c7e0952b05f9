//! A bench run's report: printed as a table, written as JSON (`--json`) for machines, and
//! as one self-contained HTML page (`--report FILE.html`) with the latency histograms and
//! throughput over time drawn as inline SVG (by the `chart` module). The page fetches
//! nothing.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::chart;
use super::check::Violations;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The run's settings, as given.
    pub params: BTreeMap<String, String>,
    /// Headline figures (e.g. "deliveries/s"), in the order they were added.
    pub figures: Vec<Figure>,
    pub latencies: Vec<Latency>,
    pub series: Vec<Series>,
    /// Step-by-step results (e.g. `capacity`'s steps).
    pub tables: Vec<Table>,
    /// Failed operations by error code.
    pub errors: BTreeMap<String, u64>,
    pub checks: Violations,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

/// A latency distribution in milliseconds, with its histogram for drawing.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub name: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (upper bound in ms, count) per log-spaced bucket.
    pub buckets: Vec<(f64, u64)>,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn from_micros(name: &str, h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let mut buckets = Vec::new();
        if !h.is_empty() {
            for b in h.iter_log(100, 1.5) {
                buckets.push((ms(b.value_iterated_to()), b.count_since_last_iteration()));
            }
        }
        Self {
            name: name.to_owned(),
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            buckets,
        }
    }
}

/// Rows of cells under named columns.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// A value over time: (seconds since start, value).
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub unit: String,
    pub points: Vec<(f64, f64)>,
}

impl Report {
    pub fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            params: BTreeMap::new(),
            figures: Vec::new(),
            latencies: Vec::new(),
            series: Vec::new(),
            tables: Vec::new(),
            errors: BTreeMap::new(),
            checks: Violations::default(),
            passed: true,
        }
    }

    pub fn param(&mut self, name: &str, value: impl ToString) {
        self.params.insert(name.to_owned(), value.to_string());
    }

    pub fn figure(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
        });
    }

    /// "`who` CPU per million deliveries", in seconds, when the CPU was read and anything
    /// was delivered.
    pub fn cpu_per_million_deliveries(&mut self, who: &str, cpu: Option<f64>, deliveries: u64) {
        if let Some(cpu) = cpu.filter(|_| deliveries > 0) {
            let name = format!("{who} CPU per million deliveries");
            self.figure(&name, cpu * 1e6 / deliveries as f64, "s");
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The table printed at the end of a run.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {}",
            self.scenario,
            if self.passed { "passed" } else { "FAILED" }
        );
        for f in &self.figures {
            let _ = writeln!(out, "  {:<28} {:>14.1} {}", f.name, f.value, f.unit);
        }
        if !self.latencies.is_empty() {
            let _ = writeln!(
                out,
                "  {:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency (ms)", "p50", "p90", "p99", "p99.9", "max"
            );
            for l in &self.latencies {
                let _ = writeln!(
                    out,
                    "  {:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                    l.name, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
                );
            }
        }
        for t in &self.tables {
            let _ = writeln!(out, "  {}", t.title);
            let widths: Vec<usize> = (0..t.columns.len())
                .map(|i| {
                    t.rows
                        .iter()
                        .filter_map(|r| r.get(i))
                        .chain(std::iter::once(&t.columns[i]))
                        .map(|c| c.chars().count())
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for row in std::iter::once(&t.columns).chain(&t.rows) {
                let cells: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:>w$}"))
                    .collect();
                let _ = writeln!(out, "    {}", cells.join("  "));
            }
        }
        for (code, n) in &self.errors {
            let _ = writeln!(out, "  error {code:<22} {n:>14}");
        }
        let c = &self.checks;
        let _ = writeln!(
            out,
            "  checks: {} missing, {} duplicates, {} reorders",
            c.missing, c.duplicates, c.reorders
        );
        for e in &c.examples {
            let _ = writeln!(out, "    {e}");
        }
        out
    }

    /// One self-contained page: tables and inline SVG, no scripts, no fetches.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let title = format!("natter bench {}", esc(&self.scenario));
        let _ = write!(
            h,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
             <style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:60em}}\
             table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}}\
             th:first-child,td:first-child{{text-align:left}}.fail{{color:#b00}}.pass{{color:#070}}</style></head><body>"
        );
        let verdict = if self.passed {
            ("pass", "passed")
        } else {
            ("fail", "FAILED")
        };
        let _ = write!(
            h,
            "<h1>{title}: <span class=\"{}\">{}</span></h1>",
            verdict.0, verdict.1
        );
        h.push_str("<h2>Settings</h2><table>");
        for (k, v) in &self.params {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
        }
        h.push_str("</table><h2>Figures</h2><table>");
        for f in &self.figures {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.1}</td><td>{}</td></tr>",
                esc(&f.name),
                f.value,
                esc(&f.unit)
            );
        }
        h.push_str("</table>");
        if !self.latencies.is_empty() {
            h.push_str("<h2>Latency (ms)</h2><table><tr><th>what</th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>");
            for l in &self.latencies {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                    esc(&l.name),
                    l.count,
                    l.p50_ms,
                    l.p90_ms,
                    l.p99_ms,
                    l.p999_ms,
                    l.max_ms
                );
            }
            h.push_str("</table>");
            for l in &self.latencies {
                let _ = write!(h, "<h3>{} histogram</h3>", esc(&l.name));
                h.push_str(&chart::histogram(&l.buckets));
            }
        }
        for t in &self.tables {
            let _ = write!(h, "<h2>{}</h2><table><tr>", esc(&t.title));
            for c in &t.columns {
                let _ = write!(h, "<th>{}</th>", esc(c));
            }
            h.push_str("</tr>");
            for row in &t.rows {
                h.push_str("<tr>");
                for c in row {
                    let _ = write!(h, "<td>{}</td>", esc(c));
                }
                h.push_str("</tr>");
            }
            h.push_str("</table>");
        }
        for s in &self.series {
            let _ = write!(h, "<h2>{} over time ({})</h2>", esc(&s.name), esc(&s.unit));
            // A rate's axis reads "deliveries/s" rather than "1/s".
            let unit = match s.unit.as_str() {
                "1/s" => format!("{}/s", s.name),
                other => other.to_owned(),
            };
            h.push_str(&chart::series(&s.points, &unit));
        }
        h.push_str("<h2>Errors</h2><table>");
        if self.errors.is_empty() {
            h.push_str("<tr><td>none</td></tr>");
        }
        for (code, n) in &self.errors {
            let _ = write!(h, "<tr><td>{}</td><td>{n}</td></tr>", esc(code));
        }
        let c = &self.checks;
        let _ = write!(
            h,
            "</table><h2>Delivery checks</h2><p>{} missing, {} duplicates, {} reorders</p><ul>",
            c.missing, c.duplicates, c.reorders
        );
        for e in &c.examples {
            let _ = write!(h, "<li>{}</li>", esc(e));
        }
        h.push_str("</ul></body></html>\n");
        h
    }
}

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_json_that_parses_and_a_page_that_fetches_nothing() {
        let mut r = Report::new("fanout <test>");
        r.param("members", 3);
        r.figure("deliveries/s", 1234.5, "1/s");
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in [100, 200, 300, 5000, 90_000] {
            h.record(v).unwrap();
        }
        r.latencies.push(Latency::from_micros("send→deliver", &h));
        r.series.push(Series {
            name: "deliveries".into(),
            unit: "1/s".into(),
            points: vec![(0.0, 0.0), (1.0, 10.0), (2.0, 5.0)],
        });
        r.errors.insert("overloaded".into(), 2);
        r.tables.push(Table {
            title: "steps".into(),
            columns: vec!["rate".into(), "p99 <ms>".into()],
            rows: vec![vec!["1000".into(), "2.5".into()]],
        });
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["latencies"][0]["count"], 5);
        let html = r.to_html();
        assert!(html.contains("<svg") && html.contains("fanout &lt;test&gt;"));
        assert!(!html.contains("src=") && !html.contains("<script") && !html.contains("href="));
        assert!(html.contains("<th>p99 &lt;ms&gt;</th>"));
        assert!(r.to_text().contains("deliveries/s") && r.to_text().contains("1000"));
    }
}
