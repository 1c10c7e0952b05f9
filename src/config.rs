//! Server configuration: one definition ([`ServeArgs`]) read from three places, the
//! TOML file named by `--config` lowest, then `NATTER_*` environment variables, then flags,
//! and validated into a [`Config`].
//!
//! clap reads flags and the environment and says where each value came from; a value it
//! took from its default is replaced by the file's, if the file has one. The file's keys
//! are the flags' names (`write-queue = 100`); an unknown key or a value of the wrong type
//! is refused at start, naming the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};
use serde::{Deserialize, Serialize};

use crate::auth::HashCost;
use crate::gateway::GatewayConfig;
use crate::ratelimit::Rate;

/// Largest `--config` file read (a config is a few hundred bytes; this refuses, say, a
/// log file given by mistake).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The options of `natter serve` (and `natter config`). Each is a flag, the environment
/// variable it names, and the key of the same name in the `--config` file.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// A TOML file of options (keys as the flags are named: `write-queue = 100`); flags
    /// and environment variables override it.
    #[arg(long, env = "NATTER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "NATTER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Serve `/metrics` on this address instead of on the main one (keep it off the
    /// public network).
    #[arg(long, env = "NATTER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Addresses of reverse proxies (nginx, a load balancer) whose `X-Forwarded-For` is
    /// believed: a request from one of them is rate-limited by the client address it
    /// forwards, not by the proxy's. Comma-separated or repeated.
    #[arg(
        long,
        env = "NATTER_TRUSTED_PROXIES",
        value_name = "IP",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Directory holding the SQLite database (`natter.db`) when `--store` is not given;
    /// created if missing.
    #[arg(long, env = "NATTER_DATA_DIR", default_value = "natter-data")]
    pub data_dir: PathBuf,
    /// Where the data lives: `sqlite://PATH`, or PostgreSQL shards as comma-separated
    /// `postgres://` URLs, shard 0 first (it also holds accounts and the shard map).
    /// Default: the SQLite file in --data-dir.
    #[arg(long, env = "NATTER_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// PostgreSQL: milliseconds any one statement may run before it is cancelled.
    #[arg(long, env = "NATTER_PG_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub pg_statement_timeout_ms: u64,
    /// How committed events reach the other nodes: `local` (one node) or a `nats://`
    /// URL of the NATS server every node of the cluster shares (comma-separated URLs of
    /// one NATS cluster are tried in turn). Needs PostgreSQL (--store).
    #[arg(long, env = "NATTER_BUS", value_name = "URL", default_value = "local")]
    pub bus: String,
    /// MiB kept free on the data directory's disk: below it, writes are refused with 507
    /// (reads go on, `/readyz` answers 503), leaving room for checkpoints and recovery.
    #[arg(long, env = "NATTER_DISK_RESERVE_MIB", default_value_t = 256)]
    pub disk_reserve_mib: u64,
    /// MiB the SQLite WAL file is truncated to once a checkpoint has emptied it.
    #[arg(long, env = "NATTER_WAL_SIZE_LIMIT_MIB", default_value_t = 64)]
    pub wal_size_limit_mib: u64,
    /// Snowflake node id, 0–1023; unique per server of a cluster.
    #[arg(long, env = "NATTER_NODE_ID", default_value_t = 0)]
    pub node_id: u16,
    /// Writes that may wait for the group-commit writer before new writes get 503.
    #[arg(long, env = "NATTER_WRITE_QUEUE", default_value_t = 16_384)]
    pub write_queue: usize,
    /// Read-only SQLite connections.
    #[arg(long, env = "NATTER_READ_CONNECTIONS", default_value_t = 4)]
    pub read_connections: usize,
    /// Messages per second each user may send, sustained.
    #[arg(long, env = "NATTER_SEND_RATE", default_value_t = 20.0)]
    pub send_rate: f64,
    /// Messages each user may send in a burst.
    #[arg(long, env = "NATTER_SEND_BURST", default_value_t = 40.0)]
    pub send_burst: f64,
    /// Failed logins allowed per username from one client address in a burst (refilling
    /// at one a minute): a stranger's guesses do not lock the owner out of their account.
    #[arg(long, env = "NATTER_LOGIN_FAILURES_PER_USER", default_value_t = 10.0)]
    pub login_failures_per_user: f64,
    /// Login attempts allowed per username from all addresses together in a burst
    /// (refilling at one every 36 s; failed ones, and successful ones too): the ceiling on
    /// a distributed guessing attack and on a loop of logins.
    #[arg(
        long,
        env = "NATTER_LOGIN_FAILURES_PER_ACCOUNT",
        default_value_t = 100.0
    )]
    pub login_failures_per_account: f64,
    /// Failed logins allowed per client address in a burst (refilling at one every 6 s).
    #[arg(long, env = "NATTER_LOGIN_FAILURES_PER_IP", default_value_t = 50.0)]
    pub login_failures_per_ip: f64,
    /// Wrong two-factor codes (app or recovery codes) allowed per account in a burst
    /// (refilling at one every 10 minutes), wherever they come from: someone holding the
    /// password gets about 150 guesses a day at 3 right codes in a million.
    #[arg(long, env = "NATTER_CODE_FAILURES_PER_ACCOUNT", default_value_t = 10.0)]
    pub code_failures_per_account: f64,
    /// Accounts one client address may create in a burst (refilling at one a second).
    #[arg(long, env = "NATTER_SIGNUPS_PER_IP", default_value_t = 100.0)]
    pub signups_per_ip: f64,
    /// Password hashes (Argon2id, ~19 MiB each) computed at once; a login or sign-up past
    /// it gets 503 with Retry-After.
    #[arg(long, env = "NATTER_PASSWORD_HASH_CONCURRENCY", default_value_t = 4)]
    pub password_hash_concurrency: usize,
    /// Writes other than sends (edits, deletes, renames, member changes, DMs, channel
    /// creation) each user may make per second, sustained; the burst is ten times this.
    /// Read markers have a budget of five times this (burst fifty times).
    #[arg(long, env = "NATTER_WRITE_RATE", default_value_t = 10.0)]
    pub write_rate: f64,
    /// Bytes of message text (sends and edits) each user may write per second, sustained;
    /// the burst is sixteen times this.
    #[arg(long, env = "NATTER_WRITE_BYTES_PER_SEC", default_value_t = 32_768.0)]
    pub write_bytes_per_sec: f64,
    /// Milliseconds a user's last connection must stay closed before they show offline
    /// (a reload or reconnect in between shows nothing).
    #[arg(long, env = "NATTER_PRESENCE_GRACE_MS", default_value_t = 5000)]
    pub presence_grace_ms: u64,
    /// Searches each user may make per second, sustained; the burst is ten times this.
    #[arg(long, env = "NATTER_SEARCH_RATE", default_value_t = 1.0)]
    pub search_rate: f64,
    /// Channels each user may create per hour, sustained (burst: 30).
    #[arg(long, env = "NATTER_CHANNEL_CREATES_PER_HOUR", default_value_t = 120.0)]
    pub channel_creates_per_hour: f64,
    /// Channels one user may be a member of; creating, joining or being added past it is
    /// refused with 409 `too_many_channels`.
    #[arg(long, env = "NATTER_MAX_CHANNELS_PER_USER", default_value_t = 2000)]
    pub max_channels_per_user: u32,
    /// Who may add a user to a channel: `shared-channel` (only someone who already shares
    /// a channel with them, a DM included; anyone may open a DM) or `open` (anyone: a
    /// closed server where everybody knows everybody).
    #[arg(long, env = "NATTER_MEMBERSHIP_CONSENT", value_enum, default_value_t = MembershipConsent::SharedChannel)]
    pub membership_consent: MembershipConsent,
    /// DMs others opened with one user that the user has not answered; past it, opening
    /// another gets 409 `too_many_dms` (with `--membership-consent shared-channel`).
    #[arg(long, env = "NATTER_MAX_PENDING_DMS", default_value_t = 100)]
    pub max_pending_dms: u32,
    /// Sessions (logins) one user may hold; a new login past it ends the oldest.
    #[arg(long, env = "NATTER_MAX_SESSIONS_PER_USER", default_value_t = 100)]
    pub max_sessions_per_user: u32,
    /// Times one message may be edited.
    #[arg(long, env = "NATTER_MAX_EDITS_PER_MESSAGE", default_value_t = 50)]
    pub max_edits_per_message: u32,
    /// Different emoji one message may carry as reactions (past it: 409 `too_many_reactions`).
    #[arg(long, env = "NATTER_MAX_REACTIONS_PER_MESSAGE", default_value_t = 20)]
    pub max_reactions_per_message: u32,
    /// Bot accounts one user may own (past it: 409 `too_many_bots`).
    #[arg(long, env = "NATTER_MAX_BOTS_PER_USER", default_value_t = 20)]
    pub max_bots_per_user: u32,
    /// API keys one user may hold, their bots' included (past it: 409
    /// `too_many_api_keys`).
    #[arg(long, env = "NATTER_MAX_API_KEYS_PER_USER", default_value_t = 50)]
    pub max_api_keys_per_user: u32,
    /// Seconds one outgoing webhook request may take, connecting included.
    #[arg(long, env = "NATTER_WEBHOOK_TIMEOUT_SECS", default_value_t = 10)]
    pub webhook_timeout_secs: u64,
    /// The longest wait, in seconds, between tries of a failing webhook endpoint.
    #[arg(long, env = "NATTER_WEBHOOK_MAX_BACKOFF_SECS", default_value_t = 300)]
    pub webhook_max_backoff_secs: u64,
    /// Seconds an endpoint may keep failing before its subscription turns dead (tried no
    /// more until an admin resumes it).
    #[arg(long, env = "NATTER_WEBHOOK_DEAD_AFTER_SECS", default_value_t = 86400)]
    pub webhook_dead_after_secs: u64,
    /// Networks outgoing webhooks may reach although they are not public (comma-separated
    /// addresses or CIDRs, e.g. `10.0.0.0/8,::1`). By default loopback, private,
    /// link-local and other internal addresses are refused.
    #[arg(long, env = "NATTER_WEBHOOK_ALLOW_NETWORKS", default_value = "")]
    pub webhook_allow_networks: String,
    /// Where uploaded files are kept (content-addressed by SHA-256). Default: `files` in
    /// the data directory. Nodes of a cluster share one (a network file system).
    #[arg(long, env = "NATTER_FILES_DIR")]
    pub files_dir: Option<PathBuf>,
    /// The server's secret key (64 hex digits): it seals two-factor secrets and signs
    /// login challenges. Keep it apart from the database and its backups. Default:
    /// `secret.key` in the data directory, made at first start; a cluster's nodes must
    /// all be given the same file (none is made for them).
    #[arg(long, env = "NATTER_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// The largest upload, in bytes (past it: 413 `payload_too_large`).
    #[arg(long, env = "NATTER_MAX_UPLOAD_BYTES", default_value_t = 25 * 1024 * 1024)]
    pub max_upload_bytes: u64,
    /// The bytes one user's uploads may take together (past it: 413 `upload_quota`).
    #[arg(long, env = "NATTER_UPLOAD_QUOTA_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub upload_quota_bytes: u64,
    /// Seconds an upload no message carries is kept before it is deleted (an upload is
    /// attached within half of it).
    #[arg(long, env = "NATTER_UPLOAD_GRACE_SECS", default_value_t = 86400)]
    pub upload_grace_secs: u64,
    /// Incoming webhooks one channel may have (past it: 409 `too_many_webhooks`).
    #[arg(long, env = "NATTER_MAX_WEBHOOKS_PER_CHANNEL", default_value_t = 20)]
    pub max_webhooks_per_channel: u32,
    /// Seconds a deleted account's username stays taken (default 30 days), so no one
    /// takes it over at once to pass as the person who left.
    #[arg(long, env = "NATTER_USERNAME_HOLD_SECS", default_value_t = 30 * 24 * 3600)]
    pub username_hold_secs: u64,
    /// Milliseconds one search may spend reading the index (past it: 422
    /// `search_too_broad`).
    #[arg(long, env = "NATTER_SEARCH_BUDGET_MS", default_value_t = 2000)]
    pub search_budget_ms: u64,
    /// WebSocket connections one user may have open at once (past it: close 4009).
    #[arg(long, env = "NATTER_WS_CONNECTIONS_PER_USER", default_value_t = 20)]
    pub ws_connections_per_user: usize,
    /// HTTP connections (WebSockets included) open at once; past it, new ones get a bare
    /// 503 and are closed. Lowered at start to what the open-files limit allows.
    #[arg(long, env = "NATTER_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// HTTP connections open at once from one client address (trusted proxies exempt).
    #[arg(
        long,
        env = "NATTER_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,
    /// Seconds a client has to send a request's complete headers (from connecting, or
    /// from the first byte of the next request on a kept-alive connection).
    #[arg(long, env = "NATTER_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub http_header_timeout_secs: u64,
    /// Seconds a request body may take to arrive; past it, 408.
    #[arg(long, env = "NATTER_HTTP_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub http_body_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit idle between requests.
    #[arg(long, env = "NATTER_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub http_idle_timeout_secs: u64,
    /// How long a login token lasts, in hours.
    #[arg(long, env = "NATTER_TOKEN_TTL_HOURS", default_value_t = 720)]
    pub token_ttl_hours: u64,
    /// Bytes one WebSocket connection may have queued before it is closed as a slow consumer (4008).
    #[arg(long, env = "NATTER_WS_QUEUE_BYTES", default_value_t = 1 << 20)]
    pub ws_queue_bytes: usize,
    /// Seconds between server pings on a WebSocket; one silent for three times this is dropped.
    #[arg(long, env = "NATTER_WS_PING_SECS", default_value_t = 10)]
    pub ws_ping_secs: u64,
    /// Memory of the hot-channel event cache, in MiB.
    #[arg(long, env = "NATTER_CACHE_MIB", default_value_t = 64)]
    pub cache_mib: usize,
    /// On SIGTERM/SIGINT, seconds to keep serving with `/readyz` answering 503 before
    /// refusing new connections, so a load balancer can stop sending here first.
    #[arg(long, env = "NATTER_DRAIN_DELAY_SECS", default_value_t = 0)]
    pub drain_delay_secs: u64,
    /// Once draining, seconds in-flight requests and WebSocket answers get before the
    /// server stops waiting for them (queued writes still commit).
    #[arg(long, env = "NATTER_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,
    /// Log filter: a level (`info`) or per-module directives (`info,natter::access=debug`).
    #[arg(long, env = "NATTER_LOG", default_value = "info")]
    pub log: String,
    /// Log line format.
    #[arg(long, env = "NATTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Feature flags as `NAME=on|off`, comma-separated or repeated (known: typing,
    /// read-coalescing; both on unless turned off).
    #[arg(
        long,
        env = "NATTER_FEATURES",
        value_name = "NAME=on|off",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub features: Vec<String>,
    /// Tests only: cheap Argon2 parameters. Never use this for real accounts.
    #[arg(long, env = "NATTER_INSECURE_FAST_PASSWORD_HASH", hide = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_fast_password_hash: bool,
}

