//! `natter bench floor`: what the least a durable fan-out server can do costs on this
//! host, to set `fanout`'s figures against. A child process serves fixed-size records over
//! plain TCP on one epoll loop ([`server`]): each round it reads what came, numbers each
//! record in its channel, appends the round to a preallocated log with one write and one
//! `fdatasync`, then acks each record to its sender and writes it to every member of its
//! channel, one write per socket (over two threads for a round of more than 64 sockets).
//! No framing, parsing, checksum, table or index, no hop between threads before the
//! fan-out (unless `--writer-thread` asks for one), no bound on a connection's buffer: a floor under any server that keeps
//! Natter's promise (an ack only once the record is on disk; every member gets every record
//! of its channel, in order). Not a bound on latency: a server that syncs one round while
//! it fans out the last could answer sooner. The load ([`load`]) is one thread in this
//! process, open loop, latency counted from each send's scheduled time as `fanout` counts
//! it (the "send lateness" row says how late the sends went out), every member's stream
//! checked; on a shared machine its own cost is part of what the tails show.

mod load;
mod server;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

use super::report::{Latency, Report};
use super::{RunArgs, Scratch, emit};

#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Members online per channel, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Senders, each on its own connection (sender i sends to channel i mod channels).
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Messages per second, all senders together (open loop).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Bytes per record (20–65536).
    #[arg(long, default_value_t = 128)]
    pub record_bytes: usize,
    /// Threads writing a round's records out (1 or 2).
    #[arg(long, default_value_t = 2)]
    pub send_threads: usize,
    /// No `fdatasync`: what durability costs (the figures are then not a durable floor).
    #[arg(long)]
    pub no_sync: bool,
    /// Commit on a thread of its own, as Natter's writer does: the loop hands it a round
    /// and is woken with it committed, reading the next round meanwhile (a group commit).
    /// What a writer thread costs at low load.
    #[arg(long)]
    pub writer_thread: bool,
    /// Where the log goes (default: a fresh temporary directory, removed afterwards). Put
    /// it on the disk the server under comparison writes to.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the report as JSON: one JSON value on stdout, the table on stderr.
    #[arg(long)]
    pub json: bool,
    /// Write the report as a self-contained HTML page.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The binary to start as the floor's server (default: this one).
    #[arg(long, hide = true)]
    pub server_bin: Option<PathBuf>,
    /// Run as the floor's server, with its log at this path (the child's side).
    #[arg(long, hide = true)]
    pub serve_log: Option<PathBuf>,
}

/// The log's size (a reused WAL's: written through once, then overwritten).
const LOG_BYTES: u64 = 64 << 20;
/// A connection's first bytes: `S` (a sender) or `M` and a channel (a member).
const HELLO_BYTES: usize = 5;
/// A record: its scheduled send time (ns from the load's start; also the whole ack),
/// its channel, then the seq the server gives it.
const ACK_BYTES: usize = 8;
const CHANNEL: std::ops::Range<usize> = 8..12;
const SEQ: std::ops::Range<usize> = 12..20;
const MIN_RECORD: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Sender,
    Member(u32),
}

impl Role {
    fn hello(self) -> [u8; HELLO_BYTES] {
        let (kind, channel) = match self {
            Role::Sender => (b'S', 0),
            Role::Member(c) => (b'M', c),
        };
        let mut h = [kind, 0, 0, 0, 0];
        h[1..].copy_from_slice(&channel.to_le_bytes());
        h
    }

    fn parse(hello: &[u8]) -> Option<Role> {
        let channel = u32::from_le_bytes(hello.get(1..HELLO_BYTES)?.try_into().ok()?);
        match hello.first()? {
            b'S' => Some(Role::Sender),
            b'M' => Some(Role::Member(channel)),
            _ => None,
        }
    }
}

fn channel_of(record: &[u8]) -> u32 {
    u32::from_le_bytes(record[CHANNEL].try_into().expect("4 bytes"))
}

fn seq_of(record: &[u8]) -> u64 {
    u64::from_le_bytes(record[SEQ].try_into().expect("8 bytes"))
}

pub async fn run(args: FloorArgs) -> anyhow::Result<()> {
    if let Some(log) = args.serve_log.clone() {
        return tokio::task::spawn_blocking(move || serve_child(&log, &args)).await?;
    }
    let run = RunArgs {
        json: args.json,
        report: args.report.clone(),
        ..RunArgs::default()
    };
    let report = tokio::task::spawn_blocking(move || measure(&args)).await??;
    emit(&report, &run)
}

/// The child's side: listens, says where on stdout, serves until stdin closes.
fn serve_child(log: &std::path::Path, args: &FloorArgs) -> anyhow::Result<()> {
    check_server_flags(args)?;
    crate::process::raise_open_files(u64::MAX);
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("bind the floor's listener")?;
    println!("listening {}", listener.local_addr()?);
    let setup = server::Setup {
        record_bytes: args.record_bytes,
        log_bytes: LOG_BYTES,
        send_threads: args.send_threads,
        sync: !args.no_sync,
        writer_thread: args.writer_thread,
    };
    server::serve(listener, log, &setup, std::io::stdin().as_fd())
}

