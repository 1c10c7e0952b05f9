//! Test harness: real servers on `127.0.0.1:0` over a temporary data directory, and a small
//! HTTP client speaking API v1.
#![allow(dead_code)]

pub mod child;
pub mod db;
pub mod nats;
pub mod pg;
pub mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use natter::Config;
use natter::auth::HashCost;
use natter::ratelimit::Rate;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

tokio::task_local! {
    /// The PostgreSQL shards servers started in this task keep their data in.
    static PG_SHARDS: Vec<String>;
}

/// Runs `test` with every [`TestServer`] it starts on PostgreSQL: two fresh databases as
/// two shards (restarts keep them). Skipped (see [`available`]) without PostgreSQL.
pub async fn on_postgres(test: impl std::future::Future<Output = ()>) {
    let Some(shards) = pg::databases(2).await else {
        return;
    };
    PG_SHARDS.scope(shards, test).await
}

/// The PostgreSQL shards of this task's servers, inside [`on_postgres`].
pub fn postgres_shards() -> Option<Vec<String>> {
    PG_SHARDS.try_with(Clone::clone).ok()
}

/// Generates, for each named `async fn` of the test file, one test on SQLite (in `mod
/// sqlite`) and one on two PostgreSQL shards (in `mod postgres`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name().await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::on_postgres(super::$name()).await
                }
            )*
        }
    };
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server's `/metrics` page.
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Every sample of a `/metrics` page: `name{labels}` → value.
pub async fn scrape(base: &str) -> std::collections::BTreeMap<String, f64> {
    metrics_text(base)
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// Whether an outside program a test drives is here. If not, the test is to be skipped
/// with a notice, except under CI (which installs it), where this fails the test.
///
/// The notice goes straight to the process's stderr rather than through `eprintln!`,
/// which the test harness captures and shows only for failing tests: so `cargo test`
/// prints a `SKIPPED:` line amid its results even though the test passes, and `.ci/run`
/// counts those lines in its closing summary.
pub fn available(what: &str, present: bool) -> bool {
    if !present {
        assert!(std::env::var_os("CI").is_none(), "{what} is missing");
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {what} is missing");
    }
    present
}

/// A server behind a trusted proxy at 127.0.0.1 that allows one sign-up per client
/// address, so a test can tell forwarded clients apart.
pub fn behind_proxy_one_signup_each(c: &mut Config) {
    c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    c.limits.signups_per_ip = Rate {
        per_second: 0.001,
        burst: 1.0,
    };
}

/// The config tests start from: cheap password hashes, per-user limits lifted, and anyone
/// may add anyone to a channel (tests of the limits and of consent set their own).
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::with_data_dir(dir);
    config.hash_cost = HashCost::insecure_fast();
    config.limits.lift_per_user();

    config
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), tweak).await
    }

    /// Stops gracefully and starts again on the same data (on a new port).
    pub async fn restart(mut self) -> Self {
        self.shutdown().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir, |_| {}).await
    }

    /// Stops gracefully, runs `offline` while nothing holds the data directory (to change
    /// the database as an older build could have left it), and starts again on it.
    pub async fn restart_with(mut self, offline: impl FnOnce(&std::path::Path)) -> Self {
        self.shutdown().await;
        offline(self.dir.path());
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir, |_| {}).await
    }

    /// As [`TestServer::restart_with`], starting again with `tweak` on the test config.
    pub async fn restart_tweaked(
        mut self,
        offline: impl FnOnce(&std::path::Path),
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        self.shutdown().await;
        offline(self.dir.path());
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir, tweak).await
    }

    async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(dir.path());
        if let Some(shards) = postgres_shards() {
            config.store = Some(natter::store::StoreLocation::Postgres(shards));
        }
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(natter::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stalls the writes to `channel` from outside the server until the hold is released
    /// (SQLite: its write lock; PostgreSQL: the channel's row lock), so its queue fills.
    pub async fn hold_writes(&self, channel: i64) -> WriteHold {
        match postgres_shards() {
            None => {
                let db = rusqlite::Connection::open(self.dir.path().join("natter.db")).unwrap();
                db.execute_batch("BEGIN IMMEDIATE").unwrap();
                WriteHold::Sqlite(db)
            }
            Some(shards) => {
                let mut held = Vec::new();
                for url in shards {
                    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    client.batch_execute("BEGIN").await.unwrap();
                    client
                        .execute(
                            "SELECT 1 FROM channels WHERE id = $1 FOR UPDATE",
                            &[&channel],
                        )
                        .await
                        .unwrap();
                    held.push(client);
                }
                WriteHold::Postgres(held)
            }
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base())
    }

    /// Shuts down gracefully and waits for the writer to drain.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }
}

