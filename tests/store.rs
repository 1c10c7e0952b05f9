//! The store conformance suite, one test per check, on the embedded SQLite backend and on
//! PostgreSQL (a fresh database per test; two shards, so channels spread over both), plus
//! the two-node checks on PostgreSQL (two store values on the same shards).

mod common;

use std::sync::Arc;

use natter::store::conformance::{self, CHECKS, TWO_NODE_CHECKS};
use natter::store::{Store, StoreLocation, StoreOptions};

async fn sqlite() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let location = StoreLocation::Sqlite(dir.path().join("natter.db"));
    let store = natter::store::open(StoreOptions::new(location))
        .await
        .unwrap();
    (dir, store)
}

/// A store on two fresh PostgreSQL databases as node `node_id`; `None` to skip.
async fn postgres(shards: &[String], node_id: u16) -> Arc<dyn Store> {
    let mut opts = StoreOptions::new(StoreLocation::Postgres(shards.to_vec()));
    opts.node_id = node_id;
    natter::store::open(opts).await.unwrap()
}

async fn on_sqlite(check: &str) {
    let (_dir, store) = sqlite().await;
    conformance::run(check, &*store).await;
    store.close().await;
}

/// The SQLite backend folding its commit log after every commit (the default keeps posts
/// in the log, read from memory, until it is large or old).
async fn on_sqlite_folding(check: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StoreOptions::new(StoreLocation::Sqlite(dir.path().join("natter.db")));
    opts.fold_rows = 1;
    let store = natter::store::open(opts).await.unwrap();
    conformance::run(check, &*store).await;
    store.close().await;
}

async fn on_postgres(check: &str) {
    let Some(shards) = common::pg::databases(2).await else {
        return;
    };
    let store = postgres(&shards, 1).await;
    conformance::run(check, &*store).await;
    store.close().await;
}

async fn on_two_nodes(check: &str) {
    let Some(shards) = common::pg::databases(2).await else {
        return;
    };
    let a = postgres(&shards, 1).await;
    let b = postgres(&shards, 2).await;
    conformance::run_two(check, &*a, &*b).await;
    a.close().await;
    b.close().await;
}

macro_rules! checks {
    ($runner:ident: $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crate::$runner(stringify!($name)).await;
            }
        )*
    };
}

mod sqlite {
    checks!(on_sqlite: users, sessions, channel_log_is_gap_free, client_id_is_idempotent,
        broadcast_permissions, member_management, unread_counts, history_pages,
        dm_is_one_per_pair, delete_redacts, edits_keep_each_version_in_the_log, reactions,
        reaction_limits_and_deletes, threads, mentions, profiles, search, bots_and_api_keys, incoming_webhooks,
        subscription_leases, uploads, two_factor_and_passwords, authored,
        account_deletion);
}

mod sqlite_folding_every_commit {
    checks!(on_sqlite_folding: users, sessions, channel_log_is_gap_free, client_id_is_idempotent,
        broadcast_permissions, member_management, unread_counts, history_pages,
        dm_is_one_per_pair, delete_redacts, edits_keep_each_version_in_the_log, reactions,
        reaction_limits_and_deletes, threads, mentions, profiles, search, bots_and_api_keys, incoming_webhooks,
        subscription_leases, uploads, two_factor_and_passwords, authored,
        account_deletion);
}

mod postgres {
    checks!(on_postgres: users, sessions, channel_log_is_gap_free, client_id_is_idempotent,
        broadcast_permissions, member_management, unread_counts, history_pages,
        dm_is_one_per_pair, delete_redacts, edits_keep_each_version_in_the_log, reactions,
        reaction_limits_and_deletes, threads, mentions, profiles, search, bots_and_api_keys, incoming_webhooks,
        subscription_leases, uploads, two_factor_and_passwords, authored,
        account_deletion);

    mod two_nodes {
        checks!(on_two_nodes: two_writers_keep_seqs_gap_free,
            a_retry_through_the_other_node_returns_the_original,
            each_node_sees_the_others_writes,
            both_nodes_opening_one_dm_get_the_same_dm,
            the_channel_index_follows_changes_made_through_both_nodes);
    }
}

/// Every check of the suite has its test above (a new check without one fails here).
#[test]
fn every_check_has_a_test() {
    let source = include_str!("store.rs");
    let start = source.find("mod sqlite {").unwrap();
    let end = source.find("/// Every check of the suite").unwrap();
    let words: Vec<&str> = source[start..end]
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .collect();
    let count = |name: &str| words.iter().filter(|w| **w == name).count();
    for name in CHECKS {
        assert_eq!(
            count(name),
            3,
            "{name}: one test on SQLite, one on SQLite folding every commit, one on PostgreSQL"
        );
    }
    for name in TWO_NODE_CHECKS {
        assert_eq!(count(name), 1, "{name}");
    }
}