/// `--membership-consent`: see [`crate::store::Consent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MembershipConsent {
    SharedChannel,
    Open,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One readable line per event (colour on a terminal).
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

impl ServeArgs {
    /// The options as clap parsed them from `matches` (flags and environment), with every
    /// value clap took from its default replaced by the `--config` file's, if it has one.
    pub fn resolve(matches: &ArgMatches) -> anyhow::Result<Self> {
        let args = Self::from_arg_matches(matches)?;
        let Some(path) = args.config.clone() else {
            return Ok(args);
        };
        let size = std::fs::metadata(&path)
            .with_context(|| format!("read config file {}", path.display()))?
            .len();
        if size > MAX_CONFIG_BYTES {
            bail!(
                "config file {}: {size} bytes; a config file may be at most {MAX_CONFIG_BYTES}",
                path.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read config file {}", path.display()))?;
        let file: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        let serde_json::Value::Object(mut merged) = serde_json::to_value(&args)? else {
            unreachable!("options serialize as a map")
        };
        for (key, value) in file {
            if !merged.contains_key(&key) {
                let known: Vec<&str> = merged.keys().map(String::as_str).collect();
                bail!(
                    "config file {}: unknown key `{key}` (known keys: {})",
                    path.display(),
                    known.join(", ")
                );
            }
            let id = key.replace('-', "_");
            match matches.value_source(&id) {
                Some(ValueSource::CommandLine | ValueSource::EnvVariable) => {}
                _ => {
                    merged.insert(key, serde_json::to_value(value)?);
                }
            }
        }
        let mut resolved: Self =
            serde_path_to_error::deserialize(serde_json::Value::Object(merged)).map_err(|e| {
                anyhow::anyhow!(
                    "config file {}: bad value for `{}`: {}",
                    path.display(),
                    e.path(),
                    e.inner()
                )
            })?;
        resolved.config = Some(path);
        Ok(resolved)
    }

    /// The effective options as a TOML file (what `natter config` prints); it can be
    /// given back as `--config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("options serialize as TOML")
    }
}

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub data_dir: PathBuf,
    /// `--store`; `None`: the SQLite file in `data_dir`.
    pub store: Option<crate::store::StoreLocation>,
    /// `--bus`: the NATS servers' URLs, or `None` for the in-process bus.
    pub bus: Option<Vec<String>>,
    pub pg_statement_timeout: Duration,
    /// Bytes kept free on the data directory's disk.
    pub disk_reserve: u64,
    /// Bytes the WAL is truncated to after a checkpoint.
    pub wal_limit: u64,
    pub node_id: u16,
    pub write_queue: usize,
    pub read_connections: usize,
    pub limits: Limits,
    pub token_ttl: Duration,
    pub hash_cost: HashCost,
    pub gateway: GatewayConfig,
    pub drain: Drain,
    pub features: Arc<Features>,
    pub http: HttpLimits,
    /// Outgoing webhooks' timeouts, backoff and allowed networks.
    pub webhooks: crate::delivery::DeliveryConfig,
    pub files: FilesConfig,
    /// `--secret-key-file`.
    pub secret_key_file: Option<PathBuf>,
}

