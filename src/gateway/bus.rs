//! The bus carries committed events (and ephemeral signals) from the writers to the
//! dispatcher of every node that delivers them. [`LocalBus`] is the one-node bus: this
//! node's commits go straight to its dispatcher. The cluster bus (`nats::NatsBus`) also
//! publishes them to the other nodes and feeds theirs to this node's dispatcher.

use std::sync::Arc;

use super::dispatch::Dispatcher;
use crate::model::Event;
use crate::store::TokenHash;

/// Called on this node when another node revoked a session: the API forgets the token and
/// closes its sockets.
pub type RevokeHandler = Box<dyn Fn(i64, &TokenHash) + Send + Sync>;

#[async_trait::async_trait]
pub trait Bus: Send + Sync {
    /// This node's committed events, called in commit order. May wait when the dispatcher
    /// is behind: that is the writer's backpressure.
    fn publish(&self, events: Vec<Event>);
    /// An ephemeral signal; dropped rather than queued when fan-out is behind.
    fn typing(&self, channel_id: i64, user_id: i64);
    /// A member's new profile, to the channel's online members; ephemeral as typing.
    fn profile(&self, channel_id: i64, user: &crate::model::User);
    /// Carries this node's presence changes to the other nodes and theirs to `presence`
    /// (a cluster bus). Called once.
    fn attach_presence(&self, _presence: &Arc<super::presence::Presence>) {}
    /// Tells the other nodes that a session was revoked (this node has acted on it).
    fn revoke(&self, _user_id: i64, _token: &TokenHash) {}
    /// What to do when another node revokes a session. Set once.
    fn on_revoke(&self, _handler: RevokeHandler) {}
    /// Returns once the bus brings this node the events of everything it follows now
    /// (a cluster bus: its subscriptions reached the server), or after a bounded wait.
    async fn sync(&self) {}
    /// For `/readyz` and the channel-list check: the bus's name and whether it is
    /// connected; `None` for the local bus.
    fn health(&self) -> Option<(&'static str, bool)> {
        None
    }
    /// Since when a revocation by another node is sure to have reached this one: a session
    /// this node cached before then must be read again. `None`: always (one node).
    fn trusted_since(&self) -> Option<std::time::Instant> {
        None
    }
    /// Prometheus text of the bus's own counters.
    fn render_metrics(&self, _out: &mut String) {}
}

pub struct LocalBus {
    dispatcher: Dispatcher,
}

impl LocalBus {
    pub fn new(dispatcher: Dispatcher) -> Arc<Self> {
        Arc::new(Self { dispatcher })
    }
}

impl Bus for LocalBus {
    fn publish(&self, events: Vec<Event>) {
        self.dispatcher.local(events);
    }

    fn typing(&self, channel_id: i64, user_id: i64) {
        self.dispatcher.typing(channel_id, user_id);
    }

    fn profile(&self, channel_id: i64, user: &crate::model::User) {
        self.dispatcher.profile(channel_id, user.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::gateway::cache::EventCache;
    use crate::gateway::dispatch::Handoff;
    use crate::gateway::hub::Hub;
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
        let (dispatcher, _thread) = Dispatcher::start(
            hub,
            Arc::clone(&cache),
            None,
            tokio::runtime::Handle::current(),
            Handoff::Inline,
        );
        let bus = LocalBus::new(dispatcher);
        // A big batch keeps the dispatcher busy while the next one waits in its queue.
        bus.publish((1..=50_000).map(|seq| event(1, seq)).collect());
        bus.publish(vec![event(2, 1)]);
        assert!(cache.catch_up(Duration::from_secs(30)).await);
        let (page, _) = cache.read(2, 0, 10).expect("channel 2 is cached");
        assert_eq!(page.len(), 1);
    }
}
