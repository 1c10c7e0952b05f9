//! The fan-out rig's senders, [`send`] (one sender's messages in a phase, open or closed
//! loop), and what the rig and its receivers ([`super::members`]) tell each other:
//! [`Control`] in, [`Share`]s, [`Sent`] and [`Seen`] out, latencies into [`Tallies`].

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use super::{SETTLE, bucket_of, count_in};
use crate::bench::alarm::Clock;
use crate::bench::check::Violations;
use crate::bench::histogram;
use crate::bench::timeline::Timeline;
use crate::client::{Frame, Incoming, Realtime};

/// What the controller tells the receivers.
#[derive(Debug, Clone)]
pub(super) enum Control {
    Running,
    /// Phase `phase` is over once every channel has reached these seqs.
    PhaseEnd {
        phase: u32,
        expected: Arc<HashMap<i64, i64>>,
    },
    /// Close and report.
    Finish,
}

/// One receiver's share of a phase (its latencies are counted in the [`Tallies`]).
pub(super) struct Share {
    pub(super) deliveries: u64,
    pub(super) last_at: Option<Instant>,
    pub(super) caught_up: bool,
    /// Drops of the connection by close code (the client library resumes).
    pub(super) drops: BTreeMap<String, u64>,
}

impl Share {
    pub(super) fn new() -> Self {
        Self {
            deliveries: 0,
            last_at: None,
            caught_up: true,
            drops: BTreeMap::new(),
        }
    }
}

/// What one receiver's checker found over the whole run.
pub(super) struct Seen {
    pub(super) violations: Violations,
}

/// What the receivers running on one load thread count together: send→deliver latency
/// by phase, deliveries by time bucket, latency by second.
#[derive(Default)]
pub(super) struct Tally {
    latency_us: BTreeMap<u32, Histogram<u64>>,
    per_bucket: Vec<u64>,
    by_second: Timeline,
}

/// The receivers' counts, a [`Tally`] for each load thread that ran a receiver. Each
/// receiver counted in its own histogram and series before: at a thousand receivers
/// every delivery's counts landed in memory out of cache (a tenth of the load tool's
/// time, which shares the server's two cores). A thread's tally stays in cache.
pub(super) struct Tallies {
    id: u64,
    all: Mutex<Vec<Arc<Mutex<Tally>>>>,
}

thread_local! {
    /// This thread's tally in each live set of tallies (a process may run several rigs).
    static MINE: RefCell<Vec<(u64, Weak<Mutex<Tally>>)>> = const { RefCell::new(Vec::new()) };
}

impl Tallies {
    pub(super) fn new() -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Arc::new(Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            all: Mutex::new(Vec::new()),
        })
    }

    /// Counts into the calling thread's tally.
    fn count(&self, f: impl FnOnce(&mut Tally)) {
        let tally = MINE.with_borrow_mut(|mine| {
            if let Some(t) = mine
                .iter()
                .find(|(id, _)| *id == self.id)
                .and_then(|(_, t)| t.upgrade())
            {
                return t;
            }
            // A miss (this rig's first count here): drop the entries of rigs that ended.
            mine.retain(|(_, t)| t.strong_count() > 0);
            let t = Arc::new(Mutex::new(Tally::default()));
            lock(&self.all).push(t.clone());
            mine.push((self.id, Arc::downgrade(&t)));
            t
        });
        f(&mut lock(&tally));
    }

    /// Takes phase `phase`'s send→deliver latencies, from every thread (each receiver
    /// counts its deliveries before it hands in its share, so once all shares are in,
    /// all are).
    pub(super) fn phase_latency(&self, phase: u32) -> anyhow::Result<Histogram<u64>> {
        let mut all = histogram();
        for t in lock(&self.all).iter() {
            if let Some(h) = lock(t).latency_us.remove(&phase) {
                all.add(&h)?;
            }
        }
        Ok(all)
    }

    /// Deliveries by time bucket and latency by second, over the run.
    pub(super) fn series(&self) -> (Vec<u64>, Timeline) {
        let mut per_bucket = Vec::new();
        let mut by_second = Timeline::default();
        for t in lock(&self.all).iter() {
            let t = lock(t);
            super::merge(&mut per_bucket, &t.per_bucket);
            by_second.add(&t.by_second);
        }
        (per_bucket, by_second)
    }
}

