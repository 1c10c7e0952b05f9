//! The store conformance suite against the embedded SQLite backend.

use natter::store::conformance::{self, CHECKS};
use natter::store::sqlite::{SqliteOptions, SqliteStore};

#[tokio::test]
async fn sqlite_passes_every_conformance_check() {
    for name in CHECKS {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&SqliteOptions::new(dir.path().join("natter.db"))).unwrap();
        conformance::run(name, &store).await;
        store.close();
    }
}

mod unread_projection {
    //! Property: the unread counts kept as a projection always equal a recount from
    //! history, whatever mix of sends, deletes, read-marker moves and membership changes.

    use natter::model::{ChannelKind, HistoryQuery};
    use natter::store::sqlite::{SqliteOptions, SqliteStore};
    use natter::store::{Accounts, Channels};
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

    async fn recount(store: &SqliteStore, channel: i64, user: i64, read_seq: i64) -> i64 {
        let all = store
            .history(channel, HistoryQuery::newest(200))
            .await
            .unwrap()
            .items;
        all.iter()
            .filter(|m| m.seq > read_seq && m.author_id != user && !m.deleted)
            .count() as i64
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
        #[test]
        fn unread_matches_a_recount(steps in prop::collection::vec(step(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = SqliteStore::open(&SqliteOptions::new(dir.path().join("natter.db"))).unwrap();
                let mut users = Vec::new();
                for name in ["own", "two", "three"] {
                    users.push(store.create_user(name, "h", None).await.unwrap().id);
                }
                let ch = store.create_channel(users[0], ChannelKind::Group, "u", &users[1..]).await.unwrap().id;
                let mut sent = Vec::new();
                for s in steps {
                    match s {
                        Step::Send(u) => {
                            if let Ok(p) = store.post_message(users[u], ch, "x", None).await {
                                sent.push(p.message.id);
                            }
                        }
                        Step::Delete(u, i) if !sent.is_empty() => {
                            let _ = store.delete_message(users[u], ch, sent[i % sent.len()]).await;
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
                        if let Some(view) = store.channels(user).await.unwrap().into_iter().find(|v| v.channel.id == ch) {
                            let expected = recount(&store, ch, user, view.read_seq).await;
                            assert_eq!(view.unread, expected, "user {user} at read_seq {}", view.read_seq);
                        }
                    }
                }
                store.close();
            });
        }
    }
}
