//! Latency over time at a small, fixed cost: for each second of a run, a coarse log-scale
//! histogram (64 buckets, each 25 % wider than the last, from 50 µs to over a minute) of
//! the latencies of the messages *scheduled* in that second. A thousand receivers keeping
//! one each for a minute cost ~15 MiB, where HdrHistograms would cost gigabytes.

/// Bucket 0 ends at this many microseconds.
const FIRST_US: f64 = 50.0;
const GROWTH: f64 = 1.25;
const BUCKETS: usize = 64;

/// One coarse histogram of microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Coarse([u32; BUCKETS]);

impl Default for Coarse {
    fn default() -> Self {
        Self([0; BUCKETS])
    }
}

impl Coarse {
    fn bucket(us: u64) -> usize {
        if (us as f64) <= FIRST_US {
            return 0;
        }
        let i = ((us as f64 / FIRST_US).ln() / GROWTH.ln()).ceil() as usize;
        i.min(BUCKETS - 1)
    }

    /// The upper bound of bucket `i`, in microseconds.
    fn bound(i: usize) -> f64 {
        FIRST_US * GROWTH.powi(i as i32)
    }

    pub fn record(&mut self, us: u64) {
        let b = &mut self.0[Self::bucket(us)];
        *b = b.saturating_add(1);
    }

    pub fn add(&mut self, other: &Coarse) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|&n| u64::from(n)).sum()
    }

    /// The upper bound (µs) of the bucket holding quantile `q`; none when empty. Within
    /// 25 % of the true value.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &n) in self.0.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some(Self::bound(i));
            }
        }
        Some(Self::bound(BUCKETS - 1))
    }
}

/// A [`Coarse`] histogram per second since the run's start.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub seconds: Vec<Coarse>,
}

impl Timeline {
    pub fn record(&mut self, second: usize, us: u64) {
        if self.seconds.len() <= second {
            self.seconds.resize(second + 1, Coarse::default());
        }
        self.seconds[second].record(us);
    }

    pub fn add(&mut self, other: &Timeline) {
        if self.seconds.len() < other.seconds.len() {
            self.seconds.resize(other.seconds.len(), Coarse::default());
        }
        for (a, b) in self.seconds.iter_mut().zip(&other.seconds) {
            a.add(b);
        }
    }

    /// (second, quantile in ms) for every second with samples.
    pub fn quantile_ms(&self, q: f64) -> Vec<(f64, f64)> {
        self.seconds
            .iter()
            .enumerate()
            .filter_map(|(s, h)| Some((s as f64, h.quantile(q)? / 1000.0)))
            .collect()
    }

    /// One histogram of the seconds in `from..to`.
    pub fn span(&self, from: usize, to: usize) -> Coarse {
        let mut all = Coarse::default();
        for h in self.seconds.iter().take(to).skip(from) {
            all.add(h);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut h = Coarse::default();
        for us in 1..=10_000u64 {
            h.record(us * 10); // 10 µs .. 100 ms, uniform
        }
        for (q, truth) in [(0.5, 50_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q).unwrap();
            assert!(
                got >= truth && got <= truth * GROWTH,
                "q{q}: {got} vs {truth}"
            );
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(Coarse::default().quantile(0.5), None);
    }

    #[test]
    fn a_timeline_keeps_seconds_apart() {
        let mut t = Timeline::default();
        t.record(0, 1_000);
        t.record(2, 100_000);
        let mut u = Timeline::default();
        u.record(2, 100_000);
        t.add(&u);
        let p = t.quantile_ms(0.99);
        assert_eq!(p.len(), 2, "second 1 has no samples");
        assert_eq!(p[0].0, 0.0);
        assert!(p[0].1 >= 1.0 && p[0].1 < 1.25);
        assert!(p[1].1 >= 100.0 && p[1].1 < 125.0);
        assert_eq!(t.span(1, 3).count(), 2);
    }
}
