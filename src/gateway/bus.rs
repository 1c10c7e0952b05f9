//! The bus carries committed events (and ephemeral typing signals) from the writer to the
//! hubs that deliver them. [`LocalBus`] is the in-process one: a fan-out thread takes each
//! committed batch in commit order, encodes every event once, adds it to the hot-channel
//! cache and dispatches it. A clustered bus (NATS) implements the same trait later.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use super::cache::EventCache;
use super::hub::Hub;
use super::outbox::Delivery;
use crate::model::Event;

pub trait Bus: Send + Sync {
    /// Committed events, called in commit order. May wait when fan-out is behind: that is
    /// the writer's backpressure.
    fn publish(&self, events: Vec<Event>);
    /// An ephemeral signal; dropped rather than queued when fan-out is behind.
    fn typing(&self, channel_id: i64, user_id: i64);
}

/// Batches the fan-out thread may have queued before `publish` waits.
const QUEUED_BATCHES: usize = 1024;

enum Fanout {
    Events(Vec<Event>),
    Typing { channel_id: i64, user_id: i64 },
}

pub struct LocalBus {
    tx: SyncSender<Fanout>,
    cache: Arc<EventCache>,
}

impl LocalBus {
    /// Starts the fan-out thread; it stops when the bus is dropped.
    pub fn start(hub: Arc<Hub>, cache: Arc<EventCache>) -> (Self, JoinHandle<()>) {
        let (tx, rx) = sync_channel(QUEUED_BATCHES);
        let fanout_cache = Arc::clone(&cache);
        let handle = std::thread::Builder::new()
            .name("natter-fanout".into())
            .spawn(move || fan_out(&hub, &fanout_cache, rx))
            .expect("spawn the fan-out thread");
        (Self { tx, cache }, handle)
    }
}

impl Bus for LocalBus {
    fn publish(&self, events: Vec<Event>) {
        // Counted before the writer answers anyone: a cache read waits for this batch.
        self.cache.mark_published();
        // The writer holds this sender, so the thread can only be gone if it panicked. The
        // events are committed; clients find them by resuming, and history reads fall back
        // to the store, but nothing is delivered live any more.
        if self.tx.send(Fanout::Events(events)).is_err() {
            tracing::error!(
                "fan-out thread is gone; committed events are no longer delivered live"
            );
        }
    }

    fn typing(&self, channel_id: i64, user_id: i64) {
        match self.tx.try_send(Fanout::Typing {
            channel_id,
            user_id,
        }) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn fan_out(hub: &Hub, cache: &EventCache, rx: Receiver<Fanout>) {
    let mut batch = Vec::new();
    let mut batches = 0;
    while let Ok(first) = rx.recv() {
        // Take whatever else is queued, so a busy writer's batches are dispatched together.
        for msg in std::iter::once(first).chain(rx.try_iter().take(QUEUED_BATCHES)) {
            match msg {
                Fanout::Events(events) => {
                    batch.extend(events.into_iter().map(Delivery::new));
                    batches += 1;
                }
                Fanout::Typing {
                    channel_id,
                    user_id,
                } => {
                    flush(hub, cache, &mut batch, &mut batches);
                    hub.typing(channel_id, user_id);
                }
            }
        }
        flush(hub, cache, &mut batch, &mut batches);
    }
}

/// Caches, then dispatches: a connection that sees an event can read everything before
/// it from the cache.
fn flush(hub: &Hub, cache: &EventCache, batch: &mut Vec<Arc<Delivery>>, batches: &mut u64) {
    if !batch.is_empty() {
        cache.append(batch);
    }
    if *batches > 0 {
        cache.mark_applied(*batches);
        *batches = 0;
    }
    hub.dispatch(batch);
    batch.clear();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::gateway::stats::Stats;
    use crate::model::{EventBody, Role};

    fn event(channel_id: i64, seq: i64) -> Event {
        Event {
            channel_id,
            seq,
            at: 0,
            body: EventBody::MemberAdded {
                user_id: 1,
                role: Role::Member,
            },
        }
    }

    /// Regression: the writer once published without counting the batch, so reads that
    /// waited for the cache to catch up did not wait, and could miss acknowledged writes.
    #[tokio::test]
    async fn a_caught_up_cache_holds_every_published_event() {
        let hub = Arc::new(Hub::new(Arc::new(Stats::default())));
        let cache = Arc::new(EventCache::new(1 << 30));
        let (bus, _fanout) = LocalBus::start(hub, Arc::clone(&cache));
        // A big batch keeps the fan-out thread busy while the next one waits in its queue.
        bus.publish((1..=50_000).map(|seq| event(1, seq)).collect());
        bus.publish(vec![event(2, 1)]);
        assert!(cache.catch_up(Duration::from_secs(30)).await);
        let (page, _) = cache.read(2, 0, 10).expect("channel 2 is cached");
        assert_eq!(page.len(), 1);
    }
}
