//! Prometheus text exposition: the small pieces `/metrics` is written with (a lock-free
//! [`Histogram`], [`HttpMetrics`] by route and status, the edge's [`EdgeStats`]) and
//! [`render_header`]/[`render_value`] for one sample. Each part of the server owns its
//! own counters and renders them; `api::metrics` puts the parts together.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, for request and commit latencies.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds for counts of ops in one commit.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// `# HELP` and `# TYPE` lines of a metric.
pub fn render_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One sample line; `labels` is empty or `key="value",…` without braces.
pub fn render_value(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A whole metric of one unlabelled sample.
pub fn render_one(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    render_header(out, name, kind, help);
    render_value(out, name, "", value);
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A fixed-bucket histogram that many threads observe into without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is above every bound.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + v).to_bits())
            });
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The `_bucket`, `_sum` and `_count` lines (the header is the caller's).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        render_value(out, &format!("{name}_sum"), labels, sum);
        render_value(out, &format!("{name}_count"), labels, cumulative);
    }
}

/// HTTP requests by method, route (the route's pattern, never the raw path) and status,
/// with a latency histogram per method and route.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Route → method → stats; looked up by `&str`, so a request allocates only the
    /// first time its route and method are seen.
    routes: Mutex<BTreeMap<String, BTreeMap<String, RouteStats>>>,
}

#[derive(Debug)]
struct RouteStats {
    statuses: BTreeMap<u16, u64>,
    latency: Histogram,
}

impl HttpMetrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let methods = match routes.get_mut(route) {
            Some(m) => m,
            None => routes.entry(route.to_owned()).or_default(),
        };
        let stats = match methods.get_mut(method) {
            Some(s) => s,
            None => methods.entry(method.to_owned()).or_insert(RouteStats {
                statuses: BTreeMap::new(),
                latency: Histogram::new(LATENCY_BUCKETS),
            }),
        };
        *stats.statuses.entry(status).or_default() += 1;
        stats.latency.observe_duration(took);
    }

    pub fn render(&self, out: &mut String) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        render_header(
            out,
            "natter_http_requests_total",
            "counter",
            "HTTP requests answered, by method, route and status.",
        );
        for (route, method, stats) in flatten(&routes) {
            let labels = labels(method, route);
            for (status, n) in &stats.statuses {
                render_value(
                    out,
                    "natter_http_requests_total",
                    &format!("{labels},status=\"{status}\""),
                    n,
                );
            }
        }
        render_header(
            out,
            "natter_http_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its answer, by method and route.",
        );
        for (route, method, stats) in flatten(&routes) {
            stats.latency.render(
                out,
                "natter_http_request_duration_seconds",
                &labels(method, route),
            );
        }
    }
}

type Routes = BTreeMap<String, BTreeMap<String, RouteStats>>;

fn flatten(routes: &Routes) -> impl Iterator<Item = (&str, &str, &RouteStats)> {
    routes.iter().flat_map(|(route, methods)| {
        methods
            .iter()
            .map(move |(method, stats)| (route.as_str(), method.as_str(), stats))
    })
}

fn labels(method: &str, route: &str) -> String {
    format!(
        "method=\"{}\",route=\"{}\"",
        escape_label(method),
        escape_label(route)
    )
}

/// Which edge limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Send,
    Login,
    Signup,
    /// Writes other than sends.
    Write,
    /// Bytes of message text.
    WriteBytes,
    ChannelCreate,
    /// Password hashes at once (answered 503).
    PasswordHash,
    /// Connections per user or address, or in total.
    Connections,
    Search,
}

impl Limit {
    const ALL: [Limit; 9] = [
        Limit::Send,
        Limit::Login,
        Limit::Signup,
        Limit::Write,
        Limit::WriteBytes,
        Limit::ChannelCreate,
        Limit::PasswordHash,
        Limit::Connections,
        Limit::Search,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Login => "login",
            Self::Signup => "signup",
            Self::Write => "write",
            Self::WriteBytes => "write_bytes",
            Self::ChannelCreate => "channel_create",
            Self::PasswordHash => "password_hash",
            Self::Connections => "connections",
            Self::Search => "search",
        }
    }
}

/// Counters of the API's edge.
#[derive(Debug, Default)]
pub struct EdgeStats {
    rate_limited: [AtomicU64; Limit::ALL.len()],
}

impl EdgeStats {
    pub fn rate_limited(&self, limit: Limit) {
        self.rate_limited[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        render_header(
            out,
            "natter_rate_limited_total",
            "counter",
            "Requests and sends refused by a rate limit, by limit.",
        );
        for limit in Limit::ALL {
            render_value(
                out,
                "natter_rate_limited_total",
                &format!("limit=\"{}\"", limit.name()),
                self.rate_limited[limit as usize].load(Ordering::Relaxed),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_counts() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 3.0, 20.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert_eq!(
            out,
            "x_bucket{a=\"b\",le=\"1\"} 2\nx_bucket{a=\"b\",le=\"10\"} 3\n\
             x_bucket{a=\"b\",le=\"+Inf\"} 4\nx_sum{a=\"b\"} 24.5\nx_count{a=\"b\"} 4\n"
        );
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn http_metrics_count_by_route_and_status() {
        let m = HttpMetrics::default();
        m.observe("GET", "/v1/a", 200, Duration::from_millis(1));
        m.observe("GET", "/v1/a", 200, Duration::from_millis(2));
        m.observe("GET", "/v1/a", 404, Duration::from_millis(2));
        m.observe("POST", "/v1/a", 201, Duration::from_millis(2));
        let mut out = String::new();
        m.render(&mut out);
        let get = "method=\"GET\",route=\"/v1/a\"";
        assert!(out.contains(&format!(
            "natter_http_requests_total{{{get},status=\"200\"}} 2\n"
        )));
        assert!(out.contains(&format!(
            "natter_http_requests_total{{{get},status=\"404\"}} 1\n"
        )));
        assert!(out.contains(&format!(
            "natter_http_request_duration_seconds_count{{{get}}} 3\n"
        )));
        assert!(out.contains(
            "natter_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/a\"} 1\n"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