/// The flags the server takes too (the child checks them itself: it can be started by
/// hand).
fn check_server_flags(args: &FloorArgs) -> anyhow::Result<()> {
    if !(MIN_RECORD..=65_536).contains(&args.record_bytes) {
        bail!("--record-bytes must be {MIN_RECORD}–65536");
    }
    if !(1..=2).contains(&args.send_threads) {
        bail!("--send-threads must be 1 or 2");
    }
    Ok(())
}

/// Starts the floor's server as a child process, runs the load against it, stops it.
pub fn measure(args: &FloorArgs) -> anyhow::Result<Report> {
    check_server_flags(args)?;
    if args.channels == 0 || args.members == 0 || args.senders == 0 {
        bail!("--channels, --members and --senders must be at least 1");
    }
    let messages = args.rate * args.duration;
    let valid = args.rate > 0.0
        && args.duration <= 86_400.0
        && (1.0..=1e9).contains(&messages)
        && (messages as u64).checked_mul(args.members as u64).is_some();
    if !valid {
        bail!("--rate and --duration must be positive, and make 1 to 10^9 messages");
    }
    let connections = args
        .channels
        .saturating_mul(args.members)
        .saturating_add(args.senders);
    crate::process::raise_open_files(connections as u64 + 64);
    let scratch = Scratch::new(args.data_dir.clone())?;
    let child = Server::start(args, scratch.path.join("floor.log"))?;
    let outcome = load::run(child.addr, args, child.pid());
    let stopped = child.stop();
    let report = report(args, &outcome?);
    stopped?;
    Ok(report)
}

/// The child process; killed if dropped before [`Server::stop`].
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(args: &FloorArgs, log: PathBuf) -> anyhow::Result<Self> {
        let exe = match &args.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("find the natter binary")?,
        };
        let mut command = Command::new(exe);
        command
            .args(["bench", "floor", "--serve-log"])
            .arg(&log)
            .args(["--record-bytes", &args.record_bytes.to_string()])
            .args(["--send-threads", &args.send_threads.to_string()]);
        if args.no_sync {
            command.arg("--no-sync");
        }
        if args.writer_thread {
            command.arg("--writer-thread");
        }
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the floor's server")?;
        // Killed on drop if no address comes.
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let stdout = server
            .child
            .stdout
            .take()
            .context("take the child's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("read the floor server's address")?;
        server.addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the floor's server did not start: {line:?}"))?;
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the child's stdin, which ends it, and waits for it.
    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait().context("wait for the floor's server")?;
        if !status.success() {
            bail!("the floor's server exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn report(args: &FloorArgs, o: &load::Outcome) -> Report {
    let mut report = Report::new("floor");
    report.param(
        "server",
        "floor: one epoll loop, plain TCP, preallocated log",
    );
    report.param("channels", args.channels);
    report.param("members per channel", args.members);
    report.param("senders", args.senders);
    report.param("offered msgs/s", args.rate);
    report.param("duration (s)", args.duration);
    report.param("record bytes", args.record_bytes);
    report.param("send threads", args.send_threads);
    report.param("fdatasync", if args.no_sync { "no" } else { "yes" });
    let commit = if args.writer_thread {
        "on a writer thread"
    } else {
        "on the loop's thread"
    };
    report.param("commit", commit);
    report.figure("messages acked", o.acked as f64, "");
    report.figure("deliveries", o.deliveries as f64, "");
    let secs = o.elapsed.as_secs_f64().max(f64::EPSILON);
    report.figure("acked msgs/s", o.acked as f64 / secs, "1/s");
    report.figure("deliveries/s", o.deliveries as f64 / secs, "1/s");
    if let Some(cpu) = o.server_cpu {
        report.figure("server CPU", cpu, "s");
        if o.acked > 0 {
            report.figure("server CPU per message", cpu * 1e6 / o.acked as f64, "µs");
        }
    }
    report.cpu_per_million_deliveries("server", o.server_cpu, o.deliveries);
    report.cpu_per_million_deliveries("load", o.load_cpu, o.deliveries);
    report
        .latencies
        .push(Latency::from_micros("ack", &o.ack_us));
    report
        .latencies
        .push(Latency::from_micros("send→deliver", &o.deliver_us));
    report
        .latencies
        .push(Latency::from_micros("send lateness", &o.late_us));
    report.checks = o.violations.clone();
    if o.acked != o.sent {
        report
            .errors
            .insert("unacknowledged".into(), o.sent - o.acked);
    }
    if o.deliveries != o.expected {
        report.errors.insert(
            "deliveries short or over".into(),
            o.expected.abs_diff(o.deliveries),
        );
    }
    report.passed = report.checks.total() == 0 && report.errors.is_empty();
    report
}
