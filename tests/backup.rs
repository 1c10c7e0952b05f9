//! `natter backup` while the server takes writes: the copy is one consistent snapshot
//! (integrity check passes, every channel's log gap-free, every message acknowledged
//! before the backup began is in it), and a server started on it serves it.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Client;
use common::child::ServerProcess;
use common::db;

fn backup(data_dir: &Path, to: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_natter"))
        .arg("backup")
        .arg("--data-dir")
        .arg(data_dir)
        .arg(to)
        .env_remove("NATTER_DATA_DIR")
        .output()
        .unwrap()
}

/// Per channel: (seq, client id) of every message in the backup, after checking the
/// database whole and each channel's log gap-free and matching its `last_seq`.
fn check_backup(dir: &Path) -> HashMap<i64, Vec<(i64, String)>> {
    assert_eq!(db::unfolded_posts(dir), 0, "a backup's posts are folded");
    let db = db::open_checked(dir);
    let mode: String = db
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "a backup is one self-contained file");
    let channels: Vec<i64> = db
        .prepare("SELECT id FROM channels")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut out = HashMap::new();
    for channel in channels {
        let last_seq = db::assert_gap_free(&db, channel);
        let messages: Vec<(i64, String)> = db::messages_with_client_ids(&db, channel)
            .into_iter()
            .map(|(seq, cid, _)| (seq, cid))
            .collect();
        assert!(messages.iter().all(|(s, _)| *s <= last_seq));
        out.insert(channel, messages);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_is_one_consistent_snapshot_that_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data).await;
    let anon = Client::new(&server.base());
    let alice = anon.register("alice").await;
    let mut channels = Vec::new();
    for i in 0..4 {
        channels.push(
            alice
                .create_channel(&format!("room{i}"), "group", &[])
                .await,
        );
    }
    // Senders, one per channel, each recording when each of its sends was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let mut senders = Vec::new();
    for (k, ch) in channels.iter().enumerate() {
        let (alice, ch, stop, acked) = (
            alice.clone(),
            ch.clone(),
            Arc::clone(&stop),
            Arc::clone(&acked),
        );
        senders.push(tokio::spawn(async move {
            for i in 0..50_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let cid = format!("c{k}-{i}");
                let a = alice.send(&ch, &format!("message {i}"), Some(&cid)).await;
                assert!(a.status.is_success(), "{a:?}");
                acked.lock().unwrap().push((cid, Instant::now()));
            }
        }));
    }
    let wait_for = |n: usize| {
        let acked = Arc::clone(&acked);
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while acked.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // Two backups, each taken while the senders go on.
    let mut taken = Vec::new();
    for (n, name) in [(200, "first"), (600, "second")] {
        wait_for(n).await;
        let to = dir.path().join(name);
        let began = Instant::now();
        let out = {
            let (data, to) = (data.clone(), to.clone());
            tokio::task::spawn_blocking(move || backup(&data, &to))
                .await
                .unwrap()
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("integrity check ok"));
        taken.push((to, began));
    }
    let during = acked.lock().unwrap().len();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let total = acked.lock().unwrap().len();
    assert!(total > during, "writes went on during the backups");

    let acked = acked.lock().unwrap().clone();
    let mut sizes = Vec::new();
    for (dir, began) in &taken {
        let backed = check_backup(dir);
        assert_eq!(backed.len(), 4, "every channel");
        let in_backup: std::collections::HashSet<&str> = backed
            .values()
            .flatten()
            .map(|(_, cid)| cid.as_str())
            .collect();
        // Everything acknowledged before the backup began is in it.
        let before: Vec<_> = acked.iter().filter(|(_, at)| at < began).collect();
        assert!(!before.is_empty());
        for (cid, _) in &before {
            assert!(
                in_backup.contains(cid.as_str()),
                "{cid} acknowledged before the backup"
            );
        }
        // And it holds no more than was sent: each channel's messages are a prefix of
        // what its sender sent, in order.
        for messages in backed.values() {
            for (i, (_, cid)) in messages.iter().enumerate() {
                assert!(cid.ends_with(&format!("-{i}")), "{cid} at {i}");
            }
        }
        sizes.push(in_backup.len());
    }
    assert!(
        sizes[1] > sizes[0],
        "the later backup holds more: {sizes:?}"
    );

    // A backup never overwrites.
    let again = backup(&data, &taken[0].0);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    server.terminate().await;

    // A server on the first backup serves exactly what the backup holds.
    let backed = check_backup(&taken[0].0);
    let restored = ServerProcess::start(&taken[0].0).await;
    let alice = alice.with_base(&restored.base());
    for ch in &channels {
        let messages = alice.all_messages(ch).await;
        let want = &backed[&ch.parse::<i64>().unwrap()];
        let got: Vec<(i64, String)> = messages
            .iter()
            .map(|m| {
                (
                    m["seq"].as_i64().unwrap(),
                    m["client_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(&got, want, "channel {ch}");
    }
    // And takes writes.
    let a = alice.send(&channels[0], "after restore", None).await;
    assert!(a.status.is_success(), "{a:?}");
    restored.terminate().await;
}

#[test]
fn a_backup_of_nothing_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = backup(&dir.path().join("empty"), &dir.path().join("copy"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database at"));
    assert!(!dir.path().join("copy").join("natter.db").exists());
}
