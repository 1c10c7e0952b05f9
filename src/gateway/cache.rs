//! The hot-channel cache: the recent events of active channels, in memory, bounded by total
//! bytes, so that replays and gap fills after a reconnect (or a restart of many clients at
//! once) do not go to the store. Events enter in commit order from the bus, before they are
//! dispatched, so each channel's cached run is contiguous and never behind what a
//! connection has been sent. A deleted message is redacted in the cached events too, as it
//! is in the store's log.
//!
//! [`EventReader`] reads a channel's log from the cache or, on a miss, from the store, and
//! concurrent identical store reads of one channel coalesce into one (as Discord's data
//! services do).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::outbox::Delivery;
use super::stats::Stats;
use crate::model::{Event, EventBody, Message};
use crate::store::{Store, StoreError};

/// Most events kept per channel, however much room is left.
const MAX_EVENTS_PER_CHANNEL: usize = 4096;
/// Bookkeeping per cached event besides its frame and text.
const EVENT_OVERHEAD: usize = 160;

struct Log {
    /// Seq of `events[0]`.
    first_seq: i64,
    events: VecDeque<Arc<Delivery>>,
    bytes: usize,
    used: u64,
}

impl Log {
    fn last_seq(&self) -> i64 {
        self.first_seq + self.events.len() as i64 - 1
    }

    fn pop_front(&mut self) -> usize {
        let d = self.events.pop_front().expect("a non-empty log");
        self.first_seq += 1;
        let size = cost(&d);
        self.bytes -= size;
        size
    }
}

fn cost(d: &Delivery) -> usize {
    let text = match &d.event.body {
        EventBody::MessageCreated(m)
        | EventBody::MessageEdited(m)
        | EventBody::MessageDeleted(m) => m.text.len(),
        _ => 0,
    };
    d.frame.len() + text + EVENT_OVERHEAD
}

#[derive(Default)]
struct Inner {
    logs: HashMap<i64, Log>,
    bytes: usize,
    clock: u64,
}

pub struct EventCache {
    inner: Mutex<Inner>,
    budget: usize,
}

impl EventCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            inner: Mutex::default(),
            budget: budget_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds committed events, in commit order.
    pub fn append(&self, deliveries: &[Arc<Delivery>]) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let mut added = 0usize;
        let mut freed = 0usize;
        for d in deliveries {
            let log = inner.logs.entry(d.channel_id).or_insert_with(|| Log {
                first_seq: d.seq,
                events: VecDeque::new(),
                bytes: 0,
                used: now,
            });
            if log.events.is_empty() || d.seq != log.last_seq() + 1 {
                // A channel's first cached event, or (never expected) a break in the run:
                // start the run over rather than keep a gap.
                freed += log.bytes;
                log.events.clear();
                log.bytes = 0;
                log.first_seq = d.seq;
            }
            if let EventBody::MessageDeleted(m) = &d.event.body {
                let (before, after) = redact(log, m);
                freed += before;
                added += after;
            }
            let size = cost(d);
            log.events.push_back(Arc::clone(d));
            log.bytes += size;
            log.used = now;
            added += size;
            while log.events.len() > MAX_EVENTS_PER_CHANNEL {
                freed += log.pop_front();
            }
        }
        inner.bytes = inner.bytes + added - freed;
        if inner.bytes > self.budget {
            evict(&mut inner, self.budget - self.budget / 8);
        }
    }

    /// Events of `channel_id` after `after_seq`, at most `limit`, and whether more are
    /// cached; `None` when the cache does not hold the event right after `after_seq`.
    pub fn read(
        &self,
        channel_id: i64,
        after_seq: i64,
        limit: usize,
    ) -> Option<(Vec<Arc<Delivery>>, bool)> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let log = inner.logs.get_mut(&channel_id)?;
        if log.events.is_empty() || after_seq + 1 < log.first_seq {
            return None;
        }
        log.used = now;
        if after_seq >= log.last_seq() {
            return Some((Vec::new(), false));
        }
        let start = (after_seq + 1 - log.first_seq) as usize;
        let end = (start + limit).min(log.events.len());
        let page = log.events.range(start..end).cloned().collect();
        Some((page, end < log.events.len()))
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Replaces every cached event of a deleted message with its redacted form. Returns the
/// bytes removed and added.
fn redact(log: &mut Log, deleted: &Message) -> (usize, usize) {
    let (mut removed, mut added) = (0, 0);
    for slot in log.events.iter_mut() {
        let redacted = match &slot.event.body {
            EventBody::MessageCreated(m) if m.id == deleted.id && !m.deleted => {
                EventBody::MessageCreated(deleted.clone())
            }
            EventBody::MessageEdited(m) if m.id == deleted.id && !m.deleted => {
                EventBody::MessageEdited(Message {
                    edited_at: m.edited_at,
                    ..deleted.clone()
                })
            }
            _ => continue,
        };
        let fresh = Delivery::new(Event {
            body: redacted,
            ..slot.event.clone()
        });
        removed += cost(slot);
        added += cost(&fresh);
        log.bytes = log.bytes + cost(&fresh) - cost(slot);
        *slot = fresh;
    }
    (removed, added)
}

/// Drops the least recently used channels until at most `target` bytes are held.
fn evict(inner: &mut Inner, target: usize) {
    let mut by_age: Vec<(u64, i64)> = inner.logs.iter().map(|(id, l)| (l.used, *id)).collect();
    by_age.sort_unstable();
    for (_, id) in by_age {
        if inner.bytes <= target {
            break;
        }
        if let Some(log) = inner.logs.remove(&id) {
            inner.bytes -= log.bytes;
        }
    }
}