mod unread_projection {
    //! Property: the unread counts kept as a projection always equal a recount from
    //! history, whatever mix of sends, deletes, read-marker moves and membership changes,
    //! on SQLite and on PostgreSQL.

    use natter::model::{ChannelKind, HistoryQuery};
    use natter::store::{Store, StoreLocation, StoreOptions};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Send(usize),
        Delete(usize, usize),
        Read(usize, i64),
        Leave(usize),
        Join(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0usize..3).prop_map(Step::Send),
            2 => (0usize..3, 0usize..64).prop_map(|(u, i)| Step::Delete(u, i)),
            2 => (0usize..3, -2i64..64).prop_map(|(u, s)| Step::Read(u, s)),
            1 => (1usize..3).prop_map(Step::Leave),
            1 => (1usize..3).prop_map(Step::Join),
        ]
    }

    async fn recount(store: &dyn Store, channel: i64, user: i64, read_seq: i64) -> i64 {
        let all = store
            .history(
                channel,
                HistoryQuery::newest(200),
                natter::store::ReadFence::PRIMARY,
            )
            .await
            .unwrap()
            .items;
        all.iter()
            .filter(|m| m.seq > read_seq && m.author_id != user && !m.deleted)
            .count() as i64
    }

    async fn check(store: &dyn Store, steps: Vec<Step>) {
        let mut users = Vec::new();
        for name in ["own", "two", "three"] {
            users.push(store.create_user(name, "h", None).await.unwrap().id);
        }
        let ch = store
            .create_channel(users[0], ChannelKind::Group, "u", &users[1..])
            .await
            .unwrap()
            .id;
        let mut sent = Vec::new();
        for s in steps {
            match s {
                Step::Send(u) => {
                    if let Ok(p) = store.post_message(users[u], ch, "x", None).await {
                        sent.push(p.message.id);
                    }
                }
                Step::Delete(u, i) if !sent.is_empty() => {
                    let _ = store
                        .delete_message(users[u], ch, sent[i % sent.len()])
                        .await;
                }
                Step::Delete(..) => {}
                Step::Read(u, seq) => {
                    let _ = store.mark_read(users[u], ch, seq.max(0)).await;
                }
                Step::Leave(u) => {
                    let _ = store.remove_member(users[u], ch, users[u]).await;
                }
                Step::Join(u) => {
                    let _ = store.put_member(users[0], ch, users[u], None).await;
                }
            }
            for &user in &users {
                let views = store.channels(user).await.unwrap();
                if let Some(view) = views.into_iter().find(|v| v.channel.id == ch) {
                    let expected = recount(store, ch, user, view.read_seq).await;
                    assert_eq!(
                        view.unread, expected,
                        "user {user} at read_seq {}",
                        view.read_seq
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
        #[test]
        fn unread_matches_a_recount_on_sqlite(steps in prop::collection::vec(step(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let location = StoreLocation::Sqlite(dir.path().join("natter.db"));
                let store = natter::store::open(StoreOptions::new(location)).await.unwrap();
                check(&*store, steps).await;
                store.close().await;
            });
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        #[test]
        fn unread_matches_a_recount_on_postgres(steps in prop::collection::vec(step(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let Some(shards) = crate::common::pg::databases(2).await else {
                    return;
                };
                let store = natter::store::open(StoreOptions::new(StoreLocation::Postgres(shards)))
                    .await
                    .unwrap();
                check(&*store, steps).await;
                store.close().await;
            });
        }
    }
}

mod commit_log {
    //! The embedded store's commit log: posts read back whole and in order whether they
    //! are still in the log (served from memory), folded into the channel tables, or
    //! split between the two; and a database left with an unfolded log (a crash) opens
    //! with every post in place.

    use natter::model::{ChannelKind, EventBody, HistoryQuery};
    use natter::store::{ReadFence, Store, StoreLocation, StoreOptions};

    async fn open(path: &std::path::Path) -> std::sync::Arc<dyn Store> {
        natter::store::open(StoreOptions::new(StoreLocation::Sqlite(path.to_owned())))
            .await
            .unwrap()
    }

    /// Users ann and bob, and a group channel of ann's with bob in it.
    async fn ann_and_bob_in_a_channel(store: &dyn Store) -> (i64, i64, i64) {
        let a = store.create_user("ann", "h", None).await.unwrap().id;
        let b = store.create_user("bob", "h", None).await.unwrap().id;
        let ch = store
            .create_channel(a, ChannelKind::Group, "c", &[b])
            .await
            .unwrap()
            .id;
        (a, b, ch)
    }

    /// Every event of the channel, read in pages of `limit`.
    async fn log_in_pages(store: &dyn Store, ch: i64, limit: u32) -> Vec<(i64, String)> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .log(ch, after, limit, ReadFence::PRIMARY)
                .await
                .unwrap();
            assert!(page.items.len() <= limit as usize);
            for e in &page.items {
                let text = match &e.body {
                    EventBody::MessageCreated(m) => m.text.clone(),
                    other => other.kind().to_owned(),
                };
                out.push((e.seq, text));
            }
            match page.items.last() {
                Some(last) if page.has_more => after = last.seq,
                _ => break,
            }
        }
        out
    }

    /// Every message, newest page first, then forwards from the start, in pages of
    /// `limit`; both must agree.
    async fn history_in_pages(store: &dyn Store, ch: i64, limit: u32) -> Vec<(i64, String)> {
        let mut backwards = Vec::new();
        let mut before = None;
        loop {
            let q = HistoryQuery {
                before_seq: before,
                after_seq: None,
                limit,
            };
            let page = store.history(ch, q, ReadFence::PRIMARY).await.unwrap();
            assert!(page.items.windows(2).all(|w| w[0].seq < w[1].seq));
            let mut items: Vec<_> = page.items.iter().map(|m| (m.seq, m.text.clone())).collect();
            items.append(&mut backwards);
            backwards = items;
            match page.items.first() {
                Some(first) if page.has_more => before = Some(first.seq),
                _ => break,
            }
        }
        let mut forwards = Vec::new();
        let mut after = 0;
        loop {
            let q = HistoryQuery {
                before_seq: None,
                after_seq: Some(after),
                limit,
            };
            let page = store.history(ch, q, ReadFence::PRIMARY).await.unwrap();
            forwards.extend(page.items.iter().map(|m| (m.seq, m.text.clone())));
            match page.items.last() {
                Some(last) if page.has_more => after = last.seq,
                _ => break,
            }
        }
        assert_eq!(backwards, forwards, "pages of {limit}, both ways");
        backwards
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_span_the_log_and_the_folded_tables_and_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        let store = open(&path).await;
        let (a, b, ch) = ann_and_bob_in_a_channel(&*store).await;
        // Posts 1–8 in the log; the rename folds them; 9–16 stay in the log.
        let mut texts = Vec::new();
        for i in 0..16 {
            if i == 8 {
                store.rename_channel(a, ch, "renamed").await.unwrap();
            }
            let text = format!("m{i}");
            let cid = format!("c{i}");
            store
                .post_message(if i % 3 == 0 { b } else { a }, ch, &text, Some(&cid))
                .await
                .unwrap();
            texts.push(text);
        }
        // A retry finds the original, folded or not.
        for i in [2, 12] {
            let author = if i % 3 == 0 { b } else { a };
            let retry = store
                .post_message(author, ch, "again", Some(&format!("c{i}")))
                .await
                .unwrap();
            assert!(!retry.created);
            assert_eq!(retry.message.text, texts[i]);
        }
        let log = log_in_pages(&*store, ch, 100).await;
        let seqs: Vec<i64> = log.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=log.len() as i64).collect::<Vec<_>>(), "gap-free");
        let posted: Vec<&str> = log
            .iter()
            .map(|(_, t)| t.as_str())
            .filter(|t| {
                t.strip_prefix('m')
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .collect();
        assert_eq!(posted, texts, "every post once, in order");
        let history = history_in_pages(&*store, ch, 100).await;
        assert_eq!(history.len(), 16);
        for limit in [1, 3, 7] {
            assert_eq!(
                log_in_pages(&*store, ch, limit).await,
                log,
                "log pages of {limit}"
            );
            assert_eq!(history_in_pages(&*store, ch, limit).await, history);
        }
        // Unread counts take the unfolded posts: bob reads up to the middle of them.
        let unread = |views: Vec<natter::model::ChannelView>| views[0].unread;
        let last = log.last().unwrap().0;
        store.mark_read(b, ch, last - 4).await.unwrap();
        assert_eq!(
            unread(store.channels(b).await.unwrap()),
            2,
            "m13 and m14 are ann's; m12 and m15 bob's"
        );
        // A crash: the files as they are with the log unfolded (nothing is being written).
        let crashed = dir.path().join("crashed");
        std::fs::create_dir(&crashed).unwrap();
        for name in ["natter.db", "natter.db-wal"] {
            std::fs::copy(dir.path().join(name), crashed.join(name)).unwrap();
        }
        store.close().await;
        for path in [crashed.join("natter.db"), path] {
            let store = open(&path).await;
            assert_eq!(
                log_in_pages(&*store, ch, 5).await,
                log,
                "{}",
                path.display()
            );
            assert_eq!(history_in_pages(&*store, ch, 4).await, history);
            assert_eq!(unread(store.channels(b).await.unwrap()), 2);
            let retry = store
                .post_message(a, ch, "again", Some("c13"))
                .await
                .unwrap();
            assert!(!retry.created);
            store.close().await;
        }
    }

    /// The channel and member counters count a post when the log is folded, and readers
    /// add the posts still in the log: a read that races a fold must neither miss the
    /// folded posts nor count them twice. While ann posts and the log folds every few
    /// commits, bob's view of the channel always has as many unread as posts since he
    /// joined, and never steps back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unread_counts_and_last_seq_agree_while_the_log_folds() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = StoreOptions::new(StoreLocation::Sqlite(dir.path().join("natter.db")));
        opts.fold_rows = 5;
        let store = natter::store::open(opts).await.unwrap();
        let (a, b, ch) = ann_and_bob_in_a_channel(&*store).await;
        let base = store.channels(b).await.unwrap()[0].channel.last_seq;
        const POSTS: i64 = 1500;
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let sends = (0..POSTS).map(|i| {
                    let store = store.clone();
                    async move {
                        store
                            .post_message(a, ch, &format!("m{i}"), Some(&format!("c{i}")))
                            .await
                            .unwrap();
                    }
                });
                // 16 in flight: batches of a few posts, a fold every few commits.
                use futures_util::StreamExt;
                futures_util::stream::iter(sends)
                    .buffer_unordered(16)
                    .collect::<Vec<()>>()
                    .await;
            })
        };
        let (mut last, mut reads) = (base, 0);
        while last < base + POSTS && reads < 200_000 {
            reads += 1;
            let view = store.channels(b).await.unwrap().remove(0);
            assert_eq!(
                view.unread,
                view.channel.last_seq - base,
                "one view: every post since bob joined is unread, once"
            );
            assert!(view.channel.last_seq >= last, "never steps back");
            last = view.channel.last_seq;
            let (one, _) = store.channel(ch, b).await.unwrap().unwrap();
            let seqs = store.last_seqs(&[ch]).await.unwrap();
            assert!(
                one.last_seq >= last && seqs[0].1 >= last,
                "never behind the list"
            );
        }
        writer.await.unwrap();
        assert_eq!(store.channels(b).await.unwrap()[0].unread, POSTS);
        store.close().await;
    }

    fn in_log(path: &std::path::Path) -> i64 {
        let db =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        db.query_row("SELECT count(*) FROM commit_log", [], |r| r.get(0))
            .unwrap()
    }

    /// Posts fold out of the log once no write has come for a while (in transactions of
    /// their own), with no later write to prompt it; the writer serves writes after it;
    /// and every post reads back the same, also from a copy of the files taken right
    /// after (a crash). Before, the log stayed as it was until the next write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_folds_while_no_write_comes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        let store = open(&path).await;
        let a = store.create_user("ann", "h", None).await.unwrap().id;
        let ch = store
            .create_channel(a, ChannelKind::Group, "c", &[])
            .await
            .unwrap()
            .id;
        let sends = (0..300).map(|i| {
            let store = store.clone();
            async move {
                let (text, cid) = (format!("m{i}"), format!("c{i}"));
                store.post_message(a, ch, &text, Some(&cid)).await.unwrap();
            }
        });
        futures_util::future::join_all(sends).await;
        let mut left = in_log(&path);
        for _ in 0..100 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            left = in_log(&path);
        }
        assert_eq!(left, 0, "the log folded with no write to prompt it");
        let log = log_in_pages(&*store, ch, 64).await;
        let seqs: Vec<i64> = log.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=log.len() as i64).collect::<Vec<_>>(), "gap-free");
        let posts = log.iter().filter(|(_, t)| {
            t.strip_prefix('m')
                .is_some_and(|n| n.parse::<u32>().is_ok())
        });
        assert_eq!(posts.count(), 300, "every post once");
        // Copied while the writer waits with an empty log (no write can restart the WAL
        // between the two copies).
        let crashed = dir.path().join("crashed");
        std::fs::create_dir(&crashed).unwrap();
        for name in ["natter.db", "natter.db-wal"] {
            std::fs::copy(dir.path().join(name), crashed.join(name)).unwrap();
        }
        let late = store.post_message(a, ch, "late", None).await.unwrap();
        let next = log.len() as i64 + 1;
        assert_eq!(late.message.seq, next, "the writer serves writes after it");
        let retry = store
            .post_message(a, ch, "again", Some("c7"))
            .await
            .unwrap();
        assert!(!retry.created, "a folded post still answers its retry");
        store.close().await;
        let reopened = open(&crashed.join("natter.db")).await;
        assert_eq!(log_in_pages(&*reopened, ch, 50).await, log);
        reopened.close().await;
    }

    /// A store whose writer has ended says so (`/readyz` then answers 503), and refuses
    /// writes as unavailable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_whose_writer_ended_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("natter.db")).await;
        let a = store.create_user("ann", "h", None).await.unwrap().id;
        let health = store.health();
        assert!(health.ready() && !health.writes_ended);
        store.close().await;
        let health = store.health();
        assert!(health.writes_ended, "{health:?}");
        assert!(!health.ready());
        let refused = store.create_channel(a, ChannelKind::Group, "c", &[]).await;
        assert!(
            matches!(refused, Err(natter::store::StoreError::Unavailable)),
            "{refused:?}"
        );
    }
}

