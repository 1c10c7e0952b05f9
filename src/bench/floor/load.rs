//! The floor's load: every member and sender a plain TCP connection, all on one thread,
//! sends on an open-loop schedule, every member's stream checked.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::{ACK_BYTES, CHANNEL, FloorArgs, Role, channel_of, seq_of};
use crate::bench::check::{Checker, Violations};
use crate::bench::histogram;

/// How long after the last scheduled send the answers may take.
const SETTLE: Duration = Duration::from_secs(10);

/// The poll's token for the [`TimerFd`].
const TIMER: Token = Token(usize::MAX);

pub(super) struct Outcome {
    pub sent: u64,
    pub acked: u64,
    pub deliveries: u64,
    /// Deliveries every member getting every record of its channel makes.
    pub expected: u64,
    pub ack_us: Histogram<u64>,
    pub deliver_us: Histogram<u64>,
    /// How late each send was written after its scheduled time.
    pub late_us: Histogram<u64>,
    /// From the first scheduled send to the last answer.
    pub elapsed: Duration,
    /// The server's CPU time over the same span.
    pub server_cpu: Option<f64>,
    /// This process's (the load's).
    pub load_cpu: Option<f64>,
    pub violations: Violations,
}

struct Peer {
    socket: TcpStream,
    role: Role,
    read: Vec<u8>,
    write: Vec<u8>,
    /// Registered for writable: a write left bytes behind.
    waiting: bool,
    /// A member's stream, checked.
    checker: Checker,
}

struct Load<'a> {
    args: &'a FloorArgs,
    poll: Poll,
    timer: TimerFd,
    peers: Vec<Peer>,
    first_sender: usize,
    start: Instant,
    total: u64,
    /// Records sent to each channel: the last seq each of its members should see.
    sent_to: HashMap<i64, i64>,
    o: Outcome,
}

pub(super) fn run(addr: SocketAddr, args: &FloorArgs, server_pid: u32) -> anyhow::Result<Outcome> {
    let mut peers = Vec::new();
    for c in 0..args.channels {
        for m in 0..args.members {
            let who = format!("member {m} of channel {c}");
            peers.push(connect(addr, Role::Member(c as u32), who)?);
        }
    }
    let first_sender = peers.len();
    for s in 0..args.senders {
        peers.push(connect(addr, Role::Sender, format!("sender {s}"))?);
    }
    let poll = Poll::new().context("create the poll")?;
    for (i, p) in peers.iter_mut().enumerate() {
        poll.registry()
            .register(&mut p.socket, Token(i), Interest::READABLE)
            .context("register a connection")?;
    }
    let timer = TimerFd::new()?;
    poll.registry()
        .register(
            &mut SourceFd(&timer.fd.as_raw_fd()),
            TIMER,
            Interest::READABLE,
        )
        .context("register the timer")?;
    let total = (args.rate * args.duration).round() as u64;
    let mut load = Load {
        args,
        poll,
        timer,
        peers,
        first_sender,
        start: Instant::now(),
        total,
        sent_to: HashMap::new(),
        o: Outcome {
            sent: 0,
            acked: 0,
            deliveries: 0,
            expected: total * args.members as u64,
            ack_us: histogram(),
            deliver_us: histogram(),
            late_us: histogram(),
            elapsed: Duration::ZERO,
            server_cpu: None,
            load_cpu: None,
            violations: Violations::default(),
        },
    };
    let server_before = crate::process::cpu_seconds(Some(server_pid));
    let load_before = crate::process::cpu_seconds(None);
    load.start = Instant::now();
    load.drive()?;
    let spent = |before: Option<f64>, pid| before.zip(crate::process::cpu_seconds(pid));
    load.o.server_cpu = spent(server_before, Some(server_pid)).map(|(a, b)| b - a);
    load.o.load_cpu = spent(load_before, None).map(|(a, b)| b - a);
    Ok(load.finish())
}

