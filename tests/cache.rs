//! The hot-channel cache answers history and log reads exactly as the store does: the
//! same queries after random sends (some mentioning someone), edits (moving mentions),
//! deletes, replies, reactions and member changes give the same answers from the cache
//! (first run) and from the store (after a restart, the cache empty).

mod common;

use common::{Client, TestServer};
use proptest::prelude::*;
use reqwest::Method;
use serde_json::Value;

async fn answers(c: &Client, ch: &str, last_seq: i64) -> Vec<(String, Value)> {
    let mut paths = Vec::new();
    for limit in [1, 3, 7, 50, 200] {
        paths.push(format!("/v1/channels/{ch}/messages?limit={limit}"));
        for cursor in [1, 2, last_seq / 3, last_seq / 2, last_seq, last_seq + 1] {
            paths.push(format!(
                "/v1/channels/{ch}/messages?limit={limit}&before_seq={cursor}"
            ));
            paths.push(format!(
                "/v1/channels/{ch}/messages?limit={limit}&after_seq={cursor}"
            ));
            paths.push(format!(
                "/v1/channels/{ch}/messages?limit={limit}&after_seq={cursor}&before_seq={}",
                cursor + 5
            ));
            paths.push(format!(
                "/v1/channels/{ch}/events?limit={limit}&after_seq={cursor}"
            ));
        }
        paths.push(format!("/v1/channels/{ch}/events?limit={limit}"));
    }
    let mut out = Vec::new();
    for p in paths {
        let a = c.get(&p).await;
        assert_eq!(a.status, 200, "{p}: {a:?}");
        out.push((p, a.body));
    }
    out
}

#[test]
fn cached_answers_equal_the_stores() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    });
    let ops = proptest::collection::vec((0u8..12, any::<u16>()), 1..120);
    // A tiny cache evicts mid-run, so its runs start past seq 1 and reads straddle them.
    let cache_bytes = prop_oneof![Just(64usize << 20), Just(6 * 1024)];
    runner
        .run(&(ops, cache_bytes), |(ops, cache_bytes)| {
            rt.block_on(async {
                let server = TestServer::start_with(|c| c.gateway.cache_bytes = cache_bytes).await;
                let owner = server.client().register("owner").await;
                let other = server.client().register("other").await;
                let ch = owner.create_channel("room", "group", &[&other]).await;
                let mut ids: Vec<String> = Vec::new();
                for (op, n) in ops {
                    let pick = |ids: &Vec<String>| ids.get(n as usize % ids.len().max(1)).cloned();
                    match op {
                        0..=5 => {
                            let who = if n % 2 == 0 { &owner } else { &other };
                            let text = if n % 3 == 0 {
                                format!("@other text {n}")
                            } else {
                                format!("text {n}")
                            };
                            let a = who.send(&ch, &text, Some(&format!("c{n}"))).await;
                            if a.status == 201 && n % 2 == 0 {
                                ids.push(a.body["id"].as_str().unwrap().to_owned());
                            }
                        }
                        6 | 7 => {
                            if let Some(id) = pick(&ids) {
                                let path = format!("/v1/channels/{ch}/messages/{id}");
                                owner
                                    .call(
                                        Method::PATCH,
                                        &path,
                                        Some(serde_json::json!({"text": if n % 2 == 0 {
                                            format!("edit {n} @other")
                                        } else {
                                            format!("edit {n}")
                                        }})),
                                    )
                                    .await;
                            }
                        }
                        8 => {
                            if let Some(id) = pick(&ids) {
                                owner
                                    .call(
                                        Method::DELETE,
                                        &format!("/v1/channels/{ch}/messages/{id}"),
                                        None,
                                    )
                                    .await;
                            }
                        }
                        10 => {
                            if let Some(id) = pick(&ids) {
                                let body = serde_json::json!({"text": format!("re {n}"), "thread_root_id": id});
                                owner.post(&format!("/v1/channels/{ch}/messages"), body).await;
                            }
                        }
                        11 => {
                            if let Some(id) = pick(&ids) {
                                let path = format!("/v1/channels/{ch}/messages/{id}/reactions/👍");
                                let method = if n % 2 == 0 { Method::PUT } else { Method::DELETE };
                                owner.call(method, &path, None).await;
                            }
                        }
                        _ => {
                            let path = format!("/v1/channels/{ch}/members/{}", other.user_id);
                            owner.call(Method::DELETE, &path, None).await;
                            owner.call(Method::PUT, &path, None).await;
                        }
                    }
                }
                let last_seq = owner.get(&format!("/v1/channels/{ch}")).await.body["last_seq"]
                    .as_i64()
                    .unwrap();
                let cached = answers(&owner, &ch, last_seq).await;
                if cache_bytes > 1 << 20 {
                    let hits = common::ws::metric(&owner, "natter_event_cache_hits_total").await;
                    assert!(hits > 0.0, "the big cache served reads");
                }
                let server = server.restart().await;
                let owner = owner.with_base(&server.base());
                let stored = answers(&owner, &ch, last_seq).await;
                for ((path, a), (_, b)) in cached.iter().zip(&stored) {
                    assert_eq!(a, b, "{path}: cache vs store");
                }
                server.stop().await;
            });
            Ok(())
        })
        .unwrap();
}
