//! Snowflake ids: 41 bits of milliseconds since [`EPOCH_MS`], 10 bits of node id, 12 bits of
//! sequence. Time-ordered, unique per node, and safe when the wall clock steps backwards.

/// 2024-01-01T00:00:00Z in milliseconds since the Unix epoch.
pub const EPOCH_MS: i64 = 1_704_067_200_000;
/// The largest node id (10 bits).
pub const MAX_NODE_ID: u16 = (1 << NODE_BITS) - 1;

const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const MAX_SEQ: u16 = (1 << SEQ_BITS) - 1;

/// Hands out Snowflake ids for one node. Not shared between threads: the store's single
/// writer owns one.
#[derive(Debug)]
pub struct Snowflake {
    node: u16,
    /// Milliseconds since [`EPOCH_MS`] of the last id handed out. Never decreases.
    last_ms: i64,
    seq: u16,
}

impl Snowflake {
    /// A generator for `node` (at most [`MAX_NODE_ID`]).
    pub fn new(node: u16) -> Self {
        assert!(node <= MAX_NODE_ID, "node id {node} exceeds {MAX_NODE_ID}");
        Self {
            node,
            last_ms: 0,
            seq: 0,
        }
    }

    /// Hands out only ids above `id` from now on (the largest id already stored): ids stay
    /// unique across a restart whose clock stepped back.
    pub fn resume_after(&mut self, id: i64) {
        let ms = id >> (NODE_BITS + SEQ_BITS);
        if ms > self.last_ms {
            self.last_ms = ms;
            self.seq = (id & i64::from(MAX_SEQ)) as u16;
        }
    }

    /// The next id, given the wall clock in milliseconds since the Unix epoch.
    ///
    /// If the clock went backwards, or 4096 ids were already handed out in this
    /// millisecond, the id borrows the next millisecond instead of waiting: ids stay unique
    /// and increasing, and drift back to the wall clock once it catches up.
    pub fn next_id(&mut self, now_unix_ms: i64) -> i64 {
        let now = (now_unix_ms - EPOCH_MS).max(0);
        if now > self.last_ms {
            self.last_ms = now;
            self.seq = 0;
        } else if self.seq < MAX_SEQ {
            self.seq += 1;
        } else {
            self.last_ms += 1;
            self.seq = 0;
        }
        (self.last_ms << (NODE_BITS + SEQ_BITS))
            | (i64::from(self.node) << SEQ_BITS)
            | i64::from(self.seq)
    }
}

/// The Unix-epoch milliseconds encoded in a Snowflake id.
pub fn timestamp_ms(id: i64) -> i64 {
    (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = EPOCH_MS + 1_000_000;

    #[test]
    fn ids_resumed_after_a_stored_one_stay_above_it_when_the_clock_stepped_back() {
        let stored = Snowflake::new(3).next_id(T + 5_000);
        let mut g = Snowflake::new(7);
        g.resume_after(stored);
        let next = g.next_id(T);
        assert!(next > stored, "{next} > {stored}");
        // A resume never moves a generator backwards.
        g.resume_after(Snowflake::new(3).next_id(T));
        assert!(g.next_id(T) > next);
    }

    #[test]
    fn ids_increase_within_and_across_milliseconds() {
        let mut g = Snowflake::new(7);
        let a = g.next_id(T);
        let b = g.next_id(T);
        let c = g.next_id(T + 1);
        assert!(a < b && b < c);
        assert_eq!(timestamp_ms(a), T);
        assert_eq!((a >> SEQ_BITS) & i64::from(MAX_NODE_ID), 7);
    }

    #[test]
    fn clock_stepping_backwards_never_repeats_an_id() {
        let mut g = Snowflake::new(1);
        let before = g.next_id(T + 500);
        let after = g.next_id(T);
        assert!(after > before);
        assert_eq!(timestamp_ms(after), T + 500);
    }

    #[test]
    fn sequence_overflow_borrows_the_next_millisecond() {
        let mut g = Snowflake::new(0);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = g.next_id(T);
            assert!(id > last);
            last = id;
        }
        assert!(timestamp_ms(last) > T);
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn rejects_node_ids_over_ten_bits() {
        Snowflake::new(1024);
    }
}
