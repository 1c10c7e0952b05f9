//! Counters of the real-time gateway, read by `/metrics` and by tests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Open WebSocket connections past their hello.
    pub connections: AtomicUsize,
    /// Bytes queued in all outboxes right now.
    pub buffered_bytes: AtomicUsize,
    /// The most bytes any one outbox has held.
    pub outbox_peak_bytes: AtomicUsize,
    /// Connections closed with 4008.
    pub slow_consumers: AtomicU64,
    /// Event frames written to sockets.
    pub events_delivered: AtomicU64,
    /// Event reads (replay and gap fill) served from the hot-channel cache.
    pub cache_hits: AtomicU64,
    /// Event reads that went to the store.
    pub cache_misses: AtomicU64,
    /// Store reads saved because an identical read was already running.
    pub coalesced_reads: AtomicU64,
}

impl Stats {
    /// Prometheus text exposition of these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let mut line = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |a: &AtomicUsize| a.load(Ordering::Relaxed) as u64;
        line(
            "natter_ws_connections",
            "gauge",
            "Open WebSocket connections.",
            get(&self.connections),
        );
        line(
            "natter_ws_buffered_bytes",
            "gauge",
            "Bytes queued for WebSocket clients.",
            get(&self.buffered_bytes),
        );
        line(
            "natter_ws_outbox_peak_bytes",
            "gauge",
            "The most bytes one connection's queue has held.",
            get(&self.outbox_peak_bytes),
        );
        line(
            "natter_ws_slow_consumers_total",
            "counter",
            "Connections closed as slow consumers (4008).",
            self.slow_consumers.load(Ordering::Relaxed),
        );
        line(
            "natter_events_delivered_total",
            "counter",
            "Event frames written to WebSocket clients.",
            self.events_delivered.load(Ordering::Relaxed),
        );
        line(
            "natter_event_cache_hits_total",
            "counter",
            "Event reads served from the hot-channel cache.",
            self.cache_hits.load(Ordering::Relaxed),
        );
        line(
            "natter_event_cache_misses_total",
            "counter",
            "Event reads that went to the store.",
            self.cache_misses.load(Ordering::Relaxed),
        );
        line(
            "natter_event_reads_coalesced_total",
            "counter",
            "Store reads saved by joining an identical read in flight.",
            self.coalesced_reads.load(Ordering::Relaxed),
        );
    }
}