/// Uploaded files: where they are kept and their bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesConfig {
    /// `--files-dir`; `None`: `files` in the data directory.
    pub dir: Option<PathBuf>,
    pub max_upload_bytes: u64,
    /// Per user, over all their uploads.
    pub quota_bytes: u64,
    /// How long an upload no message carries is kept.
    pub grace: Duration,
    /// How often unreferenced uploads are looked for.
    pub collect_every: Duration,
}

/// Connection caps and timers of the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How the server stops on a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// Serving on with `/readyz` at 503 before new connections are refused.
    pub delay: Duration,
    /// The most time in-flight requests and WebSocket closes get.
    pub timeout: Duration,
}

/// Rate limits at the edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub send: Rate,
    /// Per username and client address.
    pub login_failures_per_user: Rate,
    /// Per username, from every address.
    pub login_failures_per_account: Rate,
    /// Wrong two-factor codes per account.
    pub code_failures_per_account: Rate,
    pub login_failures_per_ip: Rate,
    pub signups_per_ip: Rate,
    /// Writes other than sends, per user.
    pub writes: Rate,
    /// Bytes of message text, per user.
    pub write_bytes: Rate,
    /// Channel creations, per user.
    pub channel_creates: Rate,
    /// Read markers, per user.
    pub read_markers: Rate,
    /// Typing signals per user and channel (all their connections together).
    pub typing: Rate,
    /// Searches, per user.
    pub search: Rate,
    /// Password hashes computed at once.
    pub password_hash_concurrency: usize,
    /// The per-user bounds the store keeps (memberships, edits, consent, unanswered DMs,
    /// sessions).
    pub rules: crate::store::Rules,
    /// WebSocket connections per user.
    pub ws_connections_per_user: usize,
}

