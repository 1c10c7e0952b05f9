//! The floor's load: every member and sender a plain TCP connection, all on one thread,
//! sends on an open-loop schedule, every member's stream checked.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::{ACK_BYTES, FloorArgs, Role, channel_of, seq_of};
use crate::bench::check::{Checker, Violations};
use crate::bench::histogram;

/// How long after the last scheduled send the answers may take.
const SETTLE: Duration = Duration::from_secs(10);

pub(super) struct Outcome {
    pub sent: u64,
    pub acked: u64,
    pub deliveries: u64,
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
    checker: Option<Checker>,
}

pub(super) fn run(addr: SocketAddr, args: &FloorArgs, server_pid: u32) -> anyhow::Result<Outcome> {
    let record_bytes = args.record_bytes;
    let mut peers = Vec::new();
    for c in 0..args.channels {
        for m in 0..args.members {
            let who = format!("member {m} of channel {c}");
            peers.push(connect(addr, Role::Member(c as u32), Some(who))?);
        }
    }
    let first_sender = peers.len();
    for _ in 0..args.senders {
        peers.push(connect(addr, Role::Sender, None)?);
    }
    let mut poll = Poll::new()?;
    for (i, p) in peers.iter_mut().enumerate() {
        poll.registry()
            .register(&mut p.socket, Token(i), Interest::READABLE)?;
    }

    let total = (args.rate * args.duration).round().max(1.0) as u64;
    let expected = total * args.members as u64;
    let mut o = Outcome {
        sent: 0,
        acked: 0,
        deliveries: 0,
        ack_us: histogram(),
        deliver_us: histogram(),
        late_us: histogram(),
        elapsed: Duration::ZERO,
        server_cpu: None,
        load_cpu: None,
        violations: Violations::default(),
    };
    let mut sent_to: HashMap<i64, i64> = HashMap::new();
    let mut events = Events::with_capacity(4096);
    let cpu_before = crate::process::cpu_seconds(Some(server_pid));
    let load_cpu_before = crate::process::cpu_seconds(None);
    let start = Instant::now();
    let due = |k: u64| start + Duration::from_secs_f64(k as f64 / args.rate);
    let deadline = due(total) + SETTLE;
    while (o.acked < total || o.deliveries < expected) && Instant::now() < deadline {
        let now = Instant::now();
        while o.sent < total && due(o.sent) <= now {
            let k = o.sent;
            let sender = (k % args.senders as u64) as usize;
            let channel = (sender % args.channels) as u32;
            let at = due(k);
            let mut record = vec![0u8; record_bytes];
            record[..ACK_BYTES].copy_from_slice(&(nanos(start, at)).to_le_bytes());
            record[super::CHANNEL].copy_from_slice(&channel.to_le_bytes());
            let peer = &mut peers[first_sender + sender];
            peer.write.extend_from_slice(&record);
            let _ = o.late_us.record(micros(Instant::now() - at));
            write_some(peer, &poll, Token(first_sender + sender))?;
            *sent_to.entry(i64::from(channel)).or_default() += 1;
            o.sent += 1;
        }
        let wake = if o.sent < total {
            due(o.sent)
        } else {
            deadline
        };
        poll.poll(
            &mut events,
            Some(wake.saturating_duration_since(Instant::now())),
        )
        .context("poll")?;
        for event in events.iter() {
            let i = event.token().0;
            let peer = &mut peers[i];
            if event.is_writable() {
                write_some(peer, &poll, Token(i))?;
            }
            if !event.is_readable() {
                continue;
            }
            read_all(peer)?;
            let now = nanos(start, Instant::now());
            let whole = match peer.role {
                Role::Sender => peer.read.len() / ACK_BYTES * ACK_BYTES,
                Role::Member(_) => peer.read.len() / record_bytes * record_bytes,
            };
            match peer.role {
                Role::Sender => {
                    for ack in peer.read[..whole].chunks_exact(ACK_BYTES) {
                        let at = u64::from_le_bytes(ack.try_into().expect("8 bytes"));
                        let _ = o.ack_us.record((now.saturating_sub(at) / 1000).max(1));
                        o.acked += 1;
                    }
                }
                Role::Member(_) => {
                    let checker = peer.checker.as_mut().expect("a member has a checker");
                    for record in peer.read[..whole].chunks_exact(record_bytes) {
                        let at = u64::from_le_bytes(record[..ACK_BYTES].try_into().expect("8"));
                        let _ = o.deliver_us.record((now.saturating_sub(at) / 1000).max(1));
                        checker.observe(i64::from(channel_of(record)), seq_of(record) as i64);
                        o.deliveries += 1;
                    }
                }
            }
            peer.read.drain(..whole);
            o.elapsed = Instant::now() - start;
        }
    }
    o.server_cpu = cpu_before
        .zip(crate::process::cpu_seconds(Some(server_pid)))
        .map(|(a, b)| b - a);
    o.load_cpu = load_cpu_before
        .zip(crate::process::cpu_seconds(None))
        .map(|(a, b)| b - a);
    for peer in peers {
        if let Some(checker) = peer.checker {
            o.violations.merge(&checker.finish(&sent_to));
        }
    }
    Ok(o)
}

/// Connects, says who it is, and waits for the server's one-byte answer: a member is
/// registered before any send.
fn connect(addr: SocketAddr, role: Role, member: Option<String>) -> anyhow::Result<Peer> {
    let mut socket = std::net::TcpStream::connect(addr).context("connect to the floor")?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(Duration::from_secs(10)))?;
    socket.write_all(&role.hello())?;
    let mut answer = [0u8; 1];
    socket
        .read_exact(&mut answer)
        .context("the floor's server did not answer a hello")?;
    if answer != *b"k" {
        bail!("the floor's server answered a hello with {answer:?}");
    }
    socket.set_nonblocking(true)?;
    Ok(Peer {
        socket: TcpStream::from_std(socket),
        role,
        read: Vec::new(),
        write: Vec::new(),
        waiting: false,
        checker: member.map(Checker::new),
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
    while !peer.write.is_empty() {
        match peer.socket.write(&peer.write) {
            Ok(n) => {
                peer.write.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e).context("write to the floor's server"),
        }
    }
    if peer.waiting == peer.write.is_empty() {
        peer.waiting = !peer.write.is_empty();
        let interest = if peer.waiting {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        poll.registry()
            .reregister(&mut peer.socket, token, interest)?;
    }
    Ok(())
}

fn nanos(start: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(start).as_nanos() as u64
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}