type Shared = Result<Arc<(Vec<Arc<Delivery>>, bool)>, String>;
/// (channel, after seq, limit): what makes two reads identical.
type ReadKey = (i64, i64, u32);

/// Reads channel logs for the gateway: cache first, then the store, with identical
/// concurrent store reads coalesced. The caller has checked membership.
pub struct EventReader {
    cache: Arc<EventCache>,
    store: Arc<dyn Store>,
    in_flight: Mutex<HashMap<ReadKey, Vec<oneshot::Sender<Shared>>>>,
    stats: Arc<Stats>,
}

impl EventReader {
    pub fn new(cache: Arc<EventCache>, store: Arc<dyn Store>, stats: Arc<Stats>) -> Self {
        Self {
            cache,
            store,
            in_flight: Mutex::default(),
            stats,
        }
    }

    /// Up to `limit` events of the channel after `after_seq`, and whether more exist.
    pub async fn read(
        &self,
        channel_id: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<(Vec<Arc<Delivery>>, bool), StoreError> {
        if let Some(hit) = self.cache.read(channel_id, after_seq, limit as usize) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        let key = (channel_id, after_seq, limit);
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
            self.stats.coalesced_reads.fetch_add(1, Ordering::Relaxed);
            return match rx.await {
                Ok(Ok(page)) => Ok((page.0.clone(), page.1)),
                Ok(Err(e)) => Err(StoreError::internal("read a channel log", e)),
                // The leading read was cancelled: read alone.
                Err(_) => self
                    .read_store(channel_id, after_seq, limit)
                    .await
                    .map(|p| (p.0.clone(), p.1)),
            };
        }
        // This read leads; the guard hands its result (or, if it is cancelled, nothing) to
        // every waiter that joined meanwhile.
        let mut lead = Lead {
            reader: self,
            key,
            result: None,
        };
        let result = self.read_store(channel_id, after_seq, limit).await;
        lead.result = Some(match &result {
            Ok(page) => Ok(Arc::clone(page)),
            Err(e) => Err(e.to_string()),
        });
        drop(lead);
        result.map(|p| (p.0.clone(), p.1))
    }

    async fn read_store(
        &self,
        channel_id: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<Arc<(Vec<Arc<Delivery>>, bool)>, StoreError> {
        let page = self.store.log(channel_id, after_seq, limit).await?;
        let events = page.items.into_iter().map(Delivery::new).collect();
        Ok(Arc::new((events, page.has_more)))
    }
}

struct Lead<'a> {
    reader: &'a EventReader,
    key: ReadKey,
    result: Option<Shared>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let waiters = self
            .reader
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key)
            .unwrap_or_default();
        if let Some(result) = &self.result {
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn member_added(channel_id: i64, seq: i64) -> Arc<Delivery> {
        Delivery::new(Event {
            channel_id,
            seq,
            at: 0,
            body: EventBody::MemberAdded {
                user_id: 1,
                role: Role::Member,
            },
        })
    }

    fn message(channel_id: i64, seq: i64, id: i64) -> Arc<Delivery> {
        Delivery::new(Event {
            channel_id,
            seq,
            at: 0,
            body: EventBody::MessageCreated(Message {
                id,
                channel_id,
                seq,
                author_id: 1,
                text: "secret".into(),
                client_id: None,
                created_at: 0,
                edited_at: None,
                deleted: false,
            }),
        })
    }

    #[test]
    fn serves_runs_it_holds_and_misses_what_it_does_not() {
        let cache = EventCache::new(1 << 20);
        cache.append(&(5..=9).map(|s| member_added(1, s)).collect::<Vec<_>>());
        assert!(cache.read(1, 3, 10).is_none(), "seq 4 was never cached");
        let (page, more) = cache.read(1, 4, 3).unwrap();
        assert_eq!(page.iter().map(|d| d.seq).collect::<Vec<_>>(), [5, 6, 7]);
        assert!(more);
        let (page, more) = cache.read(1, 7, 10).unwrap();
        assert_eq!(page.iter().map(|d| d.seq).collect::<Vec<_>>(), [8, 9]);
        assert!(!more);
        assert_eq!(cache.read(1, 9, 10).unwrap().0.len(), 0);
        assert!(cache.read(2, 0, 10).is_none());
    }

    #[test]
    fn stays_within_its_byte_budget() {
        let cache = EventCache::new(20_000);
        for channel in 1..=50 {
            cache.append(
                &(1..=20)
                    .map(|s| member_added(channel, s))
                    .collect::<Vec<_>>(),
            );
            assert!(cache.bytes() <= 20_000, "{}", cache.bytes());
        }
        assert!(cache.read(50, 0, 5).is_some(), "the newest channel stays");
        assert!(cache.read(1, 0, 5).is_none(), "the oldest was evicted");
    }

    #[test]
    fn a_delete_redacts_the_cached_events_of_its_message() {
        let cache = EventCache::new(1 << 20);
        let created = message(1, 1, 77);
        let mut deleted = match &created.event.body {
            EventBody::MessageCreated(m) => m.clone(),
            _ => unreachable!(),
        };
        deleted.text.clear();
        deleted.deleted = true;
        cache.append(&[
            created,
            Delivery::new(Event {
                channel_id: 1,
                seq: 2,
                at: 0,
                body: EventBody::MessageDeleted(deleted),
            }),
        ]);
        let (page, _) = cache.read(1, 0, 10).unwrap();
        assert_eq!(page.len(), 2);
        assert!(!page[0].frame.as_str().contains("secret"));
        assert!(page[0].frame.as_str().contains(r#""deleted":true"#));
    }
}