/// Writes held back by [`TestServer::hold_writes`].
pub enum WriteHold {
    Sqlite(rusqlite::Connection),
    Postgres(Vec<tokio_postgres::Client>),
}

impl WriteHold {
    pub async fn release(self) {
        match self {
            Self::Sqlite(db) => db.execute_batch("COMMIT").unwrap(),
            Self::Postgres(clients) => {
                for c in clients {
                    c.batch_execute("COMMIT").await.unwrap();
                }
            }
        }
    }
}

/// A logged-in (or anonymous) API client.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
    pub user_id: String,
}

/// An answer: status, body (`Null` when empty) and the `Retry-After` header.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub retry_after: Option<String>,
}

impl Answer {
    /// The error code of an error answer.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Client {
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self {
            http,
            base: base.to_owned(),
            token: None,
            user_id: String::new(),
        }
    }

    /// The same identity against another server address.
    pub fn with_base(&self, base: &str) -> Client {
        Client {
            base: base.to_owned(),
            ..self.clone()
        }
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> reqwest::Result<Answer> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await?;
        let status = res.status();
        let retry_after = res
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = res.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.raw(method, path, body.map(|b| serde_json::to_vec(&b).unwrap()))
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Registers `name` (password `password-<name>`) and returns the logged-in client.
    pub async fn register(&self, name: &str) -> Client {
        let a = self
            .post(
                "/v1/users",
                json!({"username": name, "password": format!("password-{name}")}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
        let mut c = self.clone();
        c.token = Some(a.body["token"].as_str().unwrap().to_owned());
        c.user_id = a.body["user"]["id"].as_str().unwrap().to_owned();
        c
    }

    /// Creates a channel of `kind` with `members`; returns its id.
    pub async fn create_channel(&self, name: &str, kind: &str, members: &[&Client]) -> String {
        let ids: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
        let a = self
            .post(
                "/v1/channels",
                json!({"name": name, "kind": kind, "members": ids}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
        a.body["id"].as_str().unwrap().to_owned()
    }

    pub async fn send(&self, channel: &str, text: &str, client_id: Option<&str>) -> Answer {
        let mut body = json!({"text": text});
        if let Some(c) = client_id {
            body["client_id"] = json!(c);
        }
        self.post(&format!("/v1/channels/{channel}/messages"), body)
            .await
    }

    /// Every message of the channel, paging forward from the start.
    pub async fn all_messages(&self, channel: &str) -> Vec<Value> {
        self.page_all(&format!("/v1/channels/{channel}/messages"), "messages")
            .await
    }

    /// The text of every message of the channel, oldest first.
    pub async fn all_texts(&self, channel: &str) -> Vec<String> {
        let messages = self.all_messages(channel).await;
        let text = |m: &Value| m["text"].as_str().unwrap().to_owned();
        messages.iter().map(text).collect()
    }

    /// Every event of the channel, paging forward from the start.
    pub async fn all_events(&self, channel: &str) -> Vec<Value> {
        self.page_all(&format!("/v1/channels/{channel}/events"), "events")
            .await
    }

    /// Pages `path` forward with `after_seq` until `has_more` is false.
    async fn page_all(&self, path: &str, key: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let a = self
                .get(&format!("{path}?after_seq={after}&limit=200"))
                .await;
            assert_eq!(a.status, StatusCode::OK, "{a:?}");
            let page = a.body[key].as_array().unwrap().clone();
            if let Some(last) = page.last() {
                after = last["seq"].as_i64().unwrap();
            }
            out.extend(page);
            if !a.body["has_more"].as_bool().unwrap() {
                return out;
            }
        }
    }
}

/// Asserts that the events' seqs are exactly 1..=n and returns n.
pub fn assert_gap_free(events: &[Value]) -> i64 {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_i64().unwrap(),
            i as i64 + 1,
            "gap or reorder at {i}: {e}"
        );
    }
    events.len() as i64
}
