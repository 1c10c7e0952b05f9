//! Server configuration: one definition, read from flags and `NATTER_*` environment
//! variables by clap, then validated into a [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::HashCost;
use crate::gateway::GatewayConfig;
use crate::ratelimit::Rate;

/// The flags of `natter serve`; each also reads the environment variable it names.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "NATTER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory holding the SQLite database (`natter.db`); created if missing.
    #[arg(long, env = "NATTER_DATA_DIR", default_value = "natter-data")]
    pub data_dir: PathBuf,
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
    /// Failed logins allowed per username in a burst (refilling at one a minute).
    #[arg(long, env = "NATTER_LOGIN_FAILURES_PER_USER", default_value_t = 10.0)]
    pub login_failures_per_user: f64,
    /// Failed logins allowed per client address in a burst (refilling at one every 6 s).
    #[arg(long, env = "NATTER_LOGIN_FAILURES_PER_IP", default_value_t = 50.0)]
    pub login_failures_per_ip: f64,
    /// Accounts one client address may create in a burst (refilling at one a second).
    #[arg(long, env = "NATTER_SIGNUPS_PER_IP", default_value_t = 100.0)]
    pub signups_per_ip: f64,
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
    /// Tests only: cheap Argon2 parameters. Never use this for real accounts.
    #[arg(long, env = "NATTER_INSECURE_FAST_PASSWORD_HASH", hide = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_fast_password_hash: bool,
}

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub node_id: u16,
    pub write_queue: usize,
    pub read_connections: usize,
    pub limits: Limits,
    pub token_ttl: Duration,
    pub hash_cost: HashCost,
    pub gateway: GatewayConfig,
}

/// Rate limits at the edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub send: Rate,
    pub login_failures_per_user: Rate,
    pub login_failures_per_ip: Rate,
    pub signups_per_ip: Rate,
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

impl Config {
    pub fn from_args(a: &ServeArgs) -> Result<Self, ConfigError> {
        if a.node_id > crate::id::MAX_NODE_ID {
            return Err(ConfigError {
                option: "--node-id",
                message: format!("must be 0–1023, got {}", a.node_id),
            });
        }
        if a.write_queue == 0 || a.read_connections == 0 {
            return Err(ConfigError {
                option: "--write-queue/--read-connections",
                message: "must be at least 1".into(),
            });
        }
        if a.ws_queue_bytes < 64 * 1024 || a.ws_ping_secs == 0 {
            return Err(ConfigError {
                option: "--ws-queue-bytes/--ws-ping-secs",
                message:
                    "the queue must hold at least 64 KiB (one frame) and pings need at least 1 s"
                        .into(),
            });
        }
        if a.token_ttl_hours == 0 {
            return Err(ConfigError {
                option: "--token-ttl-hours",
                message: "must be at least 1".into(),
            });
        }
        Ok(Self {
            listen: a.listen,
            data_dir: a.data_dir.clone(),
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
                login_failures_per_ip: Rate {
                    per_second: 1.0 / 6.0,
                    burst: positive("--login-failures-per-ip", a.login_failures_per_ip)?,
                },
                signups_per_ip: Rate {
                    per_second: 1.0,
                    burst: positive("--signups-per-ip", a.signups_per_ip)?,
                },
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
                ..GatewayConfig::default()
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

    /// The database file inside the data directory.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("natter.db")
    }
}
