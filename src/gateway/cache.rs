//! The hot-channel cache: the recent events of active channels, in memory, bounded by total
//! bytes, so that replays and gap fills after a reconnect (or a restart of many clients at
//! once) do not go to the store. Events enter in commit order from the bus, before they are
//! dispatched, so each channel's cached run is contiguous and never behind what a
//! connection has been sent. A deleted message is redacted in the cached events too, as it
//! is in the store's log.
//!
//! Each cached run also keeps the current state of the messages created in it (edits and
//! deletes applied), so the newest pages of a hot channel's history are answered from
//! memory too. `reader::EventReader` decides between the cache and the store.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::outbox::Delivery;
use crate::model::{Event, EventBody, HistoryQuery, Message, Page};

/// Most events kept per channel, however much room is left.
const MAX_EVENTS_PER_CHANNEL: usize = 4096;
/// Bookkeeping per cached event besides its frame and text.
const EVENT_OVERHEAD: usize = 160;

struct Log {
    /// Seq of `events[0]`.
    first_seq: i64,
    events: VecDeque<Arc<Delivery>>,
    /// The messages created in this run, by seq, as they stand now.
    messages: BTreeMap<i64, Message>,
    /// Message id → its seq in `messages`.
    by_id: HashMap<i64, i64>,
    bytes: usize,
    used: u64,
}

impl Log {
    fn new(first_seq: i64, used: u64) -> Self {
        Self {
            first_seq,
            events: VecDeque::new(),
            messages: BTreeMap::new(),
            by_id: HashMap::new(),
            bytes: 0,
            used,
        }
    }

    /// The current state of a message created in this run.
    fn message_mut(&mut self, id: i64) -> Option<&mut Message> {
        let seq = self.by_id.get(&id)?;
        self.messages.get_mut(seq)
    }

    fn last_seq(&self) -> i64 {
        self.first_seq + self.events.len() as i64 - 1
    }

    /// Drops the oldest event (and the message it created); returns the bytes freed.
    fn pop_front(&mut self) -> usize {
        let d = self.events.pop_front().expect("a non-empty log");
        self.first_seq += 1;
        let mut size = cost(&d);
        if let EventBody::MessageCreated(m) = &d.event.body
            && let Some(gone) = self.messages.remove(&m.seq)
        {
            self.by_id.remove(&gone.id);
            size += message_cost(&gone);
        }
        self.bytes -= size;
        size
    }

    /// Applies a message event to the message states; returns (bytes freed, bytes added).
    fn project(&mut self, body: &EventBody) -> (usize, usize) {
        match body {
            EventBody::MessageCreated(m) => {
                // A reply counts in its root, as the store counts it in the same commit.
                if let Some(root) = m.thread_root_id.and_then(|id| self.message_mut(id)) {
                    root.reply_count += 1;
                    root.last_reply_at = Some(m.created_at);
                }
                self.by_id.insert(m.id, m.seq);
                let size = message_cost(m);
                self.messages.insert(m.seq, m.clone());
                (0, size)
            }
            EventBody::MessageEdited(m) | EventBody::MessageDeleted(m) => {
                // A delete event comes only for a live message: one reply fewer.
                if let EventBody::MessageDeleted(_) = body
                    && let Some(root) = m.thread_root_id.and_then(|id| self.message_mut(id))
                {
                    root.reply_count -= 1;
                }
                let Some(current) = self.message_mut(m.id) else {
                    return (0, 0);
                };
                let before = message_cost(current);
                current.text.clone_from(&m.text);
                current.edited_at = m.edited_at;
                current.deleted = m.deleted;
                // An edit re-resolves mentions; a deleted message mentions no one.
                current.mentions.clone_from(&m.mentions);
                // A deleted message carries no files.
                current.attachments.clone_from(&m.attachments);
                (before, message_cost(current))
            }
            _ => (0, 0),
        }
    }
}

fn message_cost(m: &Message) -> usize {
    let files: usize = m
        .attachments
        .iter()
        .map(|a| a.name.len() + a.content_type.len() + EVENT_OVERHEAD)
        .sum();
    m.text.len() + m.client_id.as_ref().map_or(0, String::len) + files + EVENT_OVERHEAD
}

