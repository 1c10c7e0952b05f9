//! The SQLite schema as numbered migrations, applied at open in one transaction each and
//! recorded in `PRAGMA user_version`.

use rusqlite::{Connection, Transaction};

/// One migration: SQL, or a step that needs Rust (a backfill computed per row).
enum Migration {
    Sql(&'static str),
    Rust(fn(&Transaction) -> rusqlite::Result<()>),
}

/// Migration `i` moves the schema from version `i` to `i + 1`. Never edit a shipped one:
/// append a new one.
const MIGRATIONS: &[Migration] = &[
    // 1: accounts, channels, members, the event log and its message projection.
    Migration::Sql(
        r#"
    CREATE TABLE users (
        id            INTEGER PRIMARY KEY,
        username      TEXT NOT NULL,
        username_key  TEXT NOT NULL UNIQUE,   -- lower-cased, for case-insensitive lookup
        password_hash TEXT NOT NULL,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BLOB PRIMARY KEY,          -- SHA-256 of the bearer token
        user_id    INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sessions_user ON sessions(user_id);
    CREATE TABLE channels (
        id            INTEGER PRIMARY KEY,
        kind          TEXT NOT NULL,
        name          TEXT,
        owner_id      INTEGER NOT NULL,
        last_seq      INTEGER NOT NULL DEFAULT 0,
        live_messages INTEGER NOT NULL DEFAULT 0, -- messages not deleted
        dm_key        TEXT UNIQUE,                -- "low:high" user ids, DMs only
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE members (
        channel_id INTEGER NOT NULL,
        user_id    INTEGER NOT NULL,
        role       TEXT NOT NULL,
        read_seq   INTEGER NOT NULL,
        live_read  INTEGER NOT NULL,  -- live messages with seq <= read_seq
        own_unread INTEGER NOT NULL,  -- own live messages with seq > read_seq
        PRIMARY KEY (channel_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX members_user ON members(user_id, channel_id);
    CREATE TABLE messages (
        id         INTEGER PRIMARY KEY,
        channel_id INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        author_id  INTEGER NOT NULL,
        text       TEXT NOT NULL,
        client_id  TEXT,
        created_at INTEGER NOT NULL,
        edited_at  INTEGER,
        deleted    INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX messages_client ON messages(channel_id, author_id, client_id)
        WHERE client_id IS NOT NULL;
    CREATE TABLE events (
        channel_id INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        at         INTEGER NOT NULL,
        message_id INTEGER,          -- message events
        user_id    INTEGER,          -- member events
        body       TEXT,             -- message text snapshot, member role, or channel name
        PRIMARY KEY (channel_id, seq)
    ) WITHOUT ROWID;
    -- A message's events, for edits and redaction. Message ids grow with time, so this
    -- index only ever appends.
    CREATE INDEX events_message ON events(message_id) WHERE message_id IS NOT NULL;
    "#,
    ),
    // 2: usernames folded (shown as stored) and their look-alike skeletons.
    Migration::Rust(username_skeletons),
    // 3: sessions get a public id, where they were made from, and when last used.
    Migration::Rust(session_details),
    // 4: whether the other side of a DM has answered it (a DM then counts as consent).
    Migration::Sql(
        r#"
    ALTER TABLE channels ADD COLUMN dm_answered INTEGER NOT NULL DEFAULT 0;
    UPDATE channels SET dm_answered = 1 WHERE kind = 'dm' AND EXISTS (
        SELECT 1 FROM messages m WHERE m.channel_id = channels.id AND m.author_id != channels.owner_id);
    "#,
    ),
    // 5: the commit log: posts append here and are folded into `events` and `messages`
    // in the background (see `tail.rs`).
    Migration::Sql(
        r#"
    CREATE TABLE commit_log (
        pos        INTEGER PRIMARY KEY,
        channel_id INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        author_id  INTEGER NOT NULL,
        text       TEXT NOT NULL,
        client_id  TEXT,
        at         INTEGER NOT NULL
    );
    "#,
    ),
    // 6: reactions, one row per user and emoji on a message, and their counts per emoji
    // (the projection the message view reads; `first_seq` orders a message's emoji).
    Migration::Sql(
        r#"
    CREATE TABLE reactions (
        message_id INTEGER NOT NULL,
        user_id    INTEGER NOT NULL,
        emoji      TEXT NOT NULL,
        channel_id INTEGER NOT NULL,
        seq        INTEGER NOT NULL,  -- of its `reaction.added` event
        at         INTEGER NOT NULL,
        PRIMARY KEY (message_id, user_id, emoji)
    ) WITHOUT ROWID;
    CREATE INDEX reactions_emoji ON reactions(message_id, emoji, seq);
    CREATE TABLE reaction_counts (
        message_id INTEGER NOT NULL,
        emoji      TEXT NOT NULL,
        count      INTEGER NOT NULL,
        first_seq  INTEGER NOT NULL,
        PRIMARY KEY (message_id, emoji)
    ) WITHOUT ROWID;
    "#,
    ),
    // 7: threads. A reply names its root; a root counts its live replies and keeps when
    // the newest was posted. Replies are read by root, in seq order.
    Migration::Sql(
        r#"
    ALTER TABLE messages ADD COLUMN thread_root_id INTEGER;
    ALTER TABLE messages ADD COLUMN reply_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN last_reply_at INTEGER;
    CREATE INDEX messages_thread ON messages(thread_root_id, seq) WHERE thread_root_id IS NOT NULL;
    "#,
    ),
    // 8: mentions. A message keeps the members its text mentions (ids, comma-separated);
    // `mentions` holds one row per mentioned member but its author, for a member's count
    // of unread mentions (`members.mention_unread`) and their list of recent mentions.
    Migration::Sql(
        r#"
    ALTER TABLE messages ADD COLUMN mentions TEXT;
    ALTER TABLE events ADD COLUMN mentions TEXT;      -- a message event's, as of the event
    ALTER TABLE members ADD COLUMN mention_unread INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE mentions (
        user_id    INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        PRIMARY KEY (user_id, message_id)
    ) WITHOUT ROWID;
    CREATE INDEX mentions_channel ON mentions(channel_id, user_id, seq);
    CREATE INDEX mentions_message ON mentions(message_id);
    "#,
    ),
    // 9: profiles: a display name and an about text, both optional.
    Migration::Sql(
        r#"
    ALTER TABLE users ADD COLUMN display_name TEXT;
    ALTER TABLE users ADD COLUMN about TEXT;
    "#,
    ),
    // 10: search. A full-text index of the live messages' text (contentless: the text
    // stays in `messages` alone; a row is deleted by rowid), with each message's channel
    // as a token of its own column, so a search intersects its words with the caller's
    // channels inside the index. Kept by triggers, so every write of a message's text
    // (the fold of a post, a slow-path post, an edit, a delete) changes the index in
    // its own transaction.
    Migration::Sql(
        r#"
    CREATE VIRTUAL TABLE messages_fts USING fts5(
        text, ch, content='', contentless_delete=1,
        tokenize='unicode61 remove_diacritics 2'
    );
    INSERT INTO messages_fts (rowid, text, ch)
        SELECT id, text, channel_id FROM messages WHERE deleted = 0;
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages WHEN new.deleted = 0 BEGIN
        INSERT INTO messages_fts (rowid, text, ch) VALUES (new.id, new.text, new.channel_id);
    END;
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF text, deleted ON messages BEGIN
        DELETE FROM messages_fts WHERE rowid = old.id;
        INSERT INTO messages_fts (rowid, text, ch)
            SELECT new.id, new.text, new.channel_id WHERE new.deleted = 0;
    END;
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        DELETE FROM messages_fts WHERE rowid = old.id;
    END;
    "#,
    ),
    // 11: presence: when each user was last online.
    Migration::Sql("ALTER TABLE users ADD COLUMN last_seen_at INTEGER;"),
    // 12: the search index moves to a file of its own, kept by a thread of its own
    // (`index.rs`), off the writer. `search_queue` lists the ids of the messages whose
    // text changed: triggers queue edits, deletes and removals; new messages are queued
    // by the statements that insert them (the commit log's fold, `post_slow`), in bulk,
    // which costs the writer less than a trigger per row. `search_meta.epoch` names this
    // database, so an index built for another one (a restored backup's) is rebuilt
    // rather than trusted.
    Migration::Sql(
        r#"
    DROP TRIGGER messages_fts_insert;
    DROP TRIGGER messages_fts_update;
    DROP TRIGGER messages_fts_delete;
    DROP TABLE messages_fts;
    CREATE TABLE search_queue (
        pos        INTEGER PRIMARY KEY,
        message_id INTEGER NOT NULL
    );
    CREATE TABLE search_meta (
        id    INTEGER PRIMARY KEY CHECK (id = 0),
        epoch INTEGER NOT NULL
    );
    INSERT INTO search_meta VALUES (0, abs(random()));
    CREATE TRIGGER search_queue_update AFTER UPDATE OF text, deleted ON messages BEGIN
        INSERT INTO search_queue (message_id) VALUES (new.id);
    END;
    CREATE TRIGGER search_queue_delete AFTER DELETE ON messages BEGIN
        INSERT INTO search_queue (message_id) VALUES (old.id);
    END;
    "#,
    ),
    // 13: bots and API keys. A bot is a user with an owner (and no password); an API
    // key is stored as its token's digest, held by `owner_id`, acting as `user_id` (the
    // owner or one of their bots).
    Migration::Sql(
        r#"
    ALTER TABLE users ADD COLUMN bot_owner INTEGER;
    CREATE INDEX users_bot_owner ON users(bot_owner) WHERE bot_owner IS NOT NULL;
    CREATE TABLE api_keys (
        token_hash   BLOB PRIMARY KEY,
        id           INTEGER NOT NULL UNIQUE,
        owner_id     INTEGER NOT NULL,
        user_id      INTEGER NOT NULL,
        name         TEXT NOT NULL,
        scopes       TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER,
        last_used_at INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX api_keys_owner ON api_keys(owner_id, created_at);
    "#,
    ),
    // 14: incoming webhooks: a secret URL (stored as its digest) that posts to its
    // channel as its bot.
    Migration::Sql(
        r#"
    CREATE TABLE incoming_webhooks (
        token_hash BLOB PRIMARY KEY,
        id         INTEGER NOT NULL UNIQUE,
        channel_id INTEGER NOT NULL,
        bot_id     INTEGER NOT NULL,
        creator_id INTEGER NOT NULL,
        name       TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX incoming_webhooks_channel ON incoming_webhooks(channel_id, created_at);
    "#,
    ),
    // 15: outgoing webhook subscriptions: a channel's events POSTed in seq order from a
    // durable cursor, by the node holding the lease.
    Migration::Sql(
        r#"
    CREATE TABLE subscriptions (
        id            INTEGER PRIMARY KEY,
        channel_id    INTEGER NOT NULL,
        creator_id    INTEGER NOT NULL,
        url           TEXT NOT NULL,
        secret        TEXT NOT NULL,
        types         TEXT NOT NULL,
        cursor        INTEGER NOT NULL,
        status        TEXT NOT NULL,
        delivered     INTEGER NOT NULL DEFAULT 0,
        last_error    TEXT,
        failing_since INTEGER,
        failures      INTEGER NOT NULL DEFAULT 0,
        next_try_at   INTEGER NOT NULL DEFAULT 0,
        created_at    INTEGER NOT NULL,
        lease_node    TEXT,
        lease_until   INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX subscriptions_channel ON subscriptions(channel_id);
    CREATE INDEX subscriptions_due ON subscriptions(status, next_try_at);
    "#,
    ),
    // 16: uploaded files. Their bytes are in the file store under their SHA-256 (one copy
    // per digest); `message_files` says which messages carry each (a member of such a
    // message's channel may read it); a message keeps its files' descriptions (`files`,
    // JSON) for history and events.
    Migration::Sql(
        r#"
    CREATE TABLE uploads (
        id           INTEGER PRIMARY KEY,
        owner_id     INTEGER NOT NULL,
        sha256       TEXT NOT NULL,
        size         INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        name         TEXT NOT NULL,
        width        INTEGER,
        height       INTEGER,
        thumb_sha256 TEXT,
        created_at   INTEGER NOT NULL
    );
    CREATE INDEX uploads_owner ON uploads(owner_id);
    CREATE INDEX uploads_sha256 ON uploads(sha256);
    CREATE INDEX uploads_thumb ON uploads(thumb_sha256) WHERE thumb_sha256 IS NOT NULL;
    CREATE TABLE message_files (
        upload_id  INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        PRIMARY KEY (upload_id, message_id)
    ) WITHOUT ROWID;
    CREATE INDEX message_files_message ON message_files(message_id);
    ALTER TABLE messages ADD COLUMN files TEXT;
    "#,
    ),
    // 17: two-factor login. A user's TOTP secret is sealed with the server's secret key
    // (never stored readable); codes of `last_step` or earlier are refused (no replay);
    // recovery codes are kept as SHA-256 digests. Messages by author, for a data export.
    Migration::Sql(
        r#"
    CREATE TABLE two_factor (
        user_id    INTEGER PRIMARY KEY,
        secret     BLOB NOT NULL,
        enabled    INTEGER NOT NULL,
        last_step  INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE recovery_codes (
        user_id   INTEGER NOT NULL,
        code_hash BLOB NOT NULL,
        PRIMARY KEY (user_id, code_hash)
    ) WITHOUT ROWID;
    CREATE INDEX messages_author ON messages(author_id, id);
    "#,
    ),
    // 18: deleted accounts. A deleted user's row stays (its messages keep its id) with
    // no profile, password or sessions; its name is held (`username_key` kept) until the
    // hold passes and a registration of the name releases it. `departed_at` is set once
    // it has left every channel but its DMs.
    Migration::Sql(
        r#"
    ALTER TABLE users ADD COLUMN deleted_at INTEGER;
    ALTER TABLE users ADD COLUMN departed_at INTEGER;
    CREATE INDEX users_departing ON users(id) WHERE deleted_at IS NOT NULL AND departed_at IS NULL;
    "#,
    ),
    // 19: the channel and member counters (`last_seq`, `live_messages`, `own_unread`)
    // count a post when the commit log is folded, no longer when it commits, and
    // `log_state` says how far the log is folded (readers add the posts past it: see
    // `tail.rs`). What an earlier build left in the log was counted at its commit, so it
    // is folded here the old way, without counting it again.
    Migration::Sql(
        r#"
    INSERT INTO events (channel_id, seq, kind, at, message_id)
        SELECT channel_id, seq, 'message.created', at, message_id FROM commit_log ORDER BY channel_id, seq;
    INSERT INTO messages (id, channel_id, seq, author_id, text, client_id, created_at)
        SELECT message_id, channel_id, seq, author_id, text, client_id, at FROM commit_log;
    INSERT INTO search_queue (message_id) SELECT message_id FROM commit_log;
    CREATE TABLE log_state (
        id             INTEGER PRIMARY KEY CHECK (id = 0),
        folded_through INTEGER NOT NULL  -- the highest `pos` folded out of commit_log
    );
    INSERT INTO log_state (id, folded_through) SELECT 0, coalesce(max(pos), 0) FROM commit_log;
    DELETE FROM commit_log;
    "#,
    ),
];

/// Adds the columns of a session list and fills in the id (derived from the token's
/// digest: [`crate::store::session_id`]) of sessions made before it.
fn session_details(tx: &Transaction) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE sessions ADD COLUMN id INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE sessions ADD COLUMN last_used_at INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE sessions ADD COLUMN address TEXT NOT NULL DEFAULT '';
         ALTER TABLE sessions ADD COLUMN agent TEXT NOT NULL DEFAULT '';
         UPDATE sessions SET last_used_at = created_at;",
    )?;
    let tokens: Vec<Vec<u8>> = tx
        .prepare("SELECT token_hash FROM sessions")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut update = tx.prepare("UPDATE sessions SET id = ?2 WHERE token_hash = ?1")?;
    for token in tokens {
        let Ok(digest) = <crate::store::TokenHash>::try_from(token.as_slice()) else {
            continue;
        };
        update.execute(rusqlite::params![token, crate::store::session_id(&digest)])?;
    }
    tx.execute_batch("CREATE INDEX sessions_id ON sessions(user_id, id);")
}

/// Adds `users.username_skeleton` (indexed, not unique: accounts made before it may share
/// a skeleton and keep working; the writer refuses new names whose skeleton is taken) and
/// fills it in; shows every existing name in its folded form, which `username_key`
/// already held for the ASCII names accepted until now.
fn username_skeletons(tx: &Transaction) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE users ADD COLUMN username_skeleton TEXT NOT NULL DEFAULT '';
         CREATE INDEX users_skeleton ON users(username_skeleton);",
    )?;
    let names: Vec<(i64, String)> = tx
        .prepare("SELECT id, username_key FROM users")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut update =
        tx.prepare("UPDATE users SET username = ?2, username_skeleton = ?3 WHERE id = ?1")?;
    for (id, key) in names {
        update.execute(rusqlite::params![id, key, crate::username::skeleton(&key)])?;
    }
    Ok(())
}

/// The schema version this build writes.
pub const VERSION: usize = MIGRATIONS.len();

/// Whether the database has the table (one of an older schema, e.g. a backup's copy of a
/// running earlier build, may not).
pub(super) fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get(0),
    )
}

/// Applies the first `take` migrations only: a database as an earlier build left it.
#[cfg(test)]
pub(super) fn migrate_to(conn: &mut Connection, take: usize) {
    for (i, step) in MIGRATIONS.iter().enumerate().take(take) {
        let tx = conn.transaction().unwrap();
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql).unwrap(),
            Migration::Rust(apply) => apply(&tx).unwrap(),
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .unwrap();
        tx.commit().unwrap();
    }
}

/// Sets the connection pragmas every connection needs, with a page cache of `cache_kib`.
pub fn configure(conn: &Connection, cache_kib: i64) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // Sorts and statement journals (the commit log's fold) stay in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// Switches the database to WAL and applies any missing migrations. Refuses a database
/// written by a newer build.
pub fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "could not switch the database to WAL mode (got {mode})"
    );
    let current: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    anyhow::ensure!(
        current <= VERSION,
        "the database has schema version {current}, newer than this build's {VERSION}; \
         run a newer natter"
    );
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Rust(apply) => apply(&tx)?,
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, VERSION);
    }

    #[test]
    fn usernames_from_version_1_are_folded_and_get_skeletons_even_when_they_collide() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        let Migration::Sql(v1) = MIGRATIONS[0] else {
            panic!("migration 1 is SQL")
        };
        conn.execute_batch(v1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO users VALUES (1, 'Alice', 'alice', 'h', 0);
             INSERT INTO users VALUES (2, 'aiice', 'aiice', 'h', 0);
             INSERT INTO users VALUES (3, '...', '...', 'h', 0);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(String, String, String)> = conn
            .prepare("SELECT username, username_key, username_skeleton FROM users ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let row = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
        assert_eq!(
            rows,
            [
                row("alice", "alice", "allce"),
                row("aiice", "aiice", "allce"),
                row("...", "...", ""),
            ]
        );
    }

    /// The schema as `take` migrations left it.
    fn migrated_to(take: usize) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        migrate_to(&mut conn, take);
        (dir, conn)
    }

    /// Posts an earlier build left in the commit log (a crash, or a stop cut short) were
    /// counted in their channel's and author's rows when they committed; migration 19
    /// folds them without counting them again, and the fold counts from then on.
    #[test]
    fn posts_an_earlier_build_left_in_the_log_are_not_counted_twice() {
        let (_dir, mut conn) = migrated_to(18);
        conn.execute_batch(
            "INSERT INTO channels (id, kind, name, owner_id, created_at, last_seq, live_messages)
                 VALUES (5, 'group', 'a', 9, 0, 3, 2);
             INSERT INTO members (channel_id, user_id, role, read_seq, live_read, own_unread)
                 VALUES (5, 9, 'owner', 1, 0, 2);
             INSERT INTO commit_log (pos, channel_id, seq, message_id, author_id, text, at)
                 VALUES (7, 5, 2, 20, 9, 'one', 0), (8, 5, 3, 21, 9, 'two', 0);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let row = |sql: &str| -> (i64, i64) {
            conn.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
        };
        assert_eq!(
            row("SELECT last_seq, live_messages FROM channels WHERE id = 5"),
            (3, 2)
        );
        assert_eq!(
            row("SELECT own_unread, (SELECT folded_through FROM log_state) FROM members"),
            (2, 8)
        );
        assert_eq!(
            row("SELECT (SELECT count(*) FROM commit_log), (SELECT count(*) FROM events)"),
            (0, 2)
        );
        assert_eq!(
            row("SELECT count(*), sum(seq) FROM messages WHERE channel_id = 5"),
            (2, 5)
        );
    }

    /// Migration 12 takes the index out of the database (the index thread rebuilds it in
    /// its own file from the messages) and leaves the messages as they were.
    #[test]
    fn the_search_index_leaves_the_database_and_the_messages_stay() {
        let (_dir, mut conn) = migrated_to(11);
        conn.execute_batch(
            "INSERT INTO messages (id, channel_id, seq, author_id, text, created_at)
             VALUES (1, 5, 1, 9, 'hello there', 0), (2, 5, 2, 9, 'general kenobi', 0);",
        )
        .unwrap();
        let indexed: i64 = conn
            .query_row(
                "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'hello'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 1, "version 11 indexes by trigger");
        migrate(&mut conn).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count("SELECT count(*) FROM sqlite_master WHERE name LIKE 'messages_fts%'"),
            0
        );
        assert_eq!(count("SELECT count(*) FROM messages"), 2);
        assert_eq!(count("SELECT count(*) FROM search_meta"), 1);
        // Edits and deletes are queued by trigger; new messages by their inserts.
        conn.execute_batch(
            "UPDATE messages SET text = 'edited' WHERE id = 1;
             DELETE FROM messages WHERE id = 2;
             INSERT INTO messages (id, channel_id, seq, author_id, text, created_at)
             VALUES (3, 5, 3, 9, 'not queued by a trigger', 0);",
        )
        .unwrap();
        let queued: Vec<i64> = conn
            .prepare("SELECT message_id FROM search_queue ORDER BY pos")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(queued, [1, 2]);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        let err = migrate(&mut conn).unwrap_err().to_string();
        assert!(err.contains("newer than this build"), "{err}");
    }
}
