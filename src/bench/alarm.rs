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
        }
    }
}

/// The future of [`Clock::until`]. Each poll before the instant sets an alarm; one left
/// behind by a dropped or re-polled future wakes its task once, spuriously, at the
/// instant.
pub(crate) struct Until {
    shared: Arc<Shared>,
    at: Instant,
}

impl Future for Until {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
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
    async fn tasks_wake_at_their_instants_in_any_order_of_setting() {
        let alarm = Alarm::start().unwrap();
        let start = Instant::now();
        // Set latest first, so each later setting is a new earliest.
        let offsets_ms = [40u64, 30, 20, 10, 25, 5];
        let tasks: Vec<_> = offsets_ms
            .iter()
            .map(|&ms| {
                let clock = alarm.clock();
                let at = start + Duration::from_millis(ms);
                tokio::spawn(async move {
                    clock.until(at).await;
                    Instant::now()
                })
            })
            .collect();
        for (task, ms) in tasks.into_iter().zip(offsets_ms) {
            let woke = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the alarm woke the task")
                .unwrap();
            let at = start + Duration::from_millis(ms);
            assert!(woke >= at, "woke {:?} before its instant", at - woke);
            // Generous: a loaded machine may run the task late, but not by a second.
            assert!(
                woke - at < Duration::from_secs(1),
                "woke {:?} late",
                woke - at
            );
        }
        // A passed instant is ready at once.
        alarm.clock().until(start).await;
        drop(alarm);
    }
}
