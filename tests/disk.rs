//! A full disk (security review, defect 12): writes stop before the disk is full, with
//! 507 and Retry-After; `/readyz` turns 503; reads go on; a server killed with -9 while
//! its disk is low starts again and says why writes are refused; writes resume once space
//! is freed; and the WAL file is bounded after checkpoints. On a real small file system:
//! a tmpfs the test mounts (root only; skipped without, except under CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::child::ServerProcess;
use reqwest::StatusCode;
use serde_json::json;

/// A tmpfs of `mib` MiB, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        common::available("mounting a tmpfs (needs root)", ok).then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        natter::process::disk_space(self.path()).unwrap().0
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Polls `f` every 100 ms, at most `tries` times, until it is true.
async fn eventually(tries: u32, mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..tries {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn status(base: &str, path: &str) -> StatusCode {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_disk_below_its_reserve_refuses_writes_with_507_and_keeps_reads() {
    let Some(disk) = SmallDisk::mount(96) else {
        return;
    };
    let data = disk.path().join("data");
    let args = ["--disk-reserve-mib", "32"];
    let server = ServerProcess::start_with(&data, "127.0.0.1:0", &args, &[]).await;
    let base = server.base();
    let anon = common::Client::new(&base);
    let a = anon.register("alice").await;
    let ch = a.create_channel("room", "group", &[]).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let r = a
            .send(&ch, &format!("before {i}"), Some(&format!("b{i}")))
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        acked.push(r.body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(status(&base, "/readyz").await, StatusCode::OK);

    // Something else fills the disk to below the reserve.
    let filler: PathBuf = disk.path().join("filler");
    let fill = disk.free().saturating_sub(20 << 20);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    // Until the server has read the disk again, a send may still be taken: kept as acked.
    let mut refused = false;
    for i in 0..50 {
        let r = a.send(&ch, "while low", Some(&format!("w{i}"))).await;
        if r.status == StatusCode::INSUFFICIENT_STORAGE {
            refused = true;
            break;
        }
        assert_eq!(r.status, StatusCode::CREATED);
        acked.push(r.body["id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "writes refused below the reserve: {}",
        server.log_text()
    );
    let r = a.send(&ch, "while low", Some("low")).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
    );
    assert!(r.retry_after.is_some());
    let other = a
        .post("/v1/channels", json!({"name": "more", "kind": "group"}))
        .await;
    assert_eq!(other.status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(
        status(&base, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(status(&base, "/healthz").await, StatusCode::OK);
    assert_eq!(a.all_messages(&ch).await.len(), acked.len(), "reads work");
    let m = common::scrape(&base).await;
    assert_eq!(m["natter_disk_writes_refused"], 1.0);
    assert!(
        server.log_text().contains("disk space below the reserve"),
        "{}",
        server.log_text()
    );

    // Killed while low, it starts again on the same data, and says why in one line.
    server.kill().await;
    let server = ServerProcess::start_with(&data, "127.0.0.1:0", &args, &[]).await;
    let base = server.base();
    let a = a.with_base(&base);
    let said: Vec<String> = server
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("disk space below the reserve"))
        .cloned()
        .collect();
    assert_eq!(said.len(), 1, "{}", server.log_text());
    assert_eq!(
        status(&base, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let stored: Vec<String> = a
        .all_messages(&ch)
        .await
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stored, acked, "every acknowledged message, nothing else");

    // Space freed: writes resume and the server is ready again.
    std::fs::remove_file(&filler).unwrap();
    let resumed = eventually(50, async || {
        a.send(&ch, "after", Some("after")).await.status == StatusCode::CREATED
    })
    .await;
    assert!(resumed, "{}", server.log_text());
    assert_eq!(status(&base, "/readyz").await, StatusCode::OK);
    server.terminate().await;
}

/// A server whose WAL limit is 1 MiB, a user, their channel, and the WAL file's path.
async fn with_a_1_mib_wal(dir: &Path) -> (ServerProcess, common::Client, String, PathBuf) {
    let server =
        ServerProcess::start_with(dir, "127.0.0.1:0", &["--wal-size-limit-mib", "1"], &[]).await;
    let a = common::Client::new(&server.base()).register("alice").await;
    let ch = a.create_channel("room", "group", &[]).await;
    (server, a, ch, dir.join("natter.db-wal"))
}

/// 200 posts of 4,000 bytes at once, each acknowledged (`round` keeps their ids apart).
async fn post_200(a: &common::Client, ch: &str, round: usize) {
    let text = "w".repeat(4000);
    let sends = (0..200).map(|i| {
        let (a, text) = (a.clone(), text.clone());
        async move {
            a.send(ch, &text, Some(&format!("{round}-{i}")))
                .await
                .status
        }
    });
    for s in futures_util::future::join_all(sends).await {
        assert_eq!(s, StatusCode::CREATED);
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The WAL stayed at ~300 MB after a sustained burst: it is truncated to
/// `--wal-size-limit-mib` once a checkpoint has emptied it.
#[tokio::test]
async fn the_wal_file_is_bounded_after_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (server, a, ch, wal) = with_a_1_mib_wal(dir.path()).await;
    let mut peak = 0;
    for round in 0..8 {
        post_200(&a, &ch, round).await;
        peak = peak.max(file_size(&wal));
    }
    assert!(
        peak > 1 << 20,
        "the burst grew the WAL past the limit ({peak} bytes)"
    );
    // Once the burst is over, the next writes after a checkpoint start the log afresh.
    let bounded = eventually(100, async || {
        a.send(&ch, "small", None).await;
        file_size(&wal) <= 1 << 20
    })
    .await;
    assert!(bounded, "WAL still {} bytes", file_size(&wal));
    server.terminate().await;
}

/// After a burst the writer, idle, folds the whole commit log a chunk at a time; it
/// checked the WAL's size only after a batch of writes, so the fold of 12 MB of posts
/// grew the WAL by all of it (to 13.5–15 MB), past its limit (seen as a 17 MB WAL in
/// `the_wal_stays_bounded_while_writes_never_pause` on a run where the writes paused).
/// It checks after each chunk of a quiet fold too.
#[tokio::test]
async fn the_wal_stays_bounded_while_the_idle_writer_folds_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let (server, a, ch, wal) = with_a_1_mib_wal(dir.path()).await;
    for round in 0..15 {
        post_200(&a, &ch, round).await;
    }
    // No write now: the writer folds the 3,000 posts' rows (about 12 MB) by itself.
    let mut sizes = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sizes.push(file_size(&wal));
    }
    // The limit plus a chunk's pages (512 posts' rows, ~1.8 MB), two where a reader held
    // the WAL at the check after the first (4.6 MB seen in a full-suite run), from half a
    // second on (the fold starts 250 ms after the last write; what the burst left is
    // restarted by then). Checked only after batches, the fold grew it to 13.5–15 MB.
    let late = sizes[5..].iter().copied().max().unwrap();
    assert!(
        late <= 6 << 20,
        "WAL at {late} bytes while the idle writer folded the burst: {sizes:?}"
    );
    server.terminate().await;
}

/// Under writes that never pause, the background checkpoints (PASSIVE, beside the writer)
/// never found every frame copied back, so SQLite never restarted the WAL: it grew by all
/// that was written (~20 MB/s at 2,000 msgs/s) for as long as the load lasted. Past its
/// limit the writer now checkpoints it itself between two batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_while_writes_never_pause() {
    let dir = tempfile::tempdir().unwrap();
    let (server, a, ch, wal) = with_a_1_mib_wal(dir.path()).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Eight senders keep the writer's queue from ever running dry.
    let senders: Vec<_> = (0..8)
        .map(|s| {
            let (a, ch, stop) = (a.clone(), ch.clone(), std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                let text = "w".repeat(4000);
                let mut sent = 0u32;
                // Bounded: at most 20,000 sends each, and the sampling below stops them.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 20_000 {
                    let status = a
                        .send(&ch, &text, Some(&format!("{s}-{sent}")))
                        .await
                        .status;
                    assert_eq!(status, StatusCode::CREATED);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut sizes = Vec::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sizes.push(file_size(&wal));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for s in senders {
        sent += s.await.unwrap();
    }
    let written = u64::from(sent) * 4000;
    assert!(
        written > 8 << 20,
        "the load wrote {written} bytes of text: too little to tell"
    );
    // The limit, plus what commits add between two of the writer's checks (100 ms, and
    // more where a reader held the WAL at a check); without the writer's checkpoints it
    // was every byte written.
    let late = sizes[30..].iter().copied().max().unwrap();
    assert!(
        late <= 16 << 20,
        "WAL at {late} bytes in the last three seconds ({written} bytes written): {sizes:?}"
    );
    server.terminate().await;
}