mod conversation_projections {
    //! Property: the projections kept beside the log (reaction counts and each viewer's
    //! own, a root's reply count and newest reply) always equal a recount from the
    //! channel's log, whatever mix of sends, replies, reactions taken and taken back, and
    //! deletes, on SQLite and on PostgreSQL; and each reaction call answers whether it
    //! changed anything as the log says it did.

    use std::collections::{BTreeMap, BTreeSet, HashSet};

    use natter::model::{ChannelKind, EventBody};
    use natter::store::{ReadFence, Store, StoreError, StoreLocation, StoreOptions};
    use proptest::prelude::*;

    const EMOJI: [&str; 3] = ["👍", "❤️", "🎉"];

    const NAMES: [&str; 3] = ["own", "two", "three"];

    #[derive(Debug, Clone)]
    enum Step {
        /// A send by a user, mentioning another (or no one), with one of a few
        /// `client_id`s (a repeat is a retry: it answers the original).
        Send(usize, Option<usize>, u8),
        Reply(usize, usize, Option<usize>),
        React(usize, usize, usize, bool),
        /// Its author edits a message to mention someone else (or no one).
        Edit(usize, Option<usize>),
        Read(usize, i64),
        Delete(usize),
        /// A member (not the owner) leaves, or is added back.
        Leave(usize),
        Join(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        let who = proptest::option::of(0usize..3);
        prop_oneof![
            2 => (0usize..3, who.clone(), 0u8..6).prop_map(|(u, t, c)| Step::Send(u, t, c)),
            2 => (0usize..3, 0usize..16, who.clone()).prop_map(|(u, m, t)| Step::Reply(u, m, t)),
            4 => (0usize..3, 0usize..16, 0usize..3, any::<bool>())
                .prop_map(|(u, m, e, add)| Step::React(u, m, e, add)),
            1 => (0usize..16, who).prop_map(|(m, t)| Step::Edit(m, t)),
            2 => (0usize..3, 0i64..80).prop_map(|(u, s)| Step::Read(u, s)),
            1 => (0usize..16).prop_map(Step::Delete),
            1 => (1usize..3).prop_map(Step::Leave),
            1 => (1usize..3).prop_map(Step::Join),
        ]
    }