/// A tally's lock: a receiver that panicked while counting left numbers, not a hazard.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How far the receivers are behind the senders, over the run: messages sent, and the
/// deliveries of them the members saw (a message is one delivery per member of its
/// channel; one refused counts as delivered to all).
#[derive(Default)]
pub(super) struct Progress {
    pub(super) sent: AtomicU64,
    pub(super) delivered: AtomicU64,
}

impl Progress {
    /// Messages sent and not yet seen by the members (on average, each message going to
    /// `members`).
    fn undelivered(&self, members: u64) -> u64 {
        let delivered = self.delivered.load(Ordering::Relaxed) / members.max(1);
        self.sent.load(Ordering::Relaxed).saturating_sub(delivered)
    }
}

pub(super) struct SendPlan {
    pub(super) client_prefix: String,
    pub(super) channel: i64,
    /// Open loop: when to send each message, from the phase's start.
    pub(super) times: Vec<Duration>,
    /// Closed loop: how many to send, `window` in flight, and at most `behind` sent by
    /// all the senders together and not yet delivered ([`Progress`]): as fast as the
    /// server acknowledges *and* delivers, not faster than the fan-out can go.
    pub(super) count: usize,
    pub(super) window: usize,
    pub(super) behind: u64,
    pub(super) progress: Arc<Progress>,
    /// Members of each channel: the deliveries a message makes.
    pub(super) members: u64,
    pub(super) pad: String,
    pub(super) answered: Arc<AtomicU64>,
    /// Wakes the sender at its scheduled times (Tokio's timer is a millisecond late).
    pub(super) clock: Clock,
}

/// What one sender saw in a phase.
pub(super) struct Sent {
    pub(super) acked: u64,
    pub(super) errors: HashMap<String, u64>,
    pub(super) latency_us: Histogram<u64>,
    /// Open loop: how long after its scheduled time each send was written.
    pub(super) late_us: Histogram<u64>,
    pub(super) per_bucket: Vec<u64>,
    pub(super) by_second: Timeline,
    pub(super) last_at: Option<Instant>,
}

/// How soon a closed-loop sender held back by the fan-out looks again.
const HELD_LOOK: Duration = Duration::from_micros(250);

