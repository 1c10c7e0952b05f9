//! Reading a stopped server's (or a backup's) SQLite file directly, for tests that check
//! what reached the disk.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// Opens `dir/natter.db` read-only and asserts it passes `PRAGMA integrity_check`, after
/// folding the posts a stop left in its commit log into the channel tables (as the next
/// start does).
pub fn open_checked(dir: &Path) -> Connection {
    let path = dir.join("natter.db");
    let check = |db: &Connection| {
        let verdict: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(verdict, "ok");
    };
    check(&Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap());
    natter::store::sqlite::fold_commit_log(&path).unwrap();
    let db = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    check(&db);
    db
}

/// Posts in `dir/natter.db`'s commit log, not yet folded into the channel tables: none
/// after a clean stop or in a backup.
pub fn unfolded_posts(dir: &Path) -> i64 {
    let db = Connection::open_with_flags(dir.join("natter.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    db.query_row("SELECT count(*) FROM commit_log", [], |r| r.get(0))
        .unwrap()
}

/// Asserts the channel's log is exactly seqs 1..=`last_seq` and returns `last_seq`.
pub fn assert_gap_free(db: &Connection, channel: i64) -> i64 {
    let seqs: Vec<i64> = db
        .prepare("SELECT seq FROM events WHERE channel_id = ? ORDER BY seq")
        .unwrap()
        .query_map([channel], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let last: i64 = db
        .query_row(
            "SELECT last_seq FROM channels WHERE id = ?",
            [channel],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "channel {channel}");
    last
}

/// The channel's messages that carry a client id, as (seq, client id, message id), by seq.
pub fn messages_with_client_ids(db: &Connection, channel: i64) -> Vec<(i64, String, String)> {
    db.prepare(
        "SELECT seq, client_id, id FROM messages WHERE channel_id = ? AND client_id IS NOT NULL \
         ORDER BY seq",
    )
    .unwrap()
    .query_map([channel], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?.to_string()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}