impl Limits {
    /// Every per-user rate and bound lifted, consent open (the failed-login limits kept):
    /// for load tools and test suites that drive many users and channels from one address.
    pub fn lift_per_user(&mut self) {
        let unbounded = Rate {
            per_second: 1e12,
            burst: 1e12,
        };
        self.send = unbounded;
        self.writes = unbounded;
        self.write_bytes = unbounded;
        self.channel_creates = unbounded;
        self.read_markers = unbounded;
        self.search = unbounded;
        self.signups_per_ip = unbounded;
        self.rules = crate::store::Rules {
            max_channels_per_user: u32::MAX,
            max_edits_per_message: self.rules.max_edits_per_message,
            consent: crate::store::Consent::Open,
            max_pending_dms: u32::MAX,
            max_sessions_per_user: u32::MAX,
            max_reactions_per_message: self.rules.max_reactions_per_message,
            search_budget: self.rules.search_budget,
            max_bots_per_user: u32::MAX,
            max_api_keys_per_user: u32::MAX,
            max_webhooks_per_channel: self.rules.max_webhooks_per_channel,
            username_hold: self.rules.username_hold,
        };
        self.ws_connections_per_user = usize::MAX;
    }
}

/// A code path that can be shipped dark and turned on per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Typing indicators: `typing` ops reach the channel's other members.
    Typing,
    /// Identical store reads in flight are shared (one query answers all of them).
    ReadCoalescing,
    /// Reactions may be added and taken back. Turn it off in a cluster until every node
    /// runs a build that reads `reaction.*` events (older ones cannot read such a log).
    Reactions,
}

