//! Property test: paging history backwards (before_seq) and forwards (after_seq) with any
//! page size visits every message exactly once, with no gap and no overlap.

mod common;

use common::{Client, TestServer};
use proptest::prelude::*;
use reqwest::Method;

/// One page of history: its seqs (checked ascending and within `limit`) and `has_more`.
async fn page(c: &Client, ch: &str, limit: usize, cursor: &str) -> (Vec<i64>, bool) {
    let a = c
        .get(&format!("/v1/channels/{ch}/messages?limit={limit}{cursor}"))
        .await;
    let seqs: Vec<i64> = a.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.len() <= limit);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "each page ascends: {seqs:?}"
    );
    (seqs, a.body["has_more"].as_bool().unwrap())
}

async fn page_backward(c: &Client, ch: &str, limit: usize, max_pages: usize) -> Vec<i64> {
    let mut pages: Vec<Vec<i64>> = Vec::new();
    let mut cursor = String::new();
    loop {
        let (seqs, has_more) = page(c, ch, limit, &cursor).await;
        if let Some(first) = seqs.first() {
            cursor = format!("&before_seq={first}");
        }
        pages.push(seqs);
        if !has_more {
            return pages.into_iter().rev().flatten().collect();
        }
        assert!(pages.len() <= max_pages, "paging does not end");
    }
}

async fn page_forward(c: &Client, ch: &str, limit: usize, max_pages: usize) -> Vec<i64> {
    let mut all = Vec::new();
    let mut cursor = "&after_seq=0".to_owned();
    for _ in 0..=max_pages {
        let (seqs, has_more) = page(c, ch, limit, &cursor).await;
        if let Some(last) = seqs.last() {
            cursor = format!("&after_seq={last}");
        }
        all.extend(seqs);
        if !has_more {
            return all;
        }
    }
    panic!("paging does not end");
}

#[test]
fn history_pages_have_no_gap_and_no_overlap() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start());
    let owner = rt.block_on(server.client().register("pager"));
    let extra = rt.block_on(server.client().register("extra"));
    let case = std::sync::atomic::AtomicUsize::new(0);
    proptest!(ProptestConfig { cases: 24, ..ProptestConfig::default() }, |(
        count in 0usize..90,
        limit in 1usize..30,
        delete_every in 0usize..5,
        member_churn_at in 0usize..90,
    )| {
        let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(async {
            let ch = owner.create_channel(&format!("p{case}"), "group", &[]).await;
            let mut expected = Vec::new();
            for i in 0..count {
                if i == member_churn_at {
                    // Member events between messages make message seqs sparse.
                    let path = format!("/v1/channels/{ch}/members/{}", extra.user_id);
                    owner.call(Method::PUT, &path, None).await;
                    owner.call(Method::DELETE, &path, None).await;
                }
                let m = owner.send(&ch, &format!("message {i}"), None).await;
                expected.push(m.body["seq"].as_i64().unwrap());
                if delete_every > 0 && i % delete_every == 0 {
                    let path = format!("/v1/channels/{ch}/messages/{}", m.body["id"].as_str().unwrap());
                    owner.call(Method::DELETE, &path, None).await;
                }
            }
            let max_pages = expected.len() / limit + 1;
            assert_eq!(page_backward(&owner, &ch, limit, max_pages).await, expected, "backward, limit {limit}");
            assert_eq!(page_forward(&owner, &ch, limit, max_pages).await, expected, "forward, limit {limit}");
        });
    });
    rt.block_on(server.stop());
}
