//! The PostgreSQL backend's own behaviour, on real PostgreSQL servers: a shard restarted
//! under load fails only its own channels and comes back by itself; a shard list that
//! disagrees with the cluster is refused; two nodes cannot share a node id; `/readyz` and
//! `/metrics` report each shard; `natter migrate` and `natter backup` on PostgreSQL.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pg::Postgres;
use common::{TestServer, assert_gap_free};
use natter::store::{StoreLocation, StoreOptions};
use reqwest::StatusCode;

async fn open(shards: &[String], node_id: u16) -> anyhow::Result<Arc<dyn natter::store::Store>> {
    let mut opts = StoreOptions::new(StoreLocation::Postgres(shards.to_vec()));
    opts.node_id = node_id;
    natter::store::open(opts).await
}

/// The ids of the channels stored in database `url`.
async fn channels_in(url: &str) -> Vec<i64> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let ids = client
        .query("SELECT id FROM channels", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let _ = task.await;
    ids
}

#[tokio::test]
async fn a_shard_list_that_disagrees_with_the_cluster_is_refused() {
    let Some(dbs) = common::pg::databases(4).await else {
        return;
    };
    let (a, b, fresh, other) = (&dbs[0], &dbs[1], &dbs[2], &dbs[3]);
    let store = open(&[a.clone(), b.clone()], 1).await.unwrap();
    store.close().await;
    let other_cluster = open(std::slice::from_ref(other), 1).await.unwrap();
    other_cluster.close().await;
    for (list, says) in [
        (vec![b, a], "order"),
        (vec![a], "created with 2"),
        (vec![a, b, fresh], "created with 2"),
        (vec![a, fresh], "not a shard of this cluster"),
        (vec![a, other], "another cluster"),
        (vec![fresh, a], "must be that cluster's shard 0"),
    ] {
        let list: Vec<String> = list.into_iter().cloned().collect();
        let e = open(&list, 1)
            .await
            .err()
            .unwrap_or_else(|| panic!("{list:?} was accepted"));
        let text = format!("{e:#}");
        assert!(text.contains(says), "{list:?}: {text}");
    }
    // The right list still opens.
    open(&[a.clone(), b.clone()], 1)
        .await
        .unwrap()
        .close()
        .await;
}

#[tokio::test]
async fn the_binary_refuses_a_wrong_shard_list_at_start() {
    let Some(dbs) = common::pg::databases(2).await else {
        return;
    };
    open(&dbs, 1).await.unwrap().close().await;
    let swapped = format!("{},{}", dbs[1], dbs[0]);
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", &swapped])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("order the cluster was created with"),
        "{stderr}"
    );
}

