//! Which backend holds the data, from `--store`, and opening it.

use std::path::PathBuf;
use std::sync::Arc;

use super::postgres::{PostgresOptions, PostgresStore};
use super::sqlite::{SqliteOptions, SqliteStore};
use super::{OnCommit, Rules, Store};

/// The most PostgreSQL shards a store may have.
pub const MAX_SHARDS: usize = 256;

/// Where the data lives: `sqlite://PATH` or PostgreSQL shards (shard 0 first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// Connection URLs (`postgres://…`), one per shard, shard 0 first.
    Postgres(Vec<String>),
}

impl StoreLocation {
    /// Parses `--store`: `sqlite://PATH` (a relative path is relative to the working
    /// directory), or one or more comma-separated `postgres://`/`postgresql://` URLs.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if let Some(path) = value.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(
                    "sqlite:// needs a file path, e.g. sqlite://natter-data/natter.db".into(),
                );
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        let urls: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err("is empty; give sqlite://PATH or postgres:// URLs".into());
        }
        // Each shard costs a writer thread and a read pool per node.
        if urls.len() > MAX_SHARDS {
            return Err(format!(
                "names {} shards; at most {MAX_SHARDS} are supported",
                urls.len()
            ));
        }
        for url in &urls {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(format!(
                    "`{}` is neither sqlite://PATH nor a postgres:// URL",
                    redact(url)
                ));
            }
            let (primary, replicas) = split_replicas(url)?;
            for u in std::iter::once(&primary).chain(&replicas) {
                u.parse::<tokio_postgres::Config>()
                    .map_err(|e| format!("`{}`: {e}", redact(u)))?;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for url in &urls {
            if !seen.insert(url) {
                return Err(format!("shard `{}` is listed twice", redact(url)));
            }
        }
        Ok(Self::Postgres(urls))
    }

    /// For logs and `/metrics`: the location without passwords.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite://{}", path.display()),
            Self::Postgres(urls) => urls.iter().map(|u| redact(u)).collect::<Vec<_>>().join(","),
        }
    }
}

