//! The fan-out rig's tasks: [`send`] (one sender's messages in a phase, open or closed
//! loop) and [`receive`] (one member's stream for the whole run, through its checker),
//! and what they tell the rig: [`Control`] in, [`Share`]s, [`Sent`] and [`Seen`] out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch};

use super::{SETTLE, bucket_of, count_in};
use crate::bench::alarm::Clock;
use crate::bench::check::{Checker, Violations};
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

/// One receiver's share of a phase.
pub(super) struct Share {
    pub(super) deliveries: u64,
    pub(super) latency_us: Histogram<u64>,
    pub(super) last_at: Option<Instant>,
    pub(super) caught_up: bool,
    /// Drops of the connection by close code (the client library resumes).
    pub(super) drops: BTreeMap<String, u64>,
}

impl Share {
    fn new() -> Self {
        Self {
            deliveries: 0,
            latency_us: receiver_histogram(),
            last_at: None,
            caught_up: true,
            drops: BTreeMap::new(),
        }
    }
}

/// What one receiver saw over the whole run.
pub(super) struct Seen {
    pub(super) violations: Violations,
    pub(super) per_bucket: Vec<u64>,
    pub(super) by_second: Timeline,
}

/// Two significant digits: a thousand receivers at 3 digits would cost ~128 MiB.
fn receiver_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

pub(super) struct SendPlan {
    pub(super) client_prefix: String,
    pub(super) channel: i64,
    /// Open loop: when to send each message, from the phase's start.
    pub(super) times: Vec<Duration>,
    /// Closed loop: how many to send, `window` in flight.
    pub(super) count: usize,
    pub(super) window: usize,
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
            if due_at > now || (!open_loop && next - answered(&sent) >= plan.window) {
                break;
            }
            let client_id = format!("{}{next}", plan.client_prefix);
            // The text carries the scheduled time, from which receivers measure.
            let text = format!("t{} {}", due_at.duration_since(start).as_micros(), plan.pad);
            rt.queue(plan.channel, &text, &client_id).await?;
            queued = true;
            due.insert(client_id, due_at);
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
        let wake = plan.times.get(next).map(|&t| phase_start + t);
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
                next < total && next - answered(&sent) < plan.window
            };
        tokio::select! {
            biased;
            incoming = tokio::time::timeout(SETTLE, rt.next()) => {
                let incoming = incoming.context("no answer from the server (or no reconnect) within 30 s")??;
                take_answer(&mut sent, &mut due, incoming, start, &plan.answered);
                // And the answers already read with it (a commit acks many sends at once).
                for _ in 0..plan.window.max(64) {
                    let Some(incoming) = rt.try_next() else { break };
                    take_answer(&mut sent, &mut due, incoming?, start, &plan.answered);
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
    answered: &AtomicU64,
) {
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
        }
        // The client library reconnects, resumes and resends what is unanswered.
        _ => {}
    }
}

/// Reads one member's stream through the checker for the whole run, handing the
/// controller its share of each phase once it has seen that phase's last events.
pub(super) async fn receive(
    mut rt: Realtime,
    mut checker: Checker,
    start: Instant,
    mut control: watch::Receiver<Control>,
    shares: mpsc::UnboundedSender<Share>,
) -> anyhow::Result<Seen> {
    let mut share = Share::new();
    let mut per_bucket = Vec::new();
    let mut by_second = Timeline::default();
    let mut phase = 0u32;
    let mut last_expected: Arc<HashMap<i64, i64>> = Arc::default();
    let mut deadline: Option<tokio::time::Instant> = None;
    // One timer for the whole run, moved only when the deadline changes: a timer set per
    // frame was a good part of a receiver's cost at ~200k frames/s.
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let timer = tokio::time::sleep_until(far());
    tokio::pin!(timer);
    let mut armed: Option<tokio::time::Instant> = None;
    loop {
        let now_control = control.borrow().clone();
        match now_control {
            Control::Finish => break,
            Control::PhaseEnd {
                phase: p,
                ref expected,
            } if p == phase => {
                last_expected = expected.clone();
                let reached = expected
                    .iter()
                    .all(|(c, last)| checker.position(*c).is_none_or(|p| p >= *last));
                let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                if reached || timed_out {
                    share.caught_up = reached;
                    let done = std::mem::replace(&mut share, Share::new());
                    if shares.send(done).is_err() {
                        break;
                    }
                    phase += 1;
                    deadline = None;
                    continue;
                }
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
            }
            _ => {}
        }
        if deadline != armed {
            timer.as_mut().reset(deadline.unwrap_or_else(far));
            armed = deadline;
        }
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = &mut timer => {
                // Past the hour with no deadline: set it again (a deadline that passed
                // is handled at the loop's top).
                if armed.is_none() {
                    timer.as_mut().reset(far());
                }
            }
            incoming = rt.next() => match incoming? {
                Incoming::Frame(Frame::Event(e)) => {
                    checker.observe(e.channel_id, e.seq);
                    if let Some(m) = e.message.filter(|_| e.kind == "message.created") {
                        let now = Instant::now();
                        share.deliveries += 1;
                        share.last_at = Some(now);
                        count_in(&mut per_bucket, bucket_of(start, now));
                        let sent = m.text.split(' ').next().and_then(|t| t.strip_prefix('t')).and_then(|t| t.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            let at = now.duration_since(start).as_micros() as u64;
                            let us = at.saturating_sub(sent).max(1);
                            let _ = share.latency_us.record(us);
                            by_second.record((sent / 1_000_000) as usize, us);
                        }
                    }
                }
                Incoming::Dropped { code } => {
                    let code = code.map_or_else(|| "no close frame".to_owned(), |c| c.to_string());
                    *share.drops.entry(code).or_default() += 1;
                }
                _ => {}
            },
        }
    }
    rt.close().await;
    Ok(Seen {
        violations: checker.finish(&last_expected),
        per_bucket,
        by_second,
    })
}