#[tokio::test]
async fn two_live_nodes_cannot_share_a_node_id() {
    let Some(dbs) = common::pg::databases(2).await else {
        return;
    };
    let first = open(&dbs, 5).await.unwrap();
    let e = open(&dbs, 5)
        .await
        .err()
        .expect("a second node 5 is refused");
    assert!(
        format!("{e:#}").contains("held by another live node"),
        "{e:#}"
    );
    // Another id is fine beside it; once the first stops, its lease is gone, so the id
    // is free at once (a start would not have to wait it out).
    open(&dbs, 6).await.unwrap().close().await;
    first.close().await;
    let (client, conn) = tokio_postgres::connect(&dbs[0], tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let held: Vec<i32> = client
        .query("SELECT node_id FROM node_leases ORDER BY node_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(held.is_empty(), "leases left after a clean stop: {held:?}");
    drop(client);
    let _ = task.await;
    open(&dbs, 5).await.unwrap().close().await;
}

#[tokio::test]
async fn migrate_and_backup_commands_on_postgres() {
    let Some(dbs) = common::pg::databases(2).await else {
        return;
    };
    let store = dbs.join(",");
    let run = |args: Vec<String>| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_natter"))
            .args(&args)
            .output()
            .await
            .unwrap()
    };
    let out = run(vec!["migrate".into(), "--store".into(), store.clone()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // Fresh shards go from 0 to this build's version; migrating again changes nothing.
    let version = stdout
        .lines()
        .find_map(|l| l.strip_prefix("shard 0: schema version 0 -> "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(version.parse::<u32>().unwrap() >= 2, "{stdout}");
    assert!(stdout.contains("2 shard(s)"), "{stdout}");
    let again = run(vec!["migrate".into(), "--store".into(), store.clone()]).await;
    assert!(
        String::from_utf8_lossy(&again.stdout)
            .contains(&format!("shard 1: schema version {version} -> {version}"))
    );
    // The migrated shards serve.
    open(&dbs, 1).await.unwrap().close().await;
    let dir = tempfile::tempdir().unwrap();
    let out = run(vec![
        "backup".into(),
        "--store".into(),
        store,
        dir.path().join("b").display().to_string(),
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pg_dump") && stderr.contains("pg_basebackup"),
        "{stderr}"
    );
}

/// One shard's PostgreSQL is restarted while clients send to channels on both shards:
/// only that shard's channels get errors (503 with Retry-After), the other shard's go on,
/// `/readyz` says which shard is down, nothing acknowledged is lost, the logs stay
/// gap-free, and the node serves the shard again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_a_shard_fails_only_its_channels_and_loses_nothing() {
    let Some(shared) = common::pg::shared() else {
        return;
    };
    let shard0 = shared.database().await;
    let own = Postgres::start();
    own.sql("postgres", "CREATE DATABASE shard1").await;
    let shard1 = own.url("shard1");
    let shards = vec![shard0.clone(), shard1.clone()];
    let server = TestServer::start_with(|c| {
        c.store = Some(StoreLocation::Postgres(shards.clone()));
    })
    .await;
    let anon = server.client();
    let alice = anon.register("alice").await;
    let bob = anon.register("bob").await;
    // Channels until each shard holds at least two.
    let mut made = Vec::new();
    for i in 0..40 {
        made.push(
            alice
                .create_channel(&format!("c{i}"), "group", &[&bob])
                .await,
        );
        let on1 = channels_in(&shard1).await;
        let n1 = made
            .iter()
            .filter(|c| on1.contains(&c.parse().unwrap()))
            .count();
        if n1 >= 2 && made.len() - n1 >= 2 {
            break;
        }
    }
    let on1 = channels_in(&shard1).await;
    let (down, up): (Vec<String>, Vec<String>) = made
        .into_iter()
        .partition(|c| on1.contains(&c.parse().unwrap()));
    assert!(down.len() >= 2 && up.len() >= 2, "{down:?} {up:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let up_acked_while_down = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for (w, (client, channel, on_restarted_shard)) in [
        (alice.clone(), down[0].clone(), true),
        (bob.clone(), down[1].clone(), true),
        (alice.clone(), up[0].clone(), false),
        (bob.clone(), up[1].clone(), false),
    ]
    .into_iter()
    .enumerate()
    {
        let stop = stop.clone();
        let restarted = restarted.clone();
        let up_acked_while_down = up_acked_while_down.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: HashMap<String, String> = HashMap::new();
            let mut failed = Vec::new();
            for n in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let cid = format!("w{w}-{n}");
                let a = client.send(&channel, &cid, Some(&cid)).await;
                match a.status {
                    StatusCode::CREATED => {
                        if !on_restarted_shard && restarted.load(Ordering::Relaxed) {
                            up_acked_while_down.fetch_add(1, Ordering::Relaxed);
                        }
                        acked.insert(cid, a.body["id"].as_str().unwrap().to_owned());
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert!(
                            on_restarted_shard,
                            "a channel of the live shard failed: {a:?}"
                        );
                        assert_eq!(
                            (a.code(), a.retry_after.as_deref()),
                            ("unavailable", Some("1"))
                        );
                        failed.push(cid);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected {other}: {a:?}"),
                }
            }
            (channel, acked, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    restarted.store(true, Ordering::Relaxed);
    own.stop();
    // While it is down, /readyz names it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = anon.get("/readyz").await;
        if r.status == StatusCode::OK && r.body.as_str().unwrap_or("").contains("shard1: down") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported shard1 down: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The channel list names the down shard's channels as unavailable and lists the rest.
    let listed = alice.get("/v1/channels").await;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    let ids = |key: &str| -> Vec<String> {
        listed.body[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c.as_str().or(c["id"].as_str()).unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for c in &down {
        assert!(ids("unavailable").contains(c), "{listed:?}");
    }
    for c in &up {
        assert!(ids("channels").contains(c), "{listed:?}");
    }
    // So does a WebSocket's ready; the session ends with 1012 once the shard is back.
    let mut ws = common::ws::raw(server.addr).await;
    common::ws::send_text(
        &mut ws,
        &serde_json::json!({"op": "hello", "token": alice.token.clone().unwrap()}).to_string(),
    )
    .await;
    let ready = loop {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => break t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("no ready: {other:?}"),
        }
    };
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["type"], "ready");
    let unavailable: Vec<&str> = ready["unavailable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for c in &down {
        assert!(unavailable.contains(&c.as_str()), "{ready}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    own.restart();
    // The node serves the shard again by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = alice.send(&down[0], "back?", None).await;
        if a.status == StatusCode::CREATED {
            break;
        }
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
        assert!(Instant::now() < deadline, "the shard never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, code) = common::ws::read_to_close(&mut ws).await;
    assert_eq!(
        code,
        Some(1012),
        "a session with unavailable channels is told to resume"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for w in writers {
        results.push(w.await.unwrap());
    }
    assert!(
        up_acked_while_down.load(Ordering::Relaxed) > 0,
        "the live shard's channels kept taking sends while the other was down"
    );
    assert!(
        results.iter().any(|(_, _, failed)| !failed.is_empty()),
        "the restarted shard's channels saw errors"
    );
    for (channel, acked, failed) in results {
        let stored: HashMap<String, String> = alice
            .all_messages(&channel)
            .await
            .iter()
            .filter_map(|m| {
                Some((
                    m["client_id"].as_str()?.to_owned(),
                    m["id"].as_str().unwrap().to_owned(),
                ))
            })
            .collect();
        for (cid, id) in &acked {
            assert_eq!(stored.get(cid), Some(id), "acknowledged {cid} lost");
        }
        // A failed send retried with its client_id is stored at most once.
        for cid in failed {
            let a = alice.send(&channel, &cid, Some(&cid)).await;
            let b = alice.send(&channel, &cid, Some(&cid)).await;
            assert!(
                a.status.is_success() && b.status == StatusCode::OK,
                "{a:?} {b:?}"
            );
            assert_eq!(a.body["id"], b.body["id"]);
        }
        assert_gap_free(&alice.all_events(&channel).await);
    }
    let metrics = common::scrape(&server.base()).await;
    assert_eq!(
        metrics.get("natter_store_shard_up{shard=\"0\"}"),
        Some(&1.0)
    );
    assert!(metrics["natter_store_unreachable_total{shard=\"1\"}"] > 0.0);
    assert_eq!(metrics["natter_store_unreachable_total{shard=\"0\"}"], 0.0);
    server.stop().await;
}

/// `/readyz` lists each shard; `/metrics` has the per-shard series the dashboard reads.
#[tokio::test]
async fn readiness_and_metrics_report_each_shard() {
    common::on_postgres(async {
        let server = TestServer::start().await;
        let c = server.client().register("metric").await;
        let ch = c.create_channel("m", "group", &[]).await;
        assert_eq!(c.send(&ch, "hi", None).await.status, StatusCode::CREATED);
        let r = c.get("/readyz").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.as_str(), Some("ready\nshard0: up\nshard1: up"));
        let m = common::scrape(&server.base()).await;
        for shard in ["0", "1"] {
            for name in [
                "natter_store_shard_up",
                "natter_store_relay_pending",
                "natter_store_relay_lag_seconds",
                "natter_write_queue_depth",
                "natter_commit_batch_ops_count",
                "natter_store_pool_wait_seconds_count",
            ] {
                assert!(
                    m.contains_key(&format!("{name}{{shard=\"{shard}\"}}")),
                    "{name} for shard {shard}"
                );
            }
        }
        let committed: f64 = ["0", "1"]
            .iter()
            .map(|s| m[&format!("natter_messages_accepted_total{{shard=\"{s}\"}}")])
            .sum();
        assert_eq!(committed, 1.0);
        assert!(
            m["natter_store_relay_applied_total{shard=\"0\"}"]
                + m["natter_store_relay_applied_total{shard=\"1\"}"]
                >= 1.0
        );
        server.stop().await;
    })
    .await;
}

/// Regression: a node whose lease on its node id was taken (it lapsed while the node could
/// not renew, and another node took the id) went on handing out ids. Now it stops
/// writing a second before its last renewal could have lapsed, and says so in /metrics.
#[tokio::test]
async fn a_node_that_lost_its_node_id_lease_stops_writing() {
    let Some(dbs) = common::pg::databases(2).await else {
        return;
    };
    let store = open(&dbs, 9).await.unwrap();
    let user = store.create_user("leaser", "h", None).await.unwrap().id;
    let ch = store
        .create_channel(user, natter::model::ChannelKind::Group, "l", &[])
        .await
        .unwrap()
        .id;
    store.post_message(user, ch, "before", None).await.unwrap();
    // Another holder takes node id 9, as a node would after this one's lease lapsed.
    let (client, conn) = tokio_postgres::connect(&dbs[0], tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    client
        .execute(
            "UPDATE node_leases SET holder = 'another node', expires_at = expires_at + 600000 WHERE node_id = 9",
            &[],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.post_message(user, ch, "after", None).await {
            Err(natter::store::StoreError::Unreachable) => break,
            Ok(_) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "writes went on without the lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(
        store.create_user("another", "h", None).await,
        Err(natter::store::StoreError::Unreachable)
    ));
    let mut metrics = String::new();
    store.render_metrics(&mut metrics);
    assert!(
        metrics.contains("natter_store_node_lease_lost 1"),
        "{metrics}"
    );
    store.close().await;
    drop(client);
    let _ = task.await;
}