    fn text(target: Option<usize>) -> String {
        target.map_or("x".into(), |t| format!("hey @{}", NAMES[t]))
    }

    /// `user`'s unread mentions in the channel, recounted from its history.
    async fn mentions_of(store: &dyn Store, ch: i64, user: i64, read_seq: i64) -> i64 {
        let q = natter::model::HistoryQuery::newest(200);
        let all = store
            .history(ch, q, ReadFence::PRIMARY)
            .await
            .unwrap()
            .items;
        all.iter()
            .filter(|m| {
                m.seq > read_seq && !m.deleted && m.author_id != user && m.mentions.contains(&user)
            })
            .count() as i64
    }

    #[derive(Default)]
    struct Recount {
        /// `(message, emoji)` → who holds that reaction.
        reactions: BTreeMap<(i64, String), BTreeSet<i64>>,
        /// Root → its live replies, and the newest reply's time.
        replies: BTreeMap<i64, (BTreeSet<i64>, i64)>,
    }

    /// Replays the whole log.
    async fn recount(store: &dyn Store, ch: i64) -> Recount {
        let mut r = Recount::default();
        let mut after = 0;
        loop {
            let page = store.log(ch, after, 200, ReadFence::PRIMARY).await.unwrap();
            for e in &page.items {
                match &e.body {
                    EventBody::ReactionAdded {
                        message_id,
                        user_id,
                        emoji,
                    } => {
                        r.reactions
                            .entry((*message_id, emoji.clone()))
                            .or_default()
                            .insert(*user_id);
                    }
                    EventBody::ReactionRemoved {
                        message_id,
                        user_id,
                        emoji,
                    } => {
                        if let Some(users) = r.reactions.get_mut(&(*message_id, emoji.clone())) {
                            users.remove(user_id);
                        }
                    }
                    EventBody::MessageCreated(m) => {
                        if let Some(root) = m.thread_root_id {
                            let (live, newest) = r.replies.entry(root).or_default();
                            live.insert(m.id);
                            *newest = m.created_at;
                        }
                    }
                    EventBody::MessageDeleted(m) => {
                        r.reactions.retain(|(id, _), _| *id != m.id);
                        if let Some(root) = m.thread_root_id {
                            r.replies.entry(root).or_default().0.remove(&m.id);
                        }
                    }
                    _ => {}
                }
                after = e.seq;
            }
            if !page.has_more {
                break;
            }
        }
        r.reactions.retain(|_, users| !users.is_empty());
        r
    }

