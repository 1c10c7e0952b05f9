//! WAL checkpoints off the writer's thread: this thread copies the log back into the
//! database in the background with PASSIVE checkpoints, which run beside the writer and
//! readers without blocking them. (Past the WAL's size limit the writer also takes the
//! last few frames itself between two batches, so SQLite can restart the log under
//! sustained writes; a backlog stays this thread's: `WalWatch` in `writer.rs`.)

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use std::sync::Arc;

use rusqlite::Connection;

use super::WriteStats;

/// Reads the free space of `dir`'s file system and refuses or resumes writes, logging
/// each change once.
pub(super) fn check_disk(dir: &Path, stats: &WriteStats, reserve: u64) {
    let Some((free, _)) = crate::process::disk_space(dir) else {
        return;
    };
    let (refused, changed) = stats.disk.update(free, reserve);
    if changed && refused {
        tracing::error!(
            free_mib = free >> 20,
            reserve_mib = reserve >> 20,
            dir = %dir.display(),
            "disk space below the reserve: writes are refused (507) until space is freed; reads still work"
        );
    } else if changed {
        tracing::info!(
            free_mib = free >> 20,
            "disk space back above the reserve: writes resumed"
        );
    }
}

/// A PASSIVE checkpoint (it waits for no one): whether another checkpoint was running
/// (then nothing was done), the WAL's frames, and those copied back.
pub(super) fn passive(conn: &Connection) -> rusqlite::Result<(bool, i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(0)? != 0, r.get(1)?, r.get(2)?))
    })
}

const INTERVAL: Duration = Duration::from_millis(250);

pub(super) struct Checkpointer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Starts the thread. It also reads the data directory's free space on every wake,
    /// so writes stop (`disk`) before the disk is full, with `reserve` bytes left for
    /// checkpoints and crash recovery.
    pub fn start(
        path: &Path,
        wal_limit: u64,
        disk: Arc<WriteStats>,
        reserve: u64,
    ) -> anyhow::Result<Self> {
        let conn = Connection::open(path)?;
        super::schema::configure(&conn, 2 * 1024)?;
        conn.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("natter-checkpoint".into()).spawn(move || {
            // Wakes every INTERVAL until told to stop (or the store is dropped).
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
                check_disk(&dir, &disk, reserve);
                match passive(&conn) {
                    Ok((false, log, copied)) => disk
                        .wal_backlog_frames
                        .store((log - copied).max(0), std::sync::atomic::Ordering::Relaxed),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "checkpoint WAL; will retry"),
                }
            }
            // Stopping: fold the whole log back and empty it.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "final WAL checkpoint; the log is replayed at next start");
            }
        })?;
        Ok(Self { stop, thread })
    }

    /// Runs a last full checkpoint and stops. Call after the writer stopped.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