/// Sends one phase's messages: on a schedule (open loop) or with a window in flight.
/// Returns the socket for the next phase.
pub(super) async fn send(
    mut rt: Realtime,
    plan: SendPlan,
    start: Instant,
    phase_start: Instant,
) -> anyhow::Result<(Realtime, Sent)> {
    let mut sent = Sent {
        acked: 0,
        errors: HashMap::new(),
        latency_us: histogram(),
        late_us: histogram(),
        per_bucket: Vec::new(),
        by_second: Timeline::default(),
        last_at: None,
    };
    let open_loop = !plan.times.is_empty();
    let total = if open_loop {
        plan.times.len()
    } else {
        plan.count
    };
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut next = 0usize;
    // One alarm per scheduled wake, kept across the loop's turns (each turn's reads would
    // otherwise set another); until the first is due, one already passed.
    let mut alarm = plan.clock.until(phase_start);
    let answered = |s: &Sent| s.acked as usize + s.errors.values().sum::<u64>() as usize;
    let held = |next: usize, s: &Sent| {
        !open_loop
            && next < total
            && next - answered(s) < plan.window
            && plan.progress.undelivered(plan.members) >= plan.behind
    };
    // Since when the fan-out alone has held this sender back.
    let mut held_since: Option<Instant> = None;
    while answered(&sent) < total {
        // Send everything due now (a sleep, even to a time already past, costs a timer
        // tick of ~1 ms), in bursts of at most 64 so answers are read in between, written
        // out together: one system call for the burst, as a client with several sends
        // ready would (a `sendto` per message was a third of the load tool's CPU).
        let now = Instant::now();
        let mut queued = false;
        let first = next;
        for _ in 0..64 {
            let due_at = match plan.times.get(next) {
                Some(&t) => phase_start + t,
                None if !open_loop && next < total => now,
                None => break,
            };
            if due_at > now
                || (!open_loop
                    && (next - answered(&sent) >= plan.window
                        || plan.progress.undelivered(plan.members) >= plan.behind))
            {
                break;
            }
            let client_id = format!("{}{next}", plan.client_prefix);
            // The text carries the scheduled time, from which receivers measure.
            let text = format!("t{} {}", due_at.duration_since(start).as_micros(), plan.pad);
            rt.queue(plan.channel, &text, &client_id).await?;
            queued = true;
            due.insert(client_id, due_at);
            plan.progress.sent.fetch_add(1, Ordering::Relaxed);
            next += 1;
        }
        if queued {
            rt.flush().await?;
            // Disconnected, nothing went out: the client library resends after it
            // reconnects, unmeasured.
            if open_loop && rt.is_connected() {
                let written = Instant::now();
                for &t in &plan.times[first..next] {
                    let late = written.saturating_duration_since(phase_start + t);
                    let _ = sent.late_us.record(late.as_micros().max(1) as u64);
                }
            }
        }
        // Held back by the fan-out alone: look again in a moment (no answer may be due).
        // (Read once per turn: the counters move under it.)
        let held = held(next, &sent);
        if !held {
            held_since = None;
        } else if held_since.get_or_insert_with(Instant::now).elapsed() > SETTLE {
            anyhow::bail!("the members stayed `--lag` messages behind for 30 s");
        }
        let wake = match plan.times.get(next) {
            Some(&t) => Some(phase_start + t),
            None if held => Some(Instant::now() + HELD_LOOK),
            None => None,
        };
        // Behind schedule, or room in the window: read what has arrived, then go straight
        // back to sending. Not while disconnected: the read reconnects, and is let finish.
        let connected = rt.is_connected();
        if let Some(at) = wake.filter(|&at| at != alarm.at()) {
            alarm = plan.clock.until(at);
        }
        let overdue = connected
            && if open_loop {
                wake.is_some_and(|w| w <= Instant::now())
            } else {
                next < total && next - answered(&sent) < plan.window && !held
            };
        tokio::select! {
            biased;
            incoming = tokio::time::timeout(SETTLE, rt.next()) => {
                let incoming = incoming.context("no answer from the server (or no reconnect) within 30 s")??;
                take_answer(&mut sent, &mut due, incoming, start, &plan);
                // And the answers already read with it (a commit acks many sends at once).
                for _ in 0..plan.window.max(64) {
                    let Some(incoming) = rt.try_next() else { break };
                    take_answer(&mut sent, &mut due, incoming?, start, &plan);
                }
            }
            () = std::future::ready(()), if overdue => {}
            () = &mut alarm, if wake.is_some() && !overdue && connected => {}
        }
    }
    Ok((rt, sent))
}