/// Splits a shard's URL into its primary's URL and its streaming replicas' URLs: each
/// `replica=host:port` parameter names one, reached with the same user, password,
/// database and other parameters as the primary.
pub fn split_replicas(url: &str) -> Result<(String, Vec<String>), String> {
    let Some((head, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let (mut hosts, mut kept) = (Vec::new(), Vec::new());
    for param in query.split('&').filter(|p| !p.is_empty()) {
        match param.strip_prefix("replica=") {
            Some(host) if !host.is_empty() && !host.contains(['/', '@', ',']) => {
                hosts.push(host.to_owned())
            }
            Some(_) => {
                return Err(format!("`{}`: replica= takes host:port", redact(url)));
            }
            None => kept.push(param),
        }
    }
    let with = |head: &str| {
        if kept.is_empty() {
            head.to_owned()
        } else {
            format!("{head}?{}", kept.join("&"))
        }
    };
    let (scheme, rest) = head.split_once("://").ok_or("not a URL")?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    let replicas = hosts
        .iter()
        .map(|host| {
            let authority = match userinfo {
                Some(u) => format!("{u}@{host}"),
                None => host.clone(),
            };
            with(&format!("{scheme}://{authority}{path}"))
        })
        .collect();
    Ok((with(head), replicas))
}

/// A URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Everything a backend needs to open, whichever it is.
#[derive(Clone)]
pub struct StoreOptions {
    pub location: StoreLocation,
    /// Snowflake node id (0–1023); a PostgreSQL node leases it.
    pub node_id: u16,
    pub write_queue: usize,
    /// Read connections (per shard for PostgreSQL).
    pub read_connections: usize,
    pub on_commit: Option<OnCommit>,
    pub rules: Rules,
    /// SQLite: free bytes kept on the data directory's disk.
    pub disk_reserve: u64,
    /// SQLite: bytes the WAL is truncated to after a checkpoint.
    pub wal_limit: u64,
    /// SQLite: posts in the commit log past which the writer folds it into the channel
    /// tables (tests set 1 to fold after every commit).
    pub fold_rows: usize,
    /// PostgreSQL: the bound on every statement.
    pub statement_timeout: std::time::Duration,
}

impl StoreOptions {
    pub fn new(location: StoreLocation) -> Self {
        Self {
            location,
            node_id: 0,
            write_queue: 16_384,
            read_connections: 4,
            on_commit: None,
            rules: Rules::default(),
            disk_reserve: 0,
            wal_limit: 64 << 20,
            fold_rows: super::sqlite::FOLD_ROWS,
            statement_timeout: std::time::Duration::from_secs(5),
        }
    }
}

/// Applies the store's missing schema migrations without serving (`natter migrate`).
pub async fn migrate(location: &StoreLocation) -> anyhow::Result<String> {
    match location {
        StoreLocation::Sqlite(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || super::sqlite::migrate_only(&path)).await?
        }
        StoreLocation::Postgres(urls) => super::postgres::migrate_only(urls).await,
    }
}

/// Opens (creating and migrating if needed) the store `opts` names.
pub async fn open(opts: StoreOptions) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &opts.location {
        StoreLocation::Sqlite(path) => {
            let sqlite = SqliteOptions {
                path: path.clone(),
                node_id: opts.node_id,
                write_queue: opts.write_queue,
                read_connections: opts.read_connections,
                on_commit: opts.on_commit.clone(),
                stats: Arc::default(),
                rules: opts.rules,
                disk_reserve: opts.disk_reserve,
                wal_limit: opts.wal_limit,
                fold_rows: opts.fold_rows,
            };
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&sqlite)).await??;
            Arc::new(store)
        }
        StoreLocation::Postgres(urls) => Arc::new(
            PostgresStore::open(PostgresOptions {
                shards: urls.clone(),
                node_id: opts.node_id,
                write_queue: opts.write_queue,
                read_connections: opts.read_connections,
                on_commit: opts.on_commit.clone(),
                rules: opts.rules,
                statement_timeout: opts.statement_timeout,
            })
            .await?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds_and_refuses_the_rest() {
        assert_eq!(
            StoreLocation::parse("sqlite://d/n.db").unwrap(),
            StoreLocation::Sqlite("d/n.db".into())
        );
        assert_eq!(
            StoreLocation::parse("postgres://a@h/db0, postgres://a@h/db1").unwrap(),
            StoreLocation::Postgres(vec![
                "postgres://a@h/db0".into(),
                "postgres://a@h/db1".into()
            ])
        );
        let too_many = (0..=MAX_SHARDS)
            .map(|i| format!("postgres://h/db{i}"))
            .collect::<Vec<_>>()
            .join(",");
        for bad in [
            too_many.as_str(),
            "",
            "mysql://x",
            "sqlite://",
            "postgres://h/a,postgres://h/a",
        ] {
            assert!(StoreLocation::parse(bad).is_err(), "{bad}");
        }
        let e =
            StoreLocation::parse("postgres://u:secret@h/a,postgres://u:secret@h/a").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn a_shard_names_its_replicas_by_host() {
        assert_eq!(
            split_replicas(
                "postgres://u:pw@db0:5432/natter?replica=r1:5433&sslmode=disable&replica=r2"
            )
            .unwrap(),
            (
                "postgres://u:pw@db0:5432/natter?sslmode=disable".to_owned(),
                vec![
                    "postgres://u:pw@r1:5433/natter?sslmode=disable".to_owned(),
                    "postgres://u:pw@r2/natter?sslmode=disable".to_owned(),
                ]
            )
        );
        assert_eq!(
            split_replicas("postgres://h/db").unwrap(),
            ("postgres://h/db".to_owned(), vec![])
        );
        assert!(StoreLocation::parse("postgres://h/db?replica=").is_err());
        assert!(StoreLocation::parse("postgres://h/db?replica=r:1").is_ok());
    }
}