impl Load<'_> {
    /// When message `k` is due.
    fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(k as f64 / self.args.rate)
    }

    /// Sends on schedule and takes answers until every ack and delivery came, or
    /// [`SETTLE`] after the last send.
    fn drive(&mut self) -> anyhow::Result<()> {
        let deadline = self.due(self.total) + SETTLE;
        let mut events = Events::with_capacity(4096);
        let mut armed = None;
        while (self.o.acked < self.total || self.o.deliveries < self.o.expected)
            && Instant::now() < deadline
        {
            self.send_due()?;
            let wake = if self.o.sent < self.total {
                self.due(self.o.sent)
            } else {
                deadline
            };
            // The poll's own timeout is in whole milliseconds, rounded up: the timer
            // wakes it on time, the timeout is only a backstop.
            let wait = wake.saturating_duration_since(Instant::now());
            let timeout = if wait.is_zero() {
                wait
            } else {
                // Set once per instant, not on each turn that reads a socket.
                if armed != Some(wake) {
                    self.timer.set(wait)?;
                    armed = Some(wake);
                }
                wait + Duration::from_millis(1)
            };
            self.poll.poll(&mut events, Some(timeout)).context("poll")?;
            for event in events.iter() {
                if event.token() == TIMER {
                    self.timer.clear();
                    continue;
                }
                let i = event.token().0;
                if event.is_writable() {
                    write_some(&mut self.peers[i], &self.poll, Token(i))?;
                }
                if event.is_readable() {
                    self.take(i)?;
                }
            }
        }
        Ok(())
    }

    /// Writes every send now due, each from sender `k mod senders` to its channel.
    fn send_due(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        while self.o.sent < self.total && self.due(self.o.sent) <= now {
            let k = self.o.sent;
            let at = self.due(k);
            let sender = (k % self.args.senders as u64) as usize;
            let channel = (sender % self.args.channels) as u32;
            let token = Token(self.first_sender + sender);
            let peer = &mut self.peers[token.0];
            let from = peer.write.len();
            peer.write.resize(from + self.args.record_bytes, 0);
            let record = &mut peer.write[from..];
            record[..ACK_BYTES].copy_from_slice(&nanos(self.start, at).to_le_bytes());
            record[CHANNEL].copy_from_slice(&channel.to_le_bytes());
            write_some(peer, &self.poll, token)?;
            self.o
                .late_us
                .saturating_record(micros(Instant::now() - at));
            *self.sent_to.entry(i64::from(channel)).or_default() += 1;
            self.o.sent += 1;
        }
        Ok(())
    }

    /// Takes what connection `i` has: a sender's acks, a member's records.
    fn take(&mut self, i: usize) -> anyhow::Result<()> {
        let peer = &mut self.peers[i];
        read_all(peer)?;
        let now = nanos(self.start, Instant::now());
        let since = |at: &[u8]| {
            let at = u64::from_le_bytes(at[..ACK_BYTES].try_into().expect("8 bytes"));
            (now.saturating_sub(at) / 1000).max(1)
        };
        let size = match peer.role {
            Role::Sender => ACK_BYTES,
            Role::Member(_) => self.args.record_bytes,
        };
        let whole = peer.read.len() / size * size;
        for unit in peer.read[..whole].chunks_exact(size) {
            match peer.role {
                Role::Sender => {
                    self.o.ack_us.saturating_record(since(unit));
                    self.o.acked += 1;
                }
                Role::Member(own) => {
                    self.o.deliver_us.saturating_record(since(unit));
                    if channel_of(unit) != own {
                        bail!(
                            "a member of channel {own} got a record of {}",
                            channel_of(unit)
                        );
                    }
                    peer.checker.observe(i64::from(own), seq_of(unit) as i64);
                    self.o.deliveries += 1;
                }
            }
        }
        peer.read.drain(..whole);
        self.o.elapsed = Instant::now() - self.start;
        Ok(())
    }

    /// Every member's check against what was sent to its channel.
    fn finish(mut self) -> Outcome {
        for peer in self.peers {
            if let Role::Member(_) = peer.role {
                self.o.violations.merge(&peer.checker.finish(&self.sent_to));
            }
        }
        self.o
    }
}

/// Connects, says who it is, and waits for the server's one-byte answer: a member is
/// registered before any send.
fn connect(addr: SocketAddr, role: Role, who: String) -> anyhow::Result<Peer> {
    let mut socket = std::net::TcpStream::connect(addr).context("connect to the floor")?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(Duration::from_secs(10)))?;
    socket.write_all(&role.hello()).context("say hello")?;
    let mut answer = [0u8; 1];
    socket
        .read_exact(&mut answer)
        .context("wait for the answer to a hello")?;
    if answer != *b"k" {
        bail!("the floor's server answered a hello with {answer:?}");
    }
    socket.set_nonblocking(true)?;
    let mut checker = Checker::new(who);
    if let Role::Member(channel) = role {
        // Nothing arriving at all is then a gap too.
        checker.start(i64::from(channel), 0);
    }
    Ok(Peer {
        socket: TcpStream::from_std(socket),
        role,
        read: Vec::new(),
        write: Vec::new(),
        waiting: false,
        checker,
    })
}

/// Everything the socket has now; a closed socket is an error (the server never closes).
fn read_all(peer: &mut Peer) -> anyhow::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match peer.socket.read(&mut buf) {
            Ok(0) => bail!("the floor's server closed a connection"),
            Ok(n) => peer.read.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read from the floor's server"),
        }
    }
}

/// Writes what the socket takes; waits for writable while bytes are left.
fn write_some(peer: &mut Peer, poll: &Poll, token: Token) -> anyhow::Result<()> {
    let mut done = 0;
    while done < peer.write.len() {
        match peer.socket.write(&peer.write[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e).context("write to the floor's server"),
        }
    }
    peer.write.drain(..done);
    if peer.waiting == peer.write.is_empty() {
        peer.waiting = !peer.write.is_empty();
        let interest = if peer.waiting {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        poll.registry()
            .reregister(&mut peer.socket, token, interest)
            .context("change what a connection waits for")?;
    }
    Ok(())
}

/// A `timerfd`: the load's sends go out within tens of microseconds of their schedule,
/// where the poll's millisecond timeout sent them ~0.6 ms late at p50.
struct TimerFd {
    fd: OwnedFd,
}

impl TimerFd {
    fn new() -> anyhow::Result<Self> {
        // SAFETY: no pointer is passed; the result is checked before it is owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("create a timerfd");
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires `after` from now (not zero: that disarms it).
    fn set(&self, after: Duration) -> anyhow::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as _,
            },
        };
        // SAFETY: `spec` lives over the call; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("set the timerfd");
        }
        Ok(())
    }

    /// Takes the expiry count, so the next expiry is a new edge.
    fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: `count` is 8 writable bytes, as a timerfd's read asks.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }
}

fn nanos(start: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(start).as_nanos() as u64
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}