/// Counts an answer to one of this sender's sends (an `ack` or an `error` naming its
/// `client_id`); anything else is left to the client library.
fn take_answer(
    sent: &mut Sent,
    due: &mut HashMap<String, Instant>,
    incoming: Incoming,
    start: Instant,
    plan: &SendPlan,
) {
    let answered = &plan.answered;
    let now = Instant::now();
    match incoming {
        Incoming::Frame(Frame::Ack { client_id, .. }) => {
            if let Some(at) = due.remove(&client_id) {
                sent.acked += 1;
                let us = (now - at).as_micros().max(1) as u64;
                let _ = sent.latency_us.record(us);
                sent.by_second
                    .record(at.duration_since(start).as_secs() as usize, us);
                count_in(&mut sent.per_bucket, bucket_of(start, now));
                sent.last_at = Some(now);
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }
        Incoming::Frame(Frame::Error {
            client_id: Some(c),
            code,
            ..
        }) if due.remove(&c).is_some() => {
            *sent.errors.entry(code).or_default() += 1;
            sent.last_at = Some(now);
            answered.fetch_add(1, Ordering::Relaxed);
            // Never delivered: not behind either.
            plan.progress
                .delivered
                .fetch_add(plan.members, Ordering::Relaxed);
        }
        // The client library reconnects, resumes and resends what is unanswered.
        _ => {}
    }
}

/// Counts one delivery of a `message.created` at `now` in phase `phase`, with its send
/// time (µs since `start`) if its text carries one.
pub(super) fn count_delivery(
    tallies: &Tallies,
    start: Instant,
    phase: u32,
    now: Instant,
    sent: Option<u64>,
) {
    tallies.count(|t| {
        count_in(&mut t.per_bucket, bucket_of(start, now));
        if let Some(sent) = sent {
            let at = now.duration_since(start).as_micros() as u64;
            let us = at.saturating_sub(sent).max(1);
            let _ = t
                .latency_us
                .entry(phase)
                .or_insert_with(histogram)
                .record(us);
            t.by_second.record((sent / 1_000_000) as usize, us);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts one delivery of `us` in phase `phase`, at `ms` into the run.
    fn count(tallies: &Tallies, phase: u32, us: u64, ms: usize) {
        tallies.count(|t| {
            t.latency_us
                .entry(phase)
                .or_insert_with(histogram)
                .record(us)
                .unwrap();
            count_in(
                &mut t.per_bucket,
                ms / super::super::BUCKET.as_millis() as usize,
            );
            t.by_second.record(ms / 1000, us);
        });
    }

    #[test]
    fn progress_counts_messages_not_yet_seen_by_every_member() {
        let p = Progress::default();
        p.sent.fetch_add(5, Ordering::Relaxed);
        assert_eq!(p.undelivered(3), 5);
        // Two messages to all three members, and a third to one of them.
        p.delivered.fetch_add(7, Ordering::Relaxed);
        assert_eq!(p.undelivered(3), 3);
        p.delivered.fetch_add(8, Ordering::Relaxed);
        assert_eq!(p.undelivered(3), 0);
        // More seen than sent (a duplicate, or a refusal counted as delivered): none.
        p.delivered.fetch_add(9, Ordering::Relaxed);
        assert_eq!(p.undelivered(3), 0);
    }

    #[test]
    fn tallies_sum_every_thread_by_phase_and_keep_each_rig_apart() {
        let a = Tallies::new();
        let b = Tallies::new();
        count(&a, 0, 100, 0);
        count(&b, 0, 7, 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                count(&a, 0, 300, 1500);
                count(&a, 1, 900, 2500);
            });
        });
        count(&a, 1, 500, 2500);
        assert_eq!(lock(&a.all).len(), 2, "one tally per thread");
        let zero = a.phase_latency(0).unwrap();
        assert_eq!((zero.len(), zero.min(), zero.max()), (2, 100, 300));
        let one = a.phase_latency(1).unwrap();
        assert_eq!((one.len(), one.min()), (2, 500));
        assert_eq!(a.phase_latency(2).unwrap().len(), 0);
        assert_eq!(
            a.phase_latency(0).unwrap().len(),
            0,
            "a phase's counts are taken once"
        );
        let (per_bucket, by_second) = a.series();
        assert_eq!(per_bucket.iter().sum::<u64>(), 4);
        assert_eq!(by_second.quantile_ms(1.0).len(), 3, "seconds 0, 1 and 2");
        let other = b.phase_latency(0).unwrap();
        assert_eq!(
            (other.len(), other.max()),
            (1, 7),
            "the other rig's count only"
        );
        // A rig's tallies go with it; the thread's entry for it is dropped when another
        // rig first counts here.
        drop(a);
        let c = Tallies::new();
        count(&c, 0, 8, 0);
        assert_eq!(MINE.with_borrow(Vec::len), 2, "b's and c's");
    }
}
