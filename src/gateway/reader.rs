//! How the gateway and the history endpoints read a channel's log and messages: from the
//! hot-channel cache when it holds the answer, else from the store, with concurrent
//! identical store reads coalesced into one (as Discord's data services do). Callers have
//! checked membership.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::cache::EventCache;
use super::outbox::Delivery;
use super::stats::Stats;
use crate::config::{Feature, Features};
use crate::model::{HistoryQuery, Message, Page};
use crate::store::{ReadFence, Store, StoreError};

/// How long a history read waits for fan-out to catch up with acknowledged writes before
/// it goes to the store instead.
const CATCH_UP: Duration = Duration::from_millis(50);

type LogPage = Arc<(Vec<Arc<Delivery>>, bool)>;
/// (channel, after seq, limit, fence). Reads share an answer only under the same fence,
/// so no reader gets a page from a replica that has not replayed its writes.
type LogKey = (i64, i64, u32, ReadFence);
/// (channel, before seq, after seq, limit, fence, through): a history read is shared
/// only with readers that knew the same newest seq, so the leading read began after
/// that seq committed and its answer holds it.
type HistoryKey = (i64, Option<i64>, Option<i64>, u32, ReadFence, i64);

pub struct EventReader {
    cache: Arc<EventCache>,
    store: Arc<dyn Store>,
    logs: Coalescer<LogKey, LogPage>,
    histories: Coalescer<HistoryKey, Arc<Page<Message>>>,
    stats: Arc<Stats>,
    features: Arc<Features>,
}

impl EventReader {
    pub fn new(
        cache: Arc<EventCache>,
        store: Arc<dyn Store>,
        stats: Arc<Stats>,
        features: Arc<Features>,
    ) -> Self {
        Self {
            cache,
            store,
            logs: Coalescer::default(),
            histories: Coalescer::default(),
            stats,
            features,
        }
    }

    /// The stats, if identical reads may be shared now (the `read-coalescing` flag).
    fn sharing(&self) -> Option<&Stats> {
        self.features
            .enabled(Feature::ReadCoalescing)
            .then_some(&*self.stats)
    }

