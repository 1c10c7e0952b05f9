//! A clock for open-loop schedules: it wakes a task at its instant to within tens of
//! microseconds. Tokio's timer (a wheel of 1 ms ticks, its park rounded up to the next
//! millisecond) sent a scheduled message 0.9–1.6 ms late at p50, and every latency
//! counted from the schedule carried that lateness, which was the load tool's, not the
//! server's.
//!
//! One thread holds the pending instants in a heap and sleeps on a condition variable
//! until the earliest (a futex with a timeout: a high-resolution timer, its slack set to
//! 10 µs for this thread); an instant earlier than the earliest wakes it to sleep less.
//! The thread stops when the [`Alarm`] is dropped.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

/// The thread's timer slack: how late the kernel may wake it past its instant.
const SLACK_NS: libc::c_ulong = 10_000;

pub(crate) struct Alarm {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A cheap handle that sets alarms; the thread lives as long as the [`Alarm`].
#[derive(Clone)]
pub(crate) struct Clock {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    pending: BinaryHeap<Entry>,
    stop: bool,
}

/// Ordered so that the heap's top is the earliest instant.
struct Entry {
    at: Instant,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

impl Alarm {
    pub(crate) fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let ring = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bench-alarm".into())
            .spawn(move || ring.run())?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    pub(crate) fn clock(&self) -> Clock {
        Clock {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run(&self) {
        // Best effort: at the default 50 µs slack the wake-ups are only a little later.
        // SAFETY: PR_SET_TIMERSLACK takes a value and touches no memory of ours.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0) };
        let mut due = Vec::new();
        let mut state = self.lock();
        loop {
            if state.stop {
                return;
            }
            let now = Instant::now();
            while state.pending.peek().is_some_and(|e| e.at <= now) {
                due.extend(state.pending.pop().map(|e| e.waker));
            }
            if !due.is_empty() {
                drop(state);
                due.drain(..).for_each(Waker::wake);
                state = self.lock();
                continue;
            }
            state = match state.pending.peek().map(|e| e.at - now) {
                Some(wait) => {
                    self.changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
    }
}

impl Clock {
    /// Completes at `at` (at once if it has passed).
    pub(crate) fn until(&self, at: Instant) -> Until {
        Until {
            shared: self.shared.clone(),
            at,
            set_for: None,
        }
    }
}

/// The future of [`Clock::until`]. Its first poll before the instant sets an alarm (and
/// a poll from another task sets one for it); an alarm left behind by a dropped future
/// wakes its task once, spuriously, at the instant.
pub(crate) struct Until {
    shared: Arc<Shared>,
    at: Instant,
    /// The waker the alarm set so far will wake.
    set_for: Option<Waker>,
}

impl Until {
    pub(crate) fn at(&self) -> Instant {
        self.at
    }
}

impl Future for Until {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        if self
            .set_for
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        self.set_for = Some(cx.waker().clone());
        let mut state = self.shared.lock();
        let earliest = state.pending.peek().is_none_or(|e| self.at < e.at);
        state.pending.push(Entry {
            at: self.at,
            waker: cx.waker().clone(),
        });
        drop(state);
        if earliest {
            self.shared.changed.notify_one();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_alarm_wakes_at_its_instant_though_a_later_one_was_set_first() {
        let alarm = Alarm::start().unwrap();
        let clock = alarm.clock();
        let start = Instant::now();
        // Set in this order (the first poll below goes through them in turn): the thread
        // first sleeps towards 2 s, and each later setting is a new earliest.
        let offsets = [2000u64, 1500, 300, 100, 50].map(Duration::from_millis);
        let mut waits: Vec<Until> = offsets.iter().map(|&d| clock.until(start + d)).collect();
        let mut woke: Vec<Option<Instant>> = vec![None; waits.len()];
        let all = std::future::poll_fn(|cx| {
            for (wait, woke) in waits.iter_mut().zip(woke.iter_mut()) {
                if woke.is_none() && Pin::new(wait).poll(cx).is_ready() {
                    *woke = Some(Instant::now());
                }
            }
            if woke.iter().all(Option::is_some) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("the alarms woke the task");
        let woke: Vec<Duration> = woke.iter().map(|w| w.unwrap() - start).collect();
        // A thread that slept towards its first alarm would wake the 50 ms one at 2 s.
        assert!(woke[4] < Duration::from_millis(1500), "{woke:?}");
        for (woke, offset) in woke.iter().zip(offsets) {
            // Generous: a loaded machine may run the task late, but not by a second.
            assert!(
                *woke - offset < Duration::from_secs(1),
                "{woke:?} for {offset:?}"
            );
        }

        // A future polled again by the same task sets no second alarm.
        let mut far = clock.until(start + Duration::from_secs(3600));
        std::future::poll_fn(|cx| {
            for _ in 0..3 {
                assert!(Pin::new(&mut far).poll(cx).is_pending());
            }
            Poll::Ready(())
        })
        .await;
        assert_eq!(alarm.shared.lock().pending.len(), 1);
        // A passed instant is ready at once.
        clock.until(start).await;
        drop(alarm);
    }
}