impl Feature {
    pub const ALL: [Feature; 3] = [Feature::Typing, Feature::ReadCoalescing, Feature::Reactions];

    pub fn name(self) -> &'static str {
        match self {
            Self::Typing => "typing",
            Self::ReadCoalescing => "read-coalescing",
            Self::Reactions => "reactions",
        }
    }
}

/// The feature flags in force, read on every use, so they can be flipped while running.
#[derive(Debug)]
pub struct Features {
    on: [AtomicBool; Feature::ALL.len()],
}

impl Default for Features {
    /// Every feature on.
    fn default() -> Self {
        Self {
            on: Feature::ALL.map(|_| AtomicBool::new(true)),
        }
    }
}

impl Features {
    /// Parses `NAME=on|off` toggles over the defaults.
    pub fn parse(toggles: &[String]) -> Result<Self, ConfigError> {
        let features = Self::default();
        for toggle in toggles.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            let bad = |message: String| ConfigError {
                option: "--features",
                message,
            };
            let (name, value) = toggle
                .split_once('=')
                .ok_or_else(|| bad(format!("`{toggle}` is not NAME=on|off")))?;
            let feature = Feature::ALL
                .into_iter()
                .find(|f| f.name() == name.trim())
                .ok_or_else(|| {
                    let known: Vec<_> = Feature::ALL.iter().map(|f| f.name()).collect();
                    bad(format!(
                        "unknown feature `{}` (known: {})",
                        name.trim(),
                        known.join(", ")
                    ))
                })?;
            let on = match value.trim() {
                "on" | "true" => true,
                "off" | "false" => false,
                other => return Err(bad(format!("`{other}` is not on or off"))),
            };
            features.set(feature, on);
        }
        Ok(features)
    }

    pub fn enabled(&self, feature: Feature) -> bool {
        self.on[feature as usize].load(Ordering::Relaxed)
    }

    pub fn set(&self, feature: Feature, on: bool) {
        self.on[feature as usize].store(on, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {option}: {message}")]
pub struct ConfigError {
    pub option: &'static str,
    pub message: String,
}

fn positive(option: &'static str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(ConfigError {
            option,
            message: format!("must be a positive number, got {v}"),
        })
    }
}

