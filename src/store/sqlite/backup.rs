//! Online backup: a consistent snapshot of a live database, by SQLite's backup API.
//!
//! The copy runs in one step, so it reads one snapshot under one read transaction: in WAL
//! mode the server's writer goes on committing meanwhile, and none of those commits is
//! half in the copy. The copy goes to a temporary file, is checked with
//! `PRAGMA integrity_check`, synced, and only then renamed into place; a failed backup
//! leaves no `natter.db` behind that could be mistaken for a good one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::schema::has_table;

/// What a backup copied.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The new database file.
    pub path: PathBuf,
    pub bytes: u64,
    pub channels: i64,
    pub events: i64,
    pub took: Duration,
}

/// How long a busy or locked source is retried before the backup gives up.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(30);

/// Copies the database at `source` into `dest` (a file that must not exist yet).
pub fn backup(source: &Path, dest: &Path) -> anyhow::Result<BackupReport> {
    let started = Instant::now();
    if !source.is_file() {
        bail!("no database at {}", source.display());
    }
    if dest.exists() {
        bail!(
            "{} already exists; a backup never overwrites",
            dest.display()
        );
    }
    let src = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("open {}", source.display()))?;
    src.busy_timeout(Duration::from_secs(5))?;
    let partial = dest.with_extension("db.partial");
    let _ = std::fs::remove_file(&partial);
    let (channels, events) = match copy_and_check(&src, &partial) {
        Ok(counts) => counts,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("sync {}", partial.display()))?;
    std::fs::rename(&partial, dest).with_context(|| format!("rename to {}", dest.display()))?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("sync directory {}", dir.display()))?;
    }
    Ok(BackupReport {
        path: dest.to_owned(),
        bytes: std::fs::metadata(dest)?.len(),
        channels,
        events,
        took: started.elapsed(),
    })
}

/// What [`copy_files`] copied.
#[derive(Debug, Clone, Default)]
pub struct FilesReport {
    pub files: u64,
    pub bytes: u64,
    /// Files of uploads no message carries that were gone (collected since the snapshot).
    pub skipped: u64,
    /// Files of uploads a message carried in the snapshot that were gone all the same:
    /// the message was deleted and its upload collected while the backup ran (or the
    /// files directory lost them). Logged by digest.
    pub missing: u64,
}

/// Copies the uploaded files the backup at `db` records (each upload's bytes and
/// thumbnail) from the files directory `from` into `to`, each through a part file,
/// fsynced, then renamed. Run after the database copy, so every file it records was in
/// place when it was taken; one that no message carries may have been collected since
/// (skipped); one that a message carries is looked for twice, a second apart, and else
/// counted as missing and logged (its message may have been deleted and its upload
/// collected meanwhile).
pub fn copy_files(db: &Path, from: &Path, to: &Path) -> anyhow::Result<FilesReport> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("open {}", db.display()))?;
    let mut report = FilesReport::default();
    if !has_table(&conn, "uploads")? {
        return Ok(report);
    }
    let digests: Vec<(String, bool)> = conn
        .prepare(
            "SELECT d, max(carried) FROM (
                 SELECT sha256 AS d, EXISTS (SELECT 1 FROM message_files f WHERE f.upload_id = u.id) AS carried FROM uploads u
                 UNION ALL
                 SELECT thumb_sha256, EXISTS (SELECT 1 FROM message_files f WHERE f.upload_id = u.id) FROM uploads u
                 WHERE thumb_sha256 IS NOT NULL)
             GROUP BY d",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (digest, carried) in digests {
        if digest.len() < 2 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("the backup records a malformed file digest {digest:?}");
        }
        let rel = Path::new(&digest[..2]).join(&digest);
        let source = from.join(&rel);
        let target = to.join(&rel);
        let dir = target.parent().expect("a digest's directory");
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let partial = target.with_extension("partial");
        let mut copied = std::fs::copy(&source, &partial);
        if carried && matches!(&copied, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            std::thread::sleep(Duration::from_secs(1));
            copied = std::fs::copy(&source, &partial);
        }
        match copied {
            Ok(bytes) => report.bytes += bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !carried => {
                report.skipped += 1;
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(%digest, "a file a message carried is gone from the files directory; not in the backup");
                report.missing += 1;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("copy {}", source.display())),
        }
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("sync {}", partial.display()))?;
        std::fs::rename(&partial, &target)
            .with_context(|| format!("rename to {}", target.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("sync directory {}", dir.display()))?;
        report.files += 1;
    }
    Ok(report)
}

