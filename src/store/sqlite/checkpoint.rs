//! WAL checkpoints off the writer's thread: the writer never stops to copy the log back
//! into the database; this thread does it in the background with PASSIVE checkpoints,
//! which run beside the writer and readers without blocking them.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

const INTERVAL: Duration = Duration::from_millis(250);

pub(super) struct Checkpointer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    pub fn start(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path)?;
        super::schema::configure(&conn, 2 * 1024)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("natter-checkpoint".into()).spawn(move || {
            // Wakes every INTERVAL until told to stop (or the store is dropped).
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "checkpoint WAL; will retry");
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