fn at_least(option: &'static str, v: u64, min: u64) -> Result<u64, ConfigError> {
    if v >= min {
        Ok(v)
    } else {
        Err(ConfigError {
            option,
            message: format!("must be at least {min}, got {v}"),
        })
    }
}

impl Config {
    pub fn from_args(a: &ServeArgs) -> Result<Self, ConfigError> {
        if a.node_id > crate::id::MAX_NODE_ID {
            return Err(ConfigError {
                option: "--node-id",
                message: format!("must be 0–1023, got {}", a.node_id),
            });
        }
        at_least("--write-queue", a.write_queue as u64, 1)?;
        at_least("--read-connections", a.read_connections as u64, 1)?;
        at_least("--ws-queue-bytes", a.ws_queue_bytes as u64, 64 * 1024)?;
        at_least("--ws-ping-secs", a.ws_ping_secs, 1)?;
        at_least("--token-ttl-hours", a.token_ttl_hours, 1)?;
        at_least("--drain-timeout-secs", a.drain_timeout_secs, 1)?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&a.log) {
            return Err(ConfigError {
                option: "--log",
                message: format!("`{}`: {e}", a.log),
            });
        }
        if a.metrics_listen == Some(a.listen) && a.listen.port() != 0 {
            return Err(ConfigError {
                option: "--metrics-listen",
                message: "must differ from --listen".into(),
            });
        }
        let store = a
            .store
            .as_deref()
            .map(crate::store::StoreLocation::parse)
            .transpose()
            .map_err(|message| ConfigError {
                option: "--store",
                message,
            })?;
        let bus = parse_bus(&a.bus).map_err(|message| ConfigError {
            option: "--bus",
            message,
        })?;
        if bus.is_some() && !matches!(store, Some(crate::store::StoreLocation::Postgres(_))) {
            return Err(ConfigError {
                option: "--bus",
                message: "a NATS bus joins nodes that share PostgreSQL shards: give --store \
                          postgres://… too"
                    .into(),
            });
        }
        Ok(Self {
            listen: a.listen,
            metrics_listen: a.metrics_listen,
            trusted_proxies: a.trusted_proxies.clone(),
            data_dir: a.data_dir.clone(),
            store,
            bus,
            pg_statement_timeout: Duration::from_millis(at_least(
                "--pg-statement-timeout-ms",
                a.pg_statement_timeout_ms,
                100,
            )?),
            disk_reserve: a.disk_reserve_mib << 20,
            wal_limit: a.wal_size_limit_mib << 20,
            node_id: a.node_id,
            write_queue: a.write_queue,
            read_connections: a.read_connections,
            limits: Limits {
                send: Rate {
                    per_second: positive("--send-rate", a.send_rate)?,
                    burst: positive("--send-burst", a.send_burst)?,
                },
                login_failures_per_user: Rate {
                    per_second: 1.0 / 60.0,
                    burst: positive("--login-failures-per-user", a.login_failures_per_user)?,
                },
                login_failures_per_account: Rate {
                    per_second: 1.0 / 36.0,
                    burst: positive("--login-failures-per-account", a.login_failures_per_account)?,
                },
                code_failures_per_account: Rate {
                    per_second: 1.0 / 600.0,
                    burst: positive("--code-failures-per-account", a.code_failures_per_account)?,
                },
                login_failures_per_ip: Rate {
                    per_second: 1.0 / 6.0,
                    burst: positive("--login-failures-per-ip", a.login_failures_per_ip)?,
                },
                signups_per_ip: Rate {
                    per_second: 1.0,
                    burst: positive("--signups-per-ip", a.signups_per_ip)?,
                },
                writes: Rate {
                    per_second: positive("--write-rate", a.write_rate)?,
                    burst: a.write_rate * 10.0,
                },
                write_bytes: Rate {
                    per_second: positive("--write-bytes-per-sec", a.write_bytes_per_sec)?,
                    burst: a.write_bytes_per_sec * 16.0,
                },
                channel_creates: Rate {
                    per_second: positive("--channel-creates-per-hour", a.channel_creates_per_hour)?
                        / 3600.0,
                    burst: 30.0,
                },
                typing: Rate {
                    per_second: 1.0 / 1.5,
                    burst: 2.0,
                },
                search: Rate {
                    per_second: positive("--search-rate", a.search_rate)?,
                    burst: a.search_rate * 10.0,
                },
                read_markers: Rate {
                    per_second: a.write_rate * 5.0,
                    burst: a.write_rate * 50.0,
                },
                password_hash_concurrency: at_least(
                    "--password-hash-concurrency",
                    a.password_hash_concurrency as u64,
                    1,
                )? as usize,
                rules: crate::store::Rules {
                    max_channels_per_user: at_least(
                        "--max-channels-per-user",
                        u64::from(a.max_channels_per_user),
                        1,
                    )? as u32,
                    max_edits_per_message: a.max_edits_per_message,
                    consent: match a.membership_consent {
                        MembershipConsent::SharedChannel => crate::store::Consent::SharedChannel,
                        MembershipConsent::Open => crate::store::Consent::Open,
                    },
                    max_pending_dms: a.max_pending_dms,
                    max_sessions_per_user: at_least(
                        "--max-sessions-per-user",
                        u64::from(a.max_sessions_per_user),
                        1,
                    )? as u32,
                    max_reactions_per_message: at_least(
                        "--max-reactions-per-message",
                        u64::from(a.max_reactions_per_message),
                        1,
                    )? as u32,
                    search_budget: Duration::from_millis(a.search_budget_ms),
                    max_bots_per_user: a.max_bots_per_user,
                    max_api_keys_per_user: a.max_api_keys_per_user,
                    max_webhooks_per_channel: a.max_webhooks_per_channel,
                    username_hold: Duration::from_secs(a.username_hold_secs),
                },
                ws_connections_per_user: at_least(
                    "--ws-connections-per-user",
                    a.ws_connections_per_user as u64,
                    1,
                )? as usize,
            },
            token_ttl: Duration::from_secs(a.token_ttl_hours * 3600),
            hash_cost: if a.insecure_fast_password_hash {
                HashCost::insecure_fast()
            } else {
                HashCost::default()
            },
            gateway: GatewayConfig {
                queue_bytes: a.ws_queue_bytes,
                ping_interval: Duration::from_secs(a.ws_ping_secs),
                idle_timeout: Duration::from_secs(a.ws_ping_secs * 3),
                cache_bytes: a.cache_mib << 20,
                presence_grace: Duration::from_millis(a.presence_grace_ms),
                ..GatewayConfig::default()
            },
            drain: Drain {
                delay: Duration::from_secs(a.drain_delay_secs),
                timeout: Duration::from_secs(a.drain_timeout_secs),
            },
            features: Arc::new(Features::parse(&a.features)?),
            webhooks: crate::delivery::DeliveryConfig {
                timeout: Duration::from_secs(at_least(
                    "--webhook-timeout-secs",
                    a.webhook_timeout_secs,
                    1,
                )?),
                max_backoff: Duration::from_secs(at_least(
                    "--webhook-max-backoff-secs",
                    a.webhook_max_backoff_secs,
                    1,
                )?),
                dead_after: Duration::from_secs(a.webhook_dead_after_secs),
                allow: a
                    .webhook_allow_networks
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse().map_err(|message| ConfigError {
                            option: "--webhook-allow-networks",
                            message,
                        })
                    })
                    .collect::<Result<_, _>>()?,
            },
            secret_key_file: a.secret_key_file.clone(),
            files: FilesConfig {
                dir: a.files_dir.clone(),
                max_upload_bytes: at_least("--max-upload-bytes", a.max_upload_bytes, 1)?,
                quota_bytes: a.upload_quota_bytes,
                grace: Duration::from_secs(at_least(
                    "--upload-grace-secs",
                    a.upload_grace_secs,
                    60,
                )?),
                collect_every: Duration::from_secs(60),
            },
            http: HttpLimits {
                max_connections: at_least("--max-connections", a.max_connections as u64, 1)?
                    as usize,
                max_connections_per_address: at_least(
                    "--max-connections-per-address",
                    a.max_connections_per_address as u64,
                    1,
                )? as usize,
                header_timeout: Duration::from_secs(at_least(
                    "--http-header-timeout-secs",
                    a.http_header_timeout_secs,
                    1,
                )?),
                body_timeout: Duration::from_secs(at_least(
                    "--http-body-timeout-secs",
                    a.http_body_timeout_secs,
                    1,
                )?),
                idle_timeout: Duration::from_secs(at_least(
                    "--http-idle-timeout-secs",
                    a.http_idle_timeout_secs,
                    1,
                )?),
            },
        })
    }

    /// The defaults, rooted at `data_dir`: what tests start from.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let d = Defaults::parse_from(["natter"]);
        let mut c = Self::from_args(&d.serve).expect("defaults are valid");
        c.data_dir = data_dir.into();
        c
    }

    /// Where uploaded files are kept.
    pub fn files_dir(&self) -> PathBuf {
        self.files
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("files"))
    }

    /// The database file inside the data directory.
    pub fn db_path(&self) -> PathBuf {
        db_path(&self.data_dir)
    }

    /// Where the data lives: `--store`, or the SQLite file in the data directory.
    /// The server's secret key ([`crate::sealing`]): `--secret-key-file`, or with the
    /// embedded store `secret.key` in the data directory (made if missing). A cluster
    /// node is never given a key of its own making (the nodes would disagree): without
    /// the option, two-factor login is unavailable there, and a named file must exist.
    pub fn sealer(&self) -> anyhow::Result<Option<crate::sealing::Sealer>> {
        let embedded = matches!(
            self.store_location(),
            crate::store::StoreLocation::Sqlite(_)
        );
        match (&self.secret_key_file, embedded) {
            (Some(path), _) => crate::sealing::Sealer::load(path, embedded).map(Some),
            (None, true) => {
                crate::sealing::Sealer::load(&self.data_dir.join("secret.key"), true).map(Some)
            }
            (None, false) => {
                tracing::warn!(
                    "no --secret-key-file: two-factor login is unavailable on this cluster node"
                );
                Ok(None)
            }
        }
    }

    pub fn store_location(&self) -> crate::store::StoreLocation {
        self.store
            .clone()
            .unwrap_or_else(|| crate::store::StoreLocation::Sqlite(self.db_path()))
    }

    /// The options to open the store with.
    pub fn store_options(
        &self,
        on_commit: Option<crate::store::OnCommit>,
    ) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            location: self.store_location(),
            node_id: self.node_id,
            write_queue: self.write_queue,
            read_connections: self.read_connections,
            on_commit,
            rules: self.limits.rules,
            disk_reserve: self.disk_reserve,
            wal_limit: self.wal_limit,
            fold_rows: crate::store::sqlite::FOLD_ROWS,
            statement_timeout: self.pg_statement_timeout,
        }
    }
}