/// Copies `src` into a new file at `path` and checks the copy; returns its channel and
/// event counts.
fn copy_and_check(src: &Connection, path: &Path) -> anyhow::Result<(i64, i64)> {
    let mut dst = Connection::open(path).with_context(|| format!("create {}", path.display()))?;
    {
        let copy = Backup::new(src, &mut dst)?;
        let deadline = Instant::now() + BUSY_RETRY_FOR;
        loop {
            match copy.step(-1).context("copy pages")? {
                StepResult::Done => break,
                StepResult::More => {}
                StepResult::Busy | StepResult::Locked if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                StepResult::Busy | StepResult::Locked => {
                    bail!("the database stayed locked for {BUSY_RETRY_FOR:?}")
                }
                other => bail!("unexpected backup step result {other:?}"),
            }
        }
    }
    // The copy is a whole database in one file: no write-ahead log to carry around.
    dst.pragma_update(None, "journal_mode", "DELETE")?;
    // And every post in its channel's tables: the commit log is folded in the copy (a
    // database from before the log has none).
    if has_table(&dst, "commit_log")? {
        super::tail::fold_all(&mut dst).context("fold the copy's commit log")?;
    }
    // A copy is another database: a search index built for the live one is not its own
    // (`index.rs`), so one left beside it at a restore is rebuilt, not trusted.
    if has_table(&dst, "search_meta")? {
        dst.execute("UPDATE search_meta SET epoch = abs(random())", [])?;
    }
    let verdict: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        bail!("the copy failed its integrity check: {verdict}");
    }
    let channels = dst.query_row("SELECT count(*) FROM channels", [], |r| r.get(0))?;
    let events = dst.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    Ok((channels, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The usual upgrade: the new binary backs up the old server's database (schema 4, no
    /// commit log) before the restart migrates it.
    #[test]
    fn backs_up_a_database_from_before_the_commit_log() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("old.db");
        let conn = Connection::open(&src).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE channels (id INTEGER PRIMARY KEY);
             CREATE TABLE events (channel_id INTEGER, seq INTEGER, PRIMARY KEY (channel_id, seq));
             INSERT INTO channels VALUES (1);
             INSERT INTO events VALUES (1, 1), (1, 2);
             PRAGMA user_version = 4;",
        )
        .unwrap();
        let report = backup(&src, &dir.path().join("copy.db")).unwrap();
        assert_eq!((report.channels, report.events), (1, 2));
    }

    /// Regression: the new binary backing up a running server of an earlier build
    /// (schema 18, posts in its commit log, counted at their commit) refused (no
    /// `log_state` in the copy); folding the copy must not count the posts again.
    #[test]
    fn backs_up_a_database_whose_log_an_earlier_build_counted() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("old.db");
        let mut conn = Connection::open(&src).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        crate::store::sqlite::schema::migrate_to(&mut conn, 18);
        conn.execute_batch(
            "INSERT INTO channels (id, kind, name, owner_id, created_at, last_seq, live_messages)
                 VALUES (5, 'group', 'a', 9, 0, 3, 2);
             INSERT INTO members (channel_id, user_id, role, read_seq, live_read, own_unread)
                 VALUES (5, 9, 'owner', 1, 0, 2);
             INSERT INTO events (channel_id, seq, kind, at) VALUES (5, 1, 'member.added', 0);
             INSERT INTO commit_log (pos, channel_id, seq, message_id, author_id, text, at)
                 VALUES (7, 5, 2, 20, 9, 'one', 0), (8, 5, 3, 21, 9, 'two', 0);",
        )
        .unwrap();
        let copy = dir.path().join("copy.db");
        let report = backup(&src, &copy).unwrap();
        assert_eq!((report.channels, report.events), (1, 3));
        let copy = Connection::open(&copy).unwrap();
        let counters: (i64, i64, i64) = copy
            .query_row(
                "SELECT c.last_seq, c.live_messages, m.own_unread FROM channels c JOIN members m",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(counters, (3, 2, 2), "as the earlier build counted them");
    }
}