    fn hit(&self) {
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    fn miss(&self) {
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Up to `limit` events of the channel after `after_seq`, where the events through
    /// `through` are known to exist (committed, on any node): the cache answers only when
    /// it holds all of the page it is asked, else the store does.
    /// The gateway's reads (`fence` [`ReadFence::PRIMARY`]) follow the primary's commits.
    pub async fn read_range(
        &self,
        channel_id: i64,
        after_seq: i64,
        through: i64,
        limit: u32,
        fence: ReadFence,
    ) -> Result<LogPage, StoreError> {
        let need = through.min(after_seq.saturating_add(i64::from(limit)));
        if let Some(hit) = self.cache.read(channel_id, after_seq, limit as usize)
            && hit.0.last().map_or(after_seq, |d| d.seq) >= need
        {
            self.hit();
            return Ok(Arc::new(hit));
        }
        self.miss();
        let read = |sharing| {
            let store = Arc::clone(&self.store);
            self.logs
                .run((channel_id, after_seq, limit, fence), sharing, async move {
                    let page = store.log(channel_id, after_seq, limit, fence).await?;
                    Ok(Arc::new((
                        page.items.into_iter().map(Delivery::new).collect(),
                        page.has_more,
                    )))
                })
        };
        let page = read(self.sharing()).await?;
        // A shared read may have begun before events this caller knows of committed (on
        // another node, say): then it reads again, alone.
        if page.0.last().map_or(after_seq, |d| d.seq) < need && !page.1 {
            return read(None).await;
        }
        Ok(page)
    }

    /// Like [`EventReader::read_range`] for a reader that must see every acknowledged
    /// write: `through` is the channel's newest seq as the store showed it after the
    /// caller's membership check; this node's own writes are waited for briefly.
    pub async fn read_committed(
        &self,
        channel_id: i64,
        after_seq: i64,
        through: i64,
        limit: u32,
        fence: ReadFence,
    ) -> Result<LogPage, StoreError> {
        self.cache.catch_up(CATCH_UP).await;
        self.read_range(channel_id, after_seq, through, limit, fence)
            .await
    }

    /// A page of history, seeing every write acknowledged before the call: `through` is
    /// the channel's newest seq as the store showed it after the caller's membership check.
    pub async fn history(
        &self,
        channel_id: i64,
        q: HistoryQuery,
        through: i64,
        fence: ReadFence,
    ) -> Result<Arc<Page<Message>>, StoreError> {
        if self.cache.catch_up(CATCH_UP).await
            && let Some(page) = self.cache.history(channel_id, q, through)
        {
            self.hit();
            return Ok(Arc::new(page));
        }
        self.miss();
        let store = Arc::clone(&self.store);
        self.histories
            .run(
                (
                    channel_id,
                    q.before_seq,
                    q.after_seq,
                    q.limit,
                    fence,
                    through,
                ),
                self.sharing(),
                async move { Ok(Arc::new(store.history(channel_id, q, fence).await?)) },
            )
            .await
    }
}

type Shared<V> = Result<V, String>;

/// Runs one read per key at a time; callers that ask for a key already being read wait
/// for that read's answer instead of reading again.
struct Coalescer<K, V> {
    in_flight: Mutex<HashMap<K, Vec<oneshot::Sender<Shared<V>>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Self {
            in_flight: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash + Copy, V: Clone> Coalescer<K, V> {
    async fn run(
        &self,
        key: K,
        sharing: Option<&Stats>,
        read: impl Future<Output = Result<V, StoreError>>,
    ) -> Result<V, StoreError> {
        let Some(stats) = sharing else {
            return read.await;
        };
        let waiter = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match in_flight.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    in_flight.insert(key, Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            stats.coalesced_reads.fetch_add(1, Ordering::Relaxed);
            return match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(StoreError::internal("coalesced read", e)),
                // The leading read was cancelled: read alone.
                Err(_) => read.await,
            };
        }
        // This read leads; the guard hands its answer (or, if it is cancelled, nothing) to
        // every caller that joined meanwhile.
        let mut lead = Lead {
            coalescer: self,
            key,
            result: None,
        };
        let result = read.await;
        lead.result = Some(match &result {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(e.to_string()),
        });
        drop(lead);
        result
    }
}

struct Lead<'a, K: Eq + Hash, V: Clone> {
    coalescer: &'a Coalescer<K, V>,
    key: K,
    result: Option<Shared<V>>,
}

impl<K: Eq + Hash, V: Clone> Drop for Lead<'_, K, V> {
    fn drop(&mut self) {
        let waiters = self
            .coalescer
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key)
            .unwrap_or_default();
        if let Some(result) = self.result.take() {
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identical_concurrent_reads_share_one() {
        five_identical_reads(true).await;
    }

    #[tokio::test]
    async fn with_the_read_coalescing_flag_off_each_read_runs() {
        five_identical_reads(false).await;
    }

    async fn five_identical_reads(sharing: bool) {
        let coalescer: Coalescer<u32, u64> = Coalescer::default();
        let stats = Stats::default();
        let reads = std::sync::atomic::AtomicU64::new(0);
        let (release, gate) = tokio::sync::watch::channel(false);
        let one = |_: usize| {
            let mut gate = gate.clone();
            let reads = &reads;
            coalescer.run(7, sharing.then_some(&stats), async move {
                reads.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                Ok(42)
            })
        };
        let all = futures_util::future::join_all((0..5).map(one));
        let opener = async {
            tokio::task::yield_now().await;
            let _ = release.send(true);
        };
        let (answers, ()) = tokio::join!(all, opener);
        assert!(answers.iter().all(|a| matches!(a, Ok(42))));
        // Shared: one store read answers all five; unshared: five reads.
        let (want_reads, want_joined) = if sharing { (1, 4) } else { (5, 0) };
        assert_eq!(reads.load(Ordering::SeqCst), want_reads);
        assert_eq!(stats.coalesced_reads.load(Ordering::Relaxed), want_joined);
    }
}
