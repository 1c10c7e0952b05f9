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
    /// Of those, the frames the fan-out wrote itself (the rest the connections' tasks).
    pub events_written_by_fanout: AtomicU64,
    /// Event reads (replay and gap fill) served from the hot-channel cache.
    pub cache_hits: AtomicU64,
    /// Event reads that went to the store.
    pub cache_misses: AtomicU64,
    /// Store reads saved because an identical read was already running.
    pub coalesced_reads: AtomicU64,
    /// Events the dispatcher dropped as already dispatched (the bus brought one twice).
    pub dispatch_duplicates: AtomicU64,
    /// Events held back because an earlier event of their channel had not arrived.
    pub dispatch_held: AtomicU64,
    /// Gaps filled by reading the store, and the events those reads dispatched.
    pub dispatch_fills: AtomicU64,
    pub dispatch_filled_events: AtomicU64,
    /// Followed channels the periodic check found ahead of what was dispatched.
    pub dispatch_behind: AtomicU64,
    /// Gap reads that failed (retried).
    pub dispatch_fill_errors: AtomicU64,
}

impl Stats {
    /// Prometheus text exposition of these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let gauge = |a: &AtomicUsize| a.load(Ordering::Relaxed) as u64;
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let metrics = [
            (
                "natter_ws_connections",
                "gauge",
                "Open WebSocket connections.",
                gauge(&self.connections),
            ),
            (
                "natter_ws_buffered_bytes",
                "gauge",
                "Bytes queued for WebSocket clients.",
                gauge(&self.buffered_bytes),
            ),
            (
                "natter_ws_outbox_peak_bytes",
                "gauge",
                "The most bytes one connection's queue has held.",
                gauge(&self.outbox_peak_bytes),
            ),
            (
                "natter_ws_slow_consumers_total",
                "counter",
                "Connections closed as slow consumers (4008).",
                count(&self.slow_consumers),
            ),
            (
                "natter_events_delivered_total",
                "counter",
                "Event frames written to WebSocket clients.",
                count(&self.events_delivered),
            ),
            (
                "natter_events_delivered_by_fanout_total",
                "counter",
                "Of the event frames written, those the fan-out wrote to the socket itself.",
                count(&self.events_written_by_fanout),
            ),
            (
                "natter_event_cache_hits_total",
                "counter",
                "Event reads served from the hot-channel cache.",
                count(&self.cache_hits),
            ),
            (
                "natter_event_cache_misses_total",
                "counter",
                "Event reads that went to the store.",
                count(&self.cache_misses),
            ),
            (
                "natter_event_reads_coalesced_total",
                "counter",
                "Store reads saved by joining an identical read in flight.",
                count(&self.coalesced_reads),
            ),
            (
                "natter_dispatch_duplicates_total",
                "counter",
                "Events dropped by the dispatcher as already dispatched.",
                count(&self.dispatch_duplicates),
            ),
            (
                "natter_dispatch_held_total",
                "counter",
                "Events held back until an earlier event of their channel arrived.",
                count(&self.dispatch_held),
            ),
            (
                "natter_dispatch_gap_fills_total",
                "counter",
                "Store reads that filled a gap in a followed channel's events.",
                count(&self.dispatch_fills),
            ),
            (
                "natter_dispatch_gap_filled_events_total",
                "counter",
                "Events dispatched from gap-filling store reads.",
                count(&self.dispatch_filled_events),
            ),
            (
                "natter_dispatch_behind_total",
                "counter",
                "Followed channels the periodic check found ahead of what was dispatched.",
                count(&self.dispatch_behind),
            ),
            (
                "natter_dispatch_gap_fill_errors_total",
                "counter",
                "Gap-filling store reads that failed (each is retried).",
                count(&self.dispatch_fill_errors),
            ),
        ];
        for (name, kind, help, value) in metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}
