//! The PostgreSQL schema as numbered migrations, applied to every shard at start (under an
//! advisory lock, so nodes starting together apply each once), and the cluster's identity:
//! the bucket → shard map in shard 0 and each shard's own place in it.

use anyhow::{Context, bail};
use tokio_postgres::Client;

use super::ring;

/// Migration `i` moves a shard from version `i` to `i + 1`. Never edit a shipped one:
/// append a new one. Every shard gets every table; accounts, the user → channels index
/// and node leases are used on shard 0 only.
const MIGRATIONS: &[&str] = &[
    // 1: the cluster's identity, accounts, channels and their logs, the outbox.
    r#"
    CREATE TABLE shard_identity (
        singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        cluster_id TEXT NOT NULL,
        shard      INTEGER NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE cluster (
        singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        cluster_id TEXT NOT NULL,
        shards     INTEGER NOT NULL,
        bucket_map INTEGER[] NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE node_leases (
        node_id    INTEGER PRIMARY KEY,
        holder     TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE TABLE users (
        id                BIGINT PRIMARY KEY,
        username          TEXT NOT NULL,
        username_key      TEXT NOT NULL UNIQUE,
        username_skeleton TEXT NOT NULL,
        password_hash     TEXT NOT NULL,
        created_at        BIGINT NOT NULL
    );
    CREATE INDEX users_skeleton ON users (username_skeleton);
    CREATE TABLE sessions (
        token_hash   BYTEA PRIMARY KEY,
        id           BIGINT NOT NULL,
        user_id      BIGINT NOT NULL,
        created_at   BIGINT NOT NULL,
        last_used_at BIGINT NOT NULL,
        expires_at   BIGINT NOT NULL,
        address      TEXT NOT NULL,
        agent        TEXT NOT NULL
    );
    CREATE INDEX sessions_user ON sessions (user_id, id);
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    CREATE TABLE user_channels (
        user_id    BIGINT NOT NULL,
        channel_id BIGINT NOT NULL,
        PRIMARY KEY (user_id, channel_id)
    );
    CREATE TABLE channels (
        id            BIGINT PRIMARY KEY,
        kind          TEXT NOT NULL,
        name          TEXT,
        owner_id      BIGINT NOT NULL,
        last_seq      BIGINT NOT NULL DEFAULT 0,
        live_messages BIGINT NOT NULL DEFAULT 0,
        dm_key        TEXT UNIQUE,
        dm_answered   BOOLEAN NOT NULL DEFAULT FALSE,
        created_at    BIGINT NOT NULL
    );
    CREATE TABLE members (
        channel_id BIGINT NOT NULL,
        user_id    BIGINT NOT NULL,
        role       TEXT NOT NULL,
        read_seq   BIGINT NOT NULL,
        live_read  BIGINT NOT NULL,
        own_unread BIGINT NOT NULL,
        PRIMARY KEY (channel_id, user_id)
    );
    CREATE INDEX members_user ON members (user_id, channel_id);
    CREATE TABLE messages (
        id         BIGINT PRIMARY KEY,
        channel_id BIGINT NOT NULL,
        seq        BIGINT NOT NULL,
        author_id  BIGINT NOT NULL,
        text       TEXT NOT NULL,
        client_id  TEXT,
        created_at BIGINT NOT NULL,
        edited_at  BIGINT,
        deleted    BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE UNIQUE INDEX messages_client ON messages (channel_id, author_id, client_id)
        WHERE client_id IS NOT NULL;
    CREATE TABLE events (
        channel_id BIGINT NOT NULL,
        seq        BIGINT NOT NULL,
        kind       TEXT NOT NULL,
        at         BIGINT NOT NULL,
        message_id BIGINT,
        user_id    BIGINT,
        body       TEXT,
        PRIMARY KEY (channel_id, seq)
    );
    -- A message's later events (edits, the delete), for edits and redaction; its
    -- `message.created` event is found by (channel_id, seq), so a send adds no entry here.
    CREATE INDEX events_message ON events (message_id)
        WHERE message_id IS NOT NULL AND kind <> 'message.created';
    -- Membership changes not yet applied to shard 0's user_channels (the saga's outbox).
    CREATE TABLE outbox (
        id         BIGSERIAL PRIMARY KEY,
        user_id    BIGINT NOT NULL,
        channel_id BIGINT NOT NULL,
        joined     BOOLEAN NOT NULL,
        created_at BIGINT NOT NULL
    );
    "#,
    // 2: reactions, one row per user and emoji on a message, and their counts per emoji
    // (the projection the message view reads; `first_seq` orders a message's emoji).
    r#"
    CREATE TABLE reactions (
        message_id BIGINT NOT NULL,
        user_id    BIGINT NOT NULL,
        emoji      TEXT NOT NULL,
        channel_id BIGINT NOT NULL,
        seq        BIGINT NOT NULL,  -- of its `reaction.added` event
        at         BIGINT NOT NULL,
        PRIMARY KEY (message_id, user_id, emoji)
    );
    CREATE INDEX reactions_emoji ON reactions (message_id, emoji, seq);
    CREATE TABLE reaction_counts (
        message_id BIGINT NOT NULL,
        emoji      TEXT NOT NULL,
        count      BIGINT NOT NULL,
        first_seq  BIGINT NOT NULL,
        PRIMARY KEY (message_id, emoji)
    );
    "#,
    // 3: threads. A reply names its root; a root counts its live replies and keeps when
    // the newest was posted. Replies are read by root, in seq order.
    r#"
    ALTER TABLE messages ADD COLUMN thread_root_id BIGINT;
    ALTER TABLE messages ADD COLUMN reply_count BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN last_reply_at BIGINT;
    CREATE INDEX messages_thread ON messages (thread_root_id, seq) WHERE thread_root_id IS NOT NULL;
    "#,
    // 4: mentions. A message keeps the members its text mentions; `mentions` holds one row
    // per mentioned member but its author, for a member's count of unread mentions
    // (`members.mention_unread`) and their list of recent mentions.
    r#"
    ALTER TABLE messages ADD COLUMN mentions BIGINT[];
    ALTER TABLE events ADD COLUMN mentions BIGINT[];    -- a message event's, as of the event
    ALTER TABLE members ADD COLUMN mention_unread BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE mentions (
        user_id    BIGINT NOT NULL,
        message_id BIGINT NOT NULL,
        channel_id BIGINT NOT NULL,
        seq        BIGINT NOT NULL,
        PRIMARY KEY (user_id, message_id)
    );
    CREATE INDEX mentions_channel ON mentions (channel_id, user_id, seq);
    CREATE INDEX mentions_message ON mentions (message_id);
    "#,
    // 5: profiles (used on shard 0): a display name and an about text, both optional.
    r#"
    ALTER TABLE users ADD COLUMN display_name TEXT;
    ALTER TABLE users ADD COLUMN about TEXT;
    "#,
    // 6: search. Each message's words (the `simple` configuration: lowercased, in any
    // language, no stemming) as a generated column, so an edit or delete changes them in
    // its own statement, under a GIN index.
    r#"
    ALTER TABLE messages ADD COLUMN words tsvector
        GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED;
    CREATE INDEX messages_words ON messages USING gin (words);
    "#,
    // 7: presence (used on shard 0): when each user was last online.
    "ALTER TABLE users ADD COLUMN last_seen_at BIGINT;",
    // 8: bots and API keys (used on shard 0). A bot is a user with an owner (and no
    // password); an API key is stored as its token's digest, held by `owner_id`, acting
    // as `user_id` (the owner or one of their bots).
    r#"
    ALTER TABLE users ADD COLUMN bot_owner BIGINT;
    CREATE INDEX users_bot_owner ON users (bot_owner) WHERE bot_owner IS NOT NULL;
    CREATE TABLE api_keys (
        token_hash   BYTEA PRIMARY KEY,
        id           BIGINT NOT NULL UNIQUE,
        owner_id     BIGINT NOT NULL,
        user_id      BIGINT NOT NULL,
        name         TEXT NOT NULL,
        scopes       TEXT NOT NULL,
        created_at   BIGINT NOT NULL,
        expires_at   BIGINT,
        last_used_at BIGINT
    );
    CREATE INDEX api_keys_owner ON api_keys (owner_id, created_at);
    "#,
    // 9: incoming webhooks (on the channel's shard): a secret URL (stored as its digest)
    // that posts to its channel as its bot.
    r#"
    CREATE TABLE incoming_webhooks (
        token_hash BYTEA PRIMARY KEY,
        id         BIGINT NOT NULL UNIQUE,
        channel_id BIGINT NOT NULL,
        bot_id     BIGINT NOT NULL,
        creator_id BIGINT NOT NULL,
        name       TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX incoming_webhooks_channel ON incoming_webhooks (channel_id, created_at);
    "#,
    // 10: outgoing webhook subscriptions (on the channel's shard): a channel's events
    // POSTed in seq order from a durable cursor, by the node holding the lease.
    r#"
    CREATE TABLE subscriptions (
        id            BIGINT PRIMARY KEY,
        channel_id    BIGINT NOT NULL,
        creator_id    BIGINT NOT NULL,
        url           TEXT NOT NULL,
        secret        TEXT NOT NULL,
        types         TEXT NOT NULL,
        cursor        BIGINT NOT NULL,
        status        TEXT NOT NULL,
        delivered     BIGINT NOT NULL DEFAULT 0,
        last_error    TEXT,
        failing_since BIGINT,
        failures      BIGINT NOT NULL DEFAULT 0,
        next_try_at   BIGINT NOT NULL DEFAULT 0,
        created_at    BIGINT NOT NULL,
        lease_node    TEXT,
        lease_until   BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX subscriptions_channel ON subscriptions (channel_id);
    CREATE INDEX subscriptions_due ON subscriptions (status, next_try_at);
    "#,
    // 11: uploaded files. Their records are on shard 0, their bytes in the file store
    // under their SHA-256; `message_files` (on the channel's shard, written with the
    // message) says which messages carry each; a message keeps its files' descriptions
    // (`files`, JSON) for history and events.
    r#"
    CREATE TABLE uploads (
        id           BIGINT PRIMARY KEY,
        owner_id     BIGINT NOT NULL,
        sha256       TEXT NOT NULL,
        size         BIGINT NOT NULL,
        content_type TEXT NOT NULL,
        name         TEXT NOT NULL,
        width        BIGINT,
        height       BIGINT,
        thumb_sha256 TEXT,
        created_at   BIGINT NOT NULL
    );
    CREATE INDEX uploads_owner ON uploads (owner_id);
    CREATE INDEX uploads_sha256 ON uploads (sha256);
    CREATE INDEX uploads_thumb ON uploads (thumb_sha256) WHERE thumb_sha256 IS NOT NULL;
    CREATE TABLE message_files (
        upload_id  BIGINT NOT NULL,
        message_id BIGINT NOT NULL,
        channel_id BIGINT NOT NULL,
        PRIMARY KEY (upload_id, message_id)
    );
    CREATE INDEX message_files_message ON message_files (message_id);
    ALTER TABLE messages ADD COLUMN files TEXT;
    "#,
    // 12: two-factor login (used on shard 0). A user's TOTP secret is sealed with the
    // server's secret key (never stored readable); codes of `last_step` or earlier are
    // refused (no replay); recovery codes are kept as SHA-256 digests. Messages by author
    // (on every shard), for a data export.
    r#"
    CREATE TABLE two_factor (
        user_id    BIGINT PRIMARY KEY,
        secret     BYTEA NOT NULL,
        enabled    BOOLEAN NOT NULL,
        last_step  BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE recovery_codes (
        user_id   BIGINT NOT NULL,
        code_hash BYTEA NOT NULL,
        PRIMARY KEY (user_id, code_hash)
    );
    CREATE INDEX messages_author ON messages (author_id, id);
    "#,
    // 13: deleted accounts (used on shard 0). A deleted user's row stays (its messages
    // keep its id) with no profile, password or sessions; its name is held
    // (`username_key` kept) until the hold passes and a registration of the name releases
    // it. `departed_at` is set once it has left every channel but its DMs.
    r#"
    ALTER TABLE users ADD COLUMN deleted_at BIGINT;
    ALTER TABLE users ADD COLUMN departed_at BIGINT;
    CREATE INDEX users_departing ON users (id) WHERE deleted_at IS NOT NULL AND departed_at IS NULL;
    "#,
];

/// The schema version this build writes.
pub const VERSION: usize = MIGRATIONS.len();

/// Any key: every natter node takes this advisory lock to migrate a shard.
const MIGRATION_LOCK: i64 = 0x6e61_7474_6572_0001;

/// The schema version a shard is at (0 for an empty database).
pub async fn version(client: &Client) -> anyhow::Result<usize> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                 WHERE table_schema = current_schema() AND table_name = 'natter_schema')",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: i32 = client
        .query_one("SELECT coalesce(max(version), 0) FROM natter_schema", &[])
        .await?
        .get(0);
    Ok(v as usize)
}

/// Applies the missing migrations to one shard, each in its own transaction, under an
/// advisory lock. Refuses a shard written by a newer build.
pub async fn migrate(client: &mut Client, shard: usize) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS natter_schema (
             version    INTEGER PRIMARY KEY,
             applied_at BIGINT NOT NULL
         )",
    )
    .await?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM natter_schema", &[])
        .await?
        .get(0);
    let current = current as usize;
    if current > VERSION {
        bail!(
            "shard {shard} has schema version {current}, newer than this build's {VERSION}; run a newer natter"
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("shard {shard}: migration {}", i + 1))?;
        tx.execute(
            "INSERT INTO natter_schema (version, applied_at) VALUES ($1, $2)",
            &[&((i + 1) as i32), &crate::clock::now_ms()],
        )
        .await?;
        tracing::info!(shard, version = i + 1, "applied schema migration");
    }
    tx.commit().await?;
    Ok(())
}

/// The cluster as shard 0 records it.
pub struct ClusterMap {
    pub cluster_id: String,
    /// Bucket → shard index.
    pub buckets: Vec<i32>,
}

/// Reads the cluster's map from shard 0 and checks every shard's identity against the
/// configured list; on a new cluster (no map yet, no shard claimed), writes both. A shard
/// list that disagrees with what the shards say is refused, naming what is wrong.
pub async fn check_or_create_cluster(clients: &mut [Client]) -> anyhow::Result<ClusterMap> {
    // Nodes starting together on empty databases create the cluster once: the first
    // holds this lock on shard 0 while it checks and creates, the others then check.
    clients[0]
        .execute("SELECT pg_advisory_lock($1)", &[&CLUSTER_LOCK])
        .await?;
    let result = check_or_create(clients).await;
    let _ = clients[0]
        .execute("SELECT pg_advisory_unlock($1)", &[&CLUSTER_LOCK])
        .await;
    result
}

const CLUSTER_LOCK: i64 = 0x6e61_7474_6572_0003;

async fn check_or_create(clients: &mut [Client]) -> anyhow::Result<ClusterMap> {
    let n = clients.len();
    let existing = clients[0]
        .query_opt("SELECT cluster_id, shards, bucket_map FROM cluster", &[])
        .await?;
    let mut identities = Vec::with_capacity(n);
    for c in clients.iter() {
        identities.push(
            c.query_opt("SELECT cluster_id, shard FROM shard_identity", &[])
                .await?
                .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1))),
        );
    }
    let (cluster_id, buckets) = match existing {
        Some(row) => {
            let cluster_id: String = row.get(0);
            let shards: i32 = row.get(1);
            let buckets: Vec<i32> = row.get(2);
            if shards as usize != n {
                bail!(
                    "the shard list has {n} shard(s) but this cluster was created with {shards}; \
                     give every shard, shard 0 first, in the order the cluster was created with \
                     (adding shards to a cluster is not supported yet)"
                );
            }
            if buckets.len() != ring::BUCKETS || buckets.iter().any(|&s| s < 0 || s >= shards) {
                bail!("shard 0 holds a corrupt bucket map");
            }
            (cluster_id, buckets)
        }
        None => {
            // A creation cut off before shard 0's map was written left claims of one
            // cluster id at their own positions: finish it with that id.
            let claimed: Vec<(usize, &(String, i32))> = identities
                .iter()
                .enumerate()
                .filter_map(|(i, x)| x.as_ref().map(|x| (i, x)))
                .collect();
            let unfinished = claimed.iter().any(|(i, _)| *i == 0)
                && claimed
                    .iter()
                    .all(|(i, (id, shard))| *id == claimed[0].1.0 && *shard as usize == *i);
            let resumed = unfinished.then(|| claimed[0].1.0.clone());
            if resumed.is_none()
                && let Some((i, (id, shard))) = claimed.first().map(|(i, x)| (*i, *x))
            {
                bail!(
                    "shard list position {i} is already shard {shard} of cluster {id}, but \
                     position 0 holds no cluster map: list the shards in the order the cluster \
                     was created with (the first URL must be that cluster's shard 0)"
                );
            }
            let cluster_id = resumed.clone().unwrap_or_else(new_cluster_id);
            if resumed.is_some() {
                tracing::warn!(%cluster_id, "finishing a cluster creation that was cut off");
            }
            let now = crate::clock::now_ms();
            // Each shard claims its place first; shard 0's map commits last, making the
            // cluster exist. A start cut off half-way is finished by the next one.
            for (i, c) in clients.iter().enumerate() {
                if identities[i].is_some() {
                    continue;
                }
                c.execute(
                    "INSERT INTO shard_identity (cluster_id, shard, created_at) VALUES ($1, $2, $3)",
                    &[&cluster_id, &(i as i32), &now],
                )
                .await
                .with_context(|| format!("claim shard {i}"))?;
            }
            let buckets = ring::build_map(n);
            clients[0]
                .execute(
                    "INSERT INTO cluster (cluster_id, shards, bucket_map, created_at) VALUES ($1, $2, $3, $4)",
                    &[&cluster_id, &(n as i32), &buckets, &now],
                )
                .await
                .context("record the bucket map in shard 0")?;
            tracing::info!(shards = n, %cluster_id, "created the cluster's bucket map");
            for (i, x) in identities.iter_mut().enumerate() {
                *x = Some((cluster_id.clone(), i as i32));
            }
            (cluster_id, buckets)
        }
    };
    for (i, identity) in identities.iter().enumerate() {
        match identity {
            Some((id, shard)) if *id == cluster_id && *shard as usize == i => {}
            Some((id, shard)) if *id == cluster_id => bail!(
                "shard list position {i} is shard {shard} of this cluster: list the shards in \
                 the order the cluster was created with, shard 0 first"
            ),
            Some((id, shard)) => bail!(
                "shard list position {i} belongs to another cluster ({id}, as its shard {shard})"
            ),
            None => bail!(
                "shard list position {i} is not a shard of this cluster (cluster {cluster_id}): \
                 a database is missing or the list names the wrong one"
            ),
        }
    }
    Ok(ClusterMap {
        cluster_id,
        buckets,
    })
}

fn new_cluster_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