    async fn check(store: &dyn Store, steps: Vec<Step>) {
        let mut users = Vec::new();
        for name in NAMES {
            users.push(store.create_user(name, "h", None).await.unwrap().id);
        }
        let ch = store
            .create_channel(users[0], ChannelKind::Group, "r", &users[1..])
            .await
            .unwrap()
            .id;
        let first = store
            .post_message(users[0], ch, "first", None)
            .await
            .unwrap();
        let mut sent = vec![first.message.id];
        let mut authors = vec![users[0]];
        let mut deleted = HashSet::new();
        let mut member = [true; 3];
        for s in steps {
            match s {
                Step::Send(u, t, c) => {
                    let cid = format!("c{c}");
                    match store.post_message(users[u], ch, &text(t), Some(&cid)).await {
                        Ok(p) if p.created => {
                            sent.push(p.message.id);
                            authors.push(users[u]);
                        }
                        Ok(p) => {
                            assert!(sent.contains(&p.message.id), "a retry answers the original")
                        }
                        Err(StoreError::NotFound) => assert!(!member[u]),
                        Err(e) => panic!("send: {e}"),
                    }
                }
                Step::Reply(u, m, t) => {
                    // A reply to a reply, or to a deleted root without replies, is refused.
                    let root = sent[m % sent.len()];
                    match store.post_reply(users[u], ch, root, &text(t), None).await {
                        Ok(p) => {
                            assert!(member[u]);
                            sent.push(p.message.id);
                            authors.push(users[u]);
                        }
                        Err(StoreError::Invalid { .. } | StoreError::NotFound) => {}
                        Err(e) => panic!("reply: {e}"),
                    }
                }
                Step::React(u, m, e, add) => {
                    let id = sent[m % sent.len()];
                    let held = recount(store, ch)
                        .await
                        .reactions
                        .get(&(id, EMOJI[e].to_owned()))
                        .is_some_and(|who| who.contains(&users[u]));
                    let answer = store.react(users[u], ch, id, EMOJI[e], add).await;
                    if deleted.contains(&id) || !member[u] {
                        assert!(matches!(answer, Err(StoreError::NotFound)), "{answer:?}");
                    } else {
                        assert_eq!(answer.unwrap(), add != held, "react {add} when held {held}");
                    }
                }
                Step::Edit(m, t) => {
                    let i = m % sent.len();
                    match store.edit_message(authors[i], ch, sent[i], &text(t)).await {
                        Ok(_) => {}
                        Err(StoreError::NotFound) => {
                            let who = users.iter().position(|&x| x == authors[i]).unwrap();
                            assert!(deleted.contains(&sent[i]) || !member[who]);
                        }
                        Err(e) => panic!("edit: {e}"),
                    }
                }
                Step::Read(u, seq) => match store.mark_read(users[u], ch, seq).await {
                    Ok(()) => assert!(member[u]),
                    Err(StoreError::NotFound) => assert!(!member[u]),
                    Err(e) => panic!("read: {e}"),
                },
                Step::Leave(u) => {
                    if member[u] {
                        store.remove_member(users[u], ch, users[u]).await.unwrap();
                        member[u] = false;
                    }
                }
                Step::Join(u) => {
                    store
                        .put_member(users[0], ch, users[u], None)
                        .await
                        .unwrap();
                    member[u] = true;
                }
                Step::Delete(m) => {
                    // The channel's owner may delete any message; twice is a no-op.
                    let id = sent[m % sent.len()];
                    store.delete_message(users[0], ch, id).await.unwrap();
                    deleted.insert(id);
                }
            }
            for (u, &user) in users.iter().enumerate() {
                let views = store.channels(user).await.unwrap();
                let Some(view) = views.iter().find(|v| v.channel.id == ch) else {
                    assert!(!member[u]);
                    continue;
                };
                let want = mentions_of(store, ch, user, view.read_seq).await;
                assert_eq!(view.mentions, want, "user {user} at {}", view.read_seq);
            }
            let expected = recount(store, ch).await;
            for &viewer in &users {
                let mut got: BTreeMap<(i64, String), (i64, bool)> = BTreeMap::new();
                for (id, list) in store.reactions(viewer, ch, &sent).await.unwrap() {
                    for r in list {
                        got.insert((id, r.emoji), (r.count, r.me));
                    }
                }
                let want: BTreeMap<(i64, String), (i64, bool)> = expected
                    .reactions
                    .iter()
                    .map(|(k, users)| (k.clone(), (users.len() as i64, users.contains(&viewer))))
                    .collect();
                assert_eq!(got, want, "viewer {viewer}");
            }
            for &id in &sent {
                let m = store.message(ch, id).await.unwrap().unwrap();
                let (live, newest) = expected
                    .replies
                    .get(&id)
                    .map_or((0, None), |(live, at)| (live.len() as i64, Some(*at)));
                assert_eq!(
                    (m.reply_count, m.last_reply_at),
                    (live, newest),
                    "root {id}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
        #[test]
        fn projections_match_a_recount_on_sqlite(steps in prop::collection::vec(step(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let location = StoreLocation::Sqlite(dir.path().join("natter.db"));
                let store = natter::store::open(StoreOptions::new(location)).await.unwrap();
                check(&*store, steps).await;
                store.close().await;
            });
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        #[test]
        fn projections_match_a_recount_on_postgres(steps in prop::collection::vec(step(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let Some(shards) = crate::common::pg::databases(2).await else {
                    return;
                };
                let store = natter::store::open(StoreOptions::new(StoreLocation::Postgres(shards)))
                    .await
                    .unwrap();
                check(&*store, steps).await;
                store.close().await;
            });
        }
    }
}

mod search_index {
    //! The embedded store's search index lives in a file of its own, kept by a thread of
    //! its own: what was acknowledged is found at once, the index survives a restart, and
    //! one that is missing or was built for another copy of the database is rebuilt.

    use std::path::Path;

    use natter::model::ChannelKind;
    use natter::search::Query;
    use natter::store::sqlite::index_path;
    use natter::store::{SearchOrder, SearchQuery, Store, StoreLocation, StoreOptions};

    async fn open(path: &Path) -> std::sync::Arc<dyn Store> {
        natter::store::open(StoreOptions::new(StoreLocation::Sqlite(path.to_owned())))
            .await
            .unwrap()
    }

    async fn found(store: &dyn Store, user: i64, q: &str) -> Vec<String> {
        let query = SearchQuery {
            query: Query::parse(q).unwrap(),
            channel_id: None,
            order: SearchOrder::Newest,
            from: None,
            limit: 100,
        };
        let page = store.search(user, &query).await.unwrap();
        page.items.into_iter().map(|m| m.text).collect()
    }

    fn metric(store: &dyn Store, name: &str) -> String {
        let mut out = String::new();
        store.render_metrics(&mut out);
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in metrics"))
            .to_owned()
    }

    /// Waits until the index has been rebuilt (a search during a rebuild reads it as it
    /// is so far).
    async fn rebuilt(store: &dyn Store) {
        let mut waited = 0;
        while metric(store, "natter_search_index_rebuilding") != "0" {
            assert!(waited < 100, "the rebuild did not end");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            waited += 1;
        }
    }

    fn remove_index(db: &Path) {
        let index = index_path(db);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", index.display()));
        }
    }

    /// A store at `path` with a user (ann) and a channel of hers.
    async fn ann_in_a_channel(path: &Path) -> (std::sync::Arc<dyn Store>, i64, i64) {
        let store = open(path).await;
        let a = store.create_user("ann", "h", None).await.unwrap().id;
        let ch = store
            .create_channel(a, ChannelKind::Group, "c", &[])
            .await
            .unwrap()
            .id;
        (store, a, ch)
    }

    /// One number read from an SQLite file directly.
    fn read_number(file: &Path, sql: &str) -> i64 {
        rusqlite::Connection::open(file)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    fn queued(db: &Path) -> i64 {
        read_number(db, "SELECT count(*) FROM search_queue")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn found_at_once_kept_over_a_restart_and_rebuilt_when_missing_or_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        let (store, a, ch) = ann_in_a_channel(&path).await;
        let mut ids = Vec::new();
        for i in 0..30 {
            let m = store
                .post_message(a, ch, &format!("alpha {i}"), None)
                .await
                .unwrap()
                .message;
            ids.push(m.id);
        }
        store.edit_message(a, ch, ids[0], "gamma").await.unwrap();
        store.delete_message(a, ch, ids[1]).await.unwrap();
        let delta = store.post_message(a, ch, "delta", None).await.unwrap();
        // Found right after the acknowledgements: the search waits for the index.
        let expect_alpha: Vec<String> = (2..30).rev().map(|i| format!("alpha {i}")).collect();
        assert_eq!(found(&*store, a, "alpha").await, expect_alpha);
        assert_eq!(found(&*store, a, "gamma").await, ["gamma"]);
        assert_eq!(found(&*store, a, "delta").await, ["delta"]);

        // A backup now holds "delta"; then the live server deletes it.
        let copy = dir.path().join("copy").join("natter.db");
        std::fs::create_dir(copy.parent().unwrap()).unwrap();
        natter::store::sqlite::backup::backup(&path, &copy).unwrap();
        store.delete_message(a, ch, delta.message.id).await.unwrap();
        assert!(found(&*store, a, "delta").await.is_empty());
        store.close().await;

        // Reopened: the same index, not rebuilt.
        let store = open(&path).await;
        assert_eq!(metric(&*store, "natter_search_index_rebuilding"), "0");
        assert_eq!(found(&*store, a, "alpha").await, expect_alpha);
        assert!(found(&*store, a, "delta").await.is_empty());
        store.close().await;

        // Its file gone: rebuilt from the messages at once, before any search or write.
        remove_index(&path);
        let store = open(&path).await;
        // By itself, before any search or write.
        rebuilt(&*store).await;
        assert_eq!(found(&*store, a, "alpha").await, expect_alpha);
        assert_eq!(found(&*store, a, "gamma").await, ["gamma"]);
        store.close().await;
        drop(store);

        // The backup restored beside the live server's index (which lost "delta"): that
        // index is not the copy's, so it is rebuilt, and the copy's "delta" is found.
        std::fs::copy(index_path(&path), index_path(&copy)).unwrap();
        let _ = std::fs::remove_file(format!("{}-wal", index_path(&copy).display()));
        let foreign = read_number(&index_path(&copy), "SELECT epoch FROM indexed");
        assert_eq!(foreign, read_number(&path, "SELECT epoch FROM search_meta"));
        assert_ne!(foreign, read_number(&copy, "SELECT epoch FROM search_meta"));
        let restored = open(&copy).await;
        rebuilt(&*restored).await;
        assert_eq!(found(&*restored, a, "delta").await, ["delta"]);
        assert_eq!(found(&*restored, a, "alpha").await, expect_alpha);
        restored.close().await;
    }

    /// An older `natter.db` put back beside a newer index (same database, another
    /// moment: the index has passed rows its queue never had) is not trusted: rebuilt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_index_ahead_of_its_database_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        let (store, a, ch) = ann_in_a_channel(&path).await;
        let m = store.post_message(a, ch, "before", None).await.unwrap();
        assert_eq!(found(&*store, a, "before").await, ["before"]);
        store.close().await;
        drop(store);
        let older = dir.path().join("older.db");
        std::fs::copy(&path, &older).unwrap();
        let store = open(&path).await;
        store
            .edit_message(a, ch, m.message.id, "after")
            .await
            .unwrap();
        for i in 0..5 {
            store
                .post_message(a, ch, &format!("more {i}"), None)
                .await
                .unwrap();
        }
        assert_eq!(found(&*store, a, "after").await, ["after"]);
        store.close().await;
        drop(store);
        std::fs::copy(&older, &path).unwrap();
        // As an operator restoring a file would: the newer database's write-ahead log, if
        // a connection closing late left one, is not the older file's.
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let store = open(&path).await;
        rebuilt(&*store).await;
        assert_eq!(found(&*store, a, "before").await, ["before"]);
        assert!(found(&*store, a, "after").await.is_empty());
        store.close().await;
    }

    /// The queue's rows the index has passed are deleted by the writer, a few thousand at
    /// a time, so the queue stays short.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_is_trimmed_behind_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        let (store, a, ch) = ann_in_a_channel(&path).await;
        for round in 0..2 {
            let sends = (0..3000).map(|i| {
                let store = store.clone();
                async move {
                    let text = format!("word{round} n{i}");
                    store.post_message(a, ch, &text, None).await.unwrap();
                }
            });
            futures_util::future::join_all(sends).await;
            // The search folds the log and waits for the index to pass the queue.
            assert_eq!(found(&*store, a, &format!("word{round}")).await.len(), 100);
        }
        store.post_message(a, ch, "one more", None).await.unwrap();
        assert!(queued(&path) < 3000, "{} rows queued", queued(&path));
        store.close().await;
    }

    /// A damaged search index file is removed and rebuilt at open: it is derived data, and
    /// the server starts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_search_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        let (store, a, ch) = ann_in_a_channel(&path).await;
        store.post_message(a, ch, "needle", None).await.unwrap();
        store.close().await;
        let index = index_path(&path);
        let _ = std::fs::remove_file(format!("{}-wal", index.display()));
        let _ = std::fs::remove_file(format!("{}-shm", index.display()));
        std::fs::write(&index, vec![0x5a; 8192]).unwrap();
        let store = open(&path).await;
        rebuilt(&*store).await;
        assert_eq!(found(&*store, a, "needle").await, ["needle"]);
        store.close().await;
    }
}
