//! The delivery checker: what one connection received, per channel, against the promise
//! that every event arrives once and in seq order. It tells a gap (a seq never seen), a
//! duplicate (a seq seen twice) and a reorder (a seq that arrived after a later one) apart.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

/// Examples of violations kept for the report.
const EXAMPLES: usize = 10;

/// Violations found, over every checked connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Violations {
    /// Seqs never delivered (counting a missing tail up to the expected last seq).
    pub missing: u64,
    pub duplicates: u64,
    pub reorders: u64,
    /// A few of them, described.
    pub examples: Vec<String>,
}

impl Violations {
    pub fn total(&self) -> u64 {
        self.missing + self.duplicates + self.reorders
    }

    fn note(&mut self, example: impl FnOnce() -> String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(example());
        }
    }

    pub fn merge(&mut self, other: &Violations) {
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.reorders += other.reorders;
        for e in &other.examples {
            if self.examples.len() < EXAMPLES {
                self.examples.push(e.clone());
            }
        }
    }
}

#[derive(Debug, Default)]
struct ChannelState {
    last: i64,
    /// Seqs skipped over and not seen since.
    holes: BTreeSet<i64>,
}

/// One connection's view, fed in arrival order.
#[derive(Debug, Default)]
pub struct Checker {
    who: String,
    channels: HashMap<i64, ChannelState>,
    found: Violations,
}

impl Checker {
    /// `who` names the connection in examples.
    pub fn new(who: impl Into<String>) -> Self {
        Self {
            who: who.into(),
            ..Self::default()
        }
    }

    /// The connection's position in a channel before anything arrives (from `ready` or
    /// `channel.joined`): the next event should be `seq + 1`.
    pub fn start(&mut self, channel: i64, seq: i64) {
        self.channels.entry(channel).or_default().last = seq;
    }

    /// The last seq seen (or started at) in a channel.
    pub fn position(&self, channel: i64) -> Option<i64> {
        self.channels.get(&channel).map(|s| s.last)
    }

    /// One event as it arrived.
    pub fn observe(&mut self, channel: i64, seq: i64) {
        let who = &self.who;
        let state = self.channels.entry(channel).or_default();
        if seq == state.last + 1 {
            state.last = seq;
        } else if seq > state.last + 1 {
            state.holes.extend(state.last + 1..seq);
            state.last = seq;
        } else if state.holes.remove(&seq) {
            self.found.reorders += 1;
            self.found
                .note(|| format!("{who}: channel {channel} seq {seq} arrived after a later seq"));
        } else {
            self.found.duplicates += 1;
            self.found
                .note(|| format!("{who}: channel {channel} seq {seq} arrived twice"));
        }
    }

    /// Ends the check: in each channel this connection follows, every seq up to its
    /// `expected_last` should have arrived.
    pub fn finish(mut self, expected_last: &HashMap<i64, i64>) -> Violations {
        let who = &self.who;
        for (&channel, &last) in expected_last {
            let Some(state) = self.channels.get_mut(&channel) else {
                continue;
            };
            if last > state.last {
                state.holes.extend(state.last + 1..=last);
                state.last = last;
            }
        }
        for (channel, state) in &self.channels {
            if let Some(first) = state.holes.first() {
                self.found.missing += state.holes.len() as u64;
                let n = state.holes.len();
                self.found.note(|| {
                    format!("{who}: channel {channel} missing {n} seqs, the first {first}")
                });
            }
        }
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_gap_a_duplicate_and_a_reorder() {
        let mut c = Checker::new("conn 1");
        c.start(7, 0);
        for seq in [1, 2, 4, 3, 3, 6, 8] {
            c.observe(7, seq);
        }
        let found = c.finish(&HashMap::from([(7, 9), (8, 100)]));
        // 4 before 3: a reorder; 3 again: a duplicate; 5 and 7 never came, nor did 9.
        // Channel 8 is not this connection's.
        assert_eq!(found.reorders, 1);
        assert_eq!(found.duplicates, 1);
        assert_eq!(found.missing, 3);
        assert_eq!(found.total(), 5);
        assert_eq!(found.examples.len(), 3);
    }

    #[test]
    fn a_clean_stream_passes() {
        let mut c = Checker::new("conn 2");
        c.start(1, 10);
        c.start(2, 0);
        for (ch, seq) in [(1, 11), (2, 1), (1, 12), (2, 2)] {
            c.observe(ch, seq);
        }
        assert_eq!(
            c.finish(&HashMap::from([(1, 12), (2, 2)])),
            Violations::default()
        );
    }
}