fn cost(d: &Delivery) -> usize {
    let text = d.event.body.message().map_or(0, |m| m.text.len());
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
    /// Committed batches handed to the bus, and those added here: a reader that waits
    /// until `applied` reaches the `published` it saw reads every write acknowledged before
    /// it started (read-your-writes), though fan-out runs behind the writer.
    published: AtomicU64,
    applied: AtomicU64,
    caught_up: Notify,
}

impl EventCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            inner: Mutex::default(),
            budget: budget_bytes,
            published: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            caught_up: Notify::new(),
        }
    }

    /// The bus calls this for each committed batch as the writer hands it over, before the
    /// writer answers the batch's writers.
    pub fn mark_published(&self) {
        self.published.fetch_add(1, Ordering::SeqCst);
    }

    /// The bus calls this after appending `batches` published batches.
    pub fn mark_applied(&self, batches: u64) {
        self.applied.fetch_add(batches, Ordering::SeqCst);
        self.caught_up.notify_waiters();
    }

    /// Waits (at most `limit`) until every batch published before this call is cached.
    pub async fn catch_up(&self, limit: std::time::Duration) -> bool {
        let target = self.published.load(Ordering::SeqCst);
        let wait = async {
            loop {
                // Registered before the check, so a `mark_applied` between the check and
                // the wait still wakes it.
                let notified = self.caught_up.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.applied.load(Ordering::SeqCst) >= target {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
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
            let log = inner
                .logs
                .entry(d.channel_id)
                .or_insert_with(|| Log::new(d.seq, now));
            if !log.events.is_empty() && d.seq <= log.last_seq() {
                // Already cached (an unfollowed channel's event can come twice, or late).
                continue;
            }
            if log.events.is_empty() || d.seq != log.last_seq() + 1 {
                // A channel's first cached event, or (never expected) a break in the run:
                // start the run over rather than keep a gap.
                freed += log.bytes;
                *log = Log::new(d.seq, now);
            }
            let (out, into) = log.project(&d.event.body);
            log.bytes = log.bytes + into - out;
            freed += out;
            added += into;
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
        // Written so that `after_seq` = i64::MAX cannot overflow (first_seq >= 1).
        if log.events.is_empty() || after_seq < log.first_seq - 1 {
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

    /// A page of history answered from the cached message states, or `None` when the
    /// cached run does not hold the whole page (the store must answer). Same order and
    /// `has_more` rules as the store's.
    /// `through`: the channel's newest seq as the store showed it; a cached run that ends
    /// before it (events committed on another node not brought yet) does not answer.
    pub fn history(&self, channel_id: i64, q: HistoryQuery, through: i64) -> Option<Page<Message>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let log = inner.logs.get_mut(&channel_id)?;
        if log.events.is_empty() || log.last_seq() < through {
            return None;
        }
        log.used = now;
        let before = q.before_seq.unwrap_or(i64::MAX);
        let fetch = q.limit as usize + 1;
        let mut items: Vec<Message> = match q.after_seq {
            Some(after) if after < log.first_seq - 1 => return None,
            Some(after) if after.saturating_add(1) >= before => Vec::new(),
            Some(after) => log
                .messages
                .range(after + 1..before)
                .take(fetch)
                .map(|(_, m)| m.clone())
                .collect(),
            None => {
                let newest: Vec<Message> = log
                    .messages
                    .range(..before)
                    .rev()
                    .take(fetch)
                    .map(|(_, m)| m.clone())
                    .collect();
                // Fewer than asked: older messages may sit before the cached run.
                if newest.len() < fetch && log.first_seq > 1 {
                    return None;
                }
                newest
            }
        };
        let has_more = items.len() == fetch;
        items.truncate(q.limit as usize);
        if q.after_seq.is_none() {
            items.reverse();
        }
        Some(Page { items, has_more })
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
            // As the store shows them: a creation never carries an edit time.
            EventBody::MessageCreated(m) if m.id == deleted.id && !m.deleted => {
                EventBody::MessageCreated(Message {
                    edited_at: None,
                    ..deleted.clone()
                })
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
                ..Message::default()
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