/// The database file of a data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("natter.db")
}

/// `--bus`: `local`, or one or more `nats://host:port` URLs (comma-separated).
fn parse_bus(value: &str) -> Result<Option<Vec<String>>, String> {
    let value = value.trim();
    if value.is_empty() || value == "local" {
        return Ok(None);
    }
    let urls: Vec<String> = value.split(',').map(|u| u.trim().to_owned()).collect();
    for url in &urls {
        let Some(rest) = url.strip_prefix("nats://") else {
            return Err(format!(
                "`{url}`: expected `local` or a nats://host:port URL"
            ));
        };
        if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
            return Err(format!("`{url}`: expected nats://host:port"));
        }
    }
    Ok(Some(urls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_toggles_parse_and_refuse_unknown_names() {
        let f = Features::parse(&["typing=off".into(), " read-coalescing = on ".into()]).unwrap();
        assert!(!f.enabled(Feature::Typing));
        assert!(f.enabled(Feature::ReadCoalescing));
        assert!(Features::default().enabled(Feature::Typing));
        for bad in ["typo=on", "typing", "typing=maybe"] {
            let e = Features::parse(&[bad.into()]).unwrap_err();
            assert_eq!(e.option, "--features", "{bad}");
        }
        assert!(
            Features::parse(&["typo=on".into()])
                .unwrap_err()
                .message
                .contains("known: typing, read-coalescing")
        );
    }
}
