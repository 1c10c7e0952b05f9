//! The fan-out's receivers: every member's WebSocket read on a few threads of their own,
//! each an `epoll` loop (mio) over its share of the sockets, with the frames parsed in
//! place and only the fields the bench needs read from their JSON, as the floor's load
//! reads its records. Each member's stream goes through its [`Checker`]; the phases,
//! shares, drops and resumes are what the client library's receiver did (see
//! [`crate::client::Realtime`]).
//!
//! Why not a Tokio task per member over the client library: at a thousand members that
//! load took ~45 % of the two cores' samples at 50 msgs/s, half of it in user space
//! (Tokio's wake-ups and polls, the full parse of each frame, the WebSocket library),
//! and on shared cores every microsecond of it is one the server's fan-out waits for
//! (BENCHMARKS.md, "Session 16").

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::SETTLE;
use super::workers::{Control, Progress, Seen, Share, Tallies, count_delivery};
use crate::bench::check::Checker;
use crate::gateway::outbox::head_of;

/// How long an opening (connect, upgrade, hello, up to `ready`) may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Attempts to connect again after a drop (as the client library's `max_attempts`).
const ATTEMPTS: u32 = 60;
/// Between two attempts.
const RETRY: Duration = Duration::from_millis(250);
/// The most bytes of a frame not yet whole a member keeps (the server's frames are far
/// smaller: a `ready` of thousands of channels is a few hundred KB).
const MAX_UNREAD: usize = 16 << 20;
/// The loop looks at the controller's word at least this often.
const TURN: Duration = Duration::from_millis(5);

/// One member to connect: where, as whom, and its name in the checker's examples.
pub(super) struct Spec {
    pub addr: SocketAddr,
    /// For the `Host` header, and the path of `/v1/ws` under the node's base.
    pub host: String,
    pub path: String,
    pub token: String,
    pub who: String,
}

/// What the rig shares with the receiving threads.
pub(super) struct Shared {
    pub start: Instant,
    pub control: watch::Receiver<Control>,
    pub shares: mpsc::UnboundedSender<Share>,
    pub tallies: Arc<Tallies>,
    /// Told the deliveries seen, for the senders' closed loop.
    pub progress: Arc<Progress>,
}

/// Starts the receiving threads (one per core, at most four) over `specs`. Each member
/// connects on its thread; `connected` hears of each (or of the first error). The
/// receivers' outcomes, in the order of `specs`.
pub(super) fn start(
    specs: Vec<Spec>,
    shared: &Shared,
    connected: mpsc::UnboundedSender<anyhow::Result<()>>,
) -> anyhow::Result<Vec<oneshot::Receiver<anyhow::Result<Seen>>>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    let mut outcomes = Vec::with_capacity(specs.len());
    let mut shares: Vec<Vec<(Spec, oneshot::Sender<anyhow::Result<Seen>>)>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (i, spec) in specs.into_iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        shares[i % threads].push((spec, tx));
        outcomes.push(rx);
    }
    for (t, mine) in shares.into_iter().enumerate() {
        if mine.is_empty() {
            continue;
        }
        let (control, shares, tallies, progress) = (
            shared.control.clone(),
            shared.shares.clone(),
            Arc::clone(&shared.tallies),
            Arc::clone(&shared.progress),
        );
        let (start, connected) = (shared.start, connected.clone());
        std::thread::Builder::new()
            .name(format!("bench-members-{t}"))
            .spawn(move || {
                let poll = match Poll::new() {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = connected.send(Err(e.into()));
                        return;
                    }
                };
                let mut load = Load {
                    turns: Turns {
                        poll,
                        start,
                        control,
                        tallies,
                    },
                    members: Vec::with_capacity(mine.len()),
                    resuming: Vec::new(),
                    shares,
                    progress,
                };
                for (spec, outcome) in mine {
                    let token = Token(load.members.len());
                    match Member::connect(spec, &load.turns, token) {
                        Ok(m) => {
                            let _ = connected.send(Ok(()));
                            load.members.push((m, Some(outcome)));
                        }
                        Err(e) => {
                            let _ = connected.send(Err(e));
                            return;
                        }
                    }
                }
                load.run();
            })
            .context("start a receiving thread")?;
    }
    Ok(outcomes)
}

/// What a receiving thread's members share in its turns.
struct Turns {
    poll: Poll,
    start: Instant,
    control: watch::Receiver<Control>,
    tallies: Arc<Tallies>,
}

impl Turns {
    /// The rig is gone or finishing (a member connecting again gives up).
    fn ending(&self) -> bool {
        self.control.has_changed().is_err() || matches!(*self.control.borrow(), Control::Finish)
    }
}

/// One thread's members, driven until the controller says finish.
struct Load {
    turns: Turns,
    members: Vec<(Member, Option<oneshot::Sender<anyhow::Result<Seen>>>)>,
    /// The members connecting again (indices in `members`).
    resuming: Vec<usize>,
    shares: mpsc::UnboundedSender<Share>,
    progress: Arc<Progress>,
}

impl Load {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut now_control = self.turns.control.borrow_and_update().clone();
        let mut last_expected: Arc<HashMap<i64, i64>> = Arc::default();
        let mut looked = Instant::now();
        loop {
            if let Err(e) = self.turns.poll.poll(&mut events, Some(TURN))
                && e.kind() != ErrorKind::Interrupted
            {
                self.fail_all(&anyhow::Error::new(e).context("poll"));
                return;
            }
            let mut delivered = 0;
            for event in events.iter() {
                let i = event.token().0;
                let (member, outcome) = &mut self.members[i];
                if outcome.is_none() {
                    continue;
                }
                let before = member.share.deliveries;
                let was_resuming = member.resuming.is_some();
                let turned = member.ready(&self.turns, Token(i));
                delivered += member.share.deliveries - before;
                // (A member stays listed until a turn finds it connected.)
                if !was_resuming && member.resuming.is_some() {
                    self.resuming.push(i);
                }
                if let Err(e) = turned {
                    Self::fail(member, outcome, &self.turns.poll, e);
                }
            }
            // Members connecting again: an attempt that timed out, or one due.
            let now = Instant::now();
            let mut k = 0;
            while let Some(&i) = self.resuming.get(k) {
                let (member, outcome) = &mut self.members[i];
                if outcome.is_some()
                    && let Err(e) = member.tick(&self.turns, Token(i), now)
                {
                    Self::fail(member, outcome, &self.turns.poll, e);
                }
                if outcome.is_some() && member.resuming.is_some() {
                    k += 1;
                } else {
                    self.resuming.swap_remove(k);
                }
            }
            if delivered > 0 {
                self.progress
                    .delivered
                    .fetch_add(delivered, Ordering::Relaxed);
            }
            // (The rig gone: finish.)
            let Ok(changed) = self.turns.control.has_changed() else {
                break;
            };
            if changed {
                now_control = self.turns.control.borrow_and_update().clone();
            }
            let tick = looked.elapsed() >= TURN;
            if !(changed || tick || !events.is_empty()) {
                continue;
            }
            looked = Instant::now();
            match &now_control {
                Control::Finish => break,
                Control::PhaseEnd { phase, expected } => {
                    last_expected = Arc::clone(expected);
                    for (m, outcome) in &mut self.members {
                        if outcome.is_some() && m.phase == *phase && m.phase_over(expected) {
                            let done = std::mem::replace(&mut m.share, Share::new());
                            m.phase += 1;
                            if self.shares.send(done).is_err() {
                                return;
                            }
                        }
                    }
                }
                Control::Running => {}
            }
        }
        for (m, outcome) in &mut self.members {
            let Some(o) = outcome.take() else {
                continue;
            };
            // One still connecting again is judged by what it saw, as one that lags: it
            // may have seen all it was to see before it was dropped.
            if let Some(mut r) = m.resuming.take() {
                if let Some((mut socket, _)) = r.attempt.take() {
                    let _ = self.turns.poll.registry().deregister(&mut socket);
                }
            } else {
                m.close();
            }
            let violations = std::mem::take(&mut m.checker).finish(&last_expected);
            let _ = o.send(Ok(Seen { violations }));
        }
    }

    /// Reads no more of `member` and hands its error to the rig, which fails the phase.
    fn fail(
        member: &mut Member,
        outcome: &mut Option<oneshot::Sender<anyhow::Result<Seen>>>,
        poll: &Poll,
        e: anyhow::Error,
    ) {
        let Some(o) = outcome.take() else {
            return;
        };
        if let Some(r) = &mut member.resuming
            && let Some((socket, _)) = &mut r.attempt
        {
            let _ = poll.registry().deregister(socket);
        }
        let _ = poll.registry().deregister(&mut member.socket);
        let _ = member.socket.shutdown(std::net::Shutdown::Both);
        let _ = o.send(Err(e));
    }

    fn fail_all(&mut self, e: &anyhow::Error) {
        for (_, outcome) in &mut self.members {
            if let Some(o) = outcome.take() {
                let _ = o.send(Err(anyhow::anyhow!("{e:#}")));
            }
        }
    }
}

/// One member's connection and what it saw.
struct Member {
    spec: Spec,
    socket: TcpStream,
    /// What was read and not yet parsed (at most a partial frame between reads).
    read: Vec<u8>,
    /// Frames of ours the socket did not take yet (pongs).
    write: Vec<u8>,
    /// The channels from the last `ready` and `channel.joined`: where a resume starts.
    channels: Vec<i64>,
    checker: Checker,
    share: Share,
    phase: u32,
    /// When the phase's end gives up on this member's catching up.
    deadline: Option<Instant>,
    /// Connecting again after a drop (`socket` is then the lost one).
    resuming: Option<Box<Resume>>,
}

/// A member connecting again after a drop, in its thread's turns.
struct Resume {
    /// Where to resume each channel: the last seq the checker saw.
    from: HashMap<i64, i64>,
    /// Attempts that failed.
    failed: u32,
    /// The attempt under way: its socket (registered under the member's token) and
    /// opening. `None` between two attempts.
    attempt: Option<(TcpStream, Opening)>,
    /// When the attempt under way gives up, or the next one begins.
    at: Instant,
}

impl Resume {
    /// Begins an attempt: connects without waiting and registers the socket; the
    /// opening goes on as it becomes ready. One that fails at once counts as failed
    /// ([`Resume::failed`]).
    fn begin(&mut self, spec: &Spec, turns: &Turns, token: Token) -> anyhow::Result<()> {
        let connected = TcpStream::connect(spec.addr).and_then(|mut socket| {
            socket.set_nodelay(true)?;
            turns.poll.registry().register(
                &mut socket,
                token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(socket)
        });
        match connected {
            Ok(socket) => {
                self.attempt = Some((socket, Opening::new(spec, &self.from)));
                self.at = Instant::now() + HANDSHAKE;
                Ok(())
            }
            Err(e) => self.failed(anyhow::Error::new(e).context("connect"), spec, turns),
        }
    }

    /// The attempt under way failed with `e`: the next begins after [`RETRY`], unless
    /// [`ATTEMPTS`] have failed or the rig is gone or finishing (then `e` is the member's).
    fn failed(&mut self, e: anyhow::Error, spec: &Spec, turns: &Turns) -> anyhow::Result<()> {
        if let Some((mut socket, _)) = self.attempt.take() {
            let _ = turns.poll.registry().deregister(&mut socket);
        }
        self.failed += 1;
        if self.failed >= ATTEMPTS || turns.ending() {
            return Err(e.context(format!(
                "{}: resume ({} attempts failed)",
                spec.who, self.failed
            )));
        }
        self.at = Instant::now() + RETRY;
        Ok(())
    }
}

impl Member {
    fn connect(spec: Spec, turns: &Turns, token: Token) -> anyhow::Result<Self> {
        let (stream, opened) =
            handshake(&spec, &HashMap::new()).with_context(|| format!("connect {}", spec.who))?;
        let mut checker = Checker::new(spec.who.clone());
        let mut channels = Vec::with_capacity(opened.channels.len());
        for &(c, last) in &opened.channels {
            checker.start(c, last);
            channels.push(c);
        }
        let mut socket = TcpStream::from_std(stream);
        turns
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
            .context("register a member")?;
        let mut m = Self {
            spec,
            socket,
            read: opened.rest,
            write: Vec::new(),
            channels,
            checker,
            share: Share::new(),
            phase: 0,
            deadline: None,
            resuming: None,
        };
        // Frames that came with `ready`.
        m.parse(turns)?;
        Ok(m)
    }

    /// Whether this member is done with the phase: it saw every channel's expected last
    /// seq, or the settle time since the phase's end passed (then it is lagging).
    fn phase_over(&mut self, expected: &HashMap<i64, i64>) -> bool {
        let reached = expected
            .iter()
            .all(|(c, last)| self.checker.position(*c).is_none_or(|p| p >= *last));
        let timed_out = self.deadline.is_some_and(|d| Instant::now() >= d);
        if reached || timed_out {
            self.share.caught_up = reached;
            self.deadline = None;
            return true;
        }
        self.deadline.get_or_insert_with(|| Instant::now() + SETTLE);
        false
    }

    /// The socket is ready: reads what it has, or goes on connecting again.
    fn ready(&mut self, turns: &Turns, token: Token) -> anyhow::Result<()> {
        if self.resuming.is_some() {
            return self.go_on_resuming(turns, token);
        }
        self.take(turns, token)
    }

    /// Reads what the socket has and handles every whole frame in it. A drop is counted
    /// and a resume begun; an error only if the member cannot go on.
    fn take(&mut self, turns: &Turns, token: Token) -> anyhow::Result<()> {
        self.flush();
        // An error reads as the connection's end: the drop is counted and resumed.
        let ended = !matches!(read_available(&mut self.socket, &mut self.read), Ok(false));
        match self.parse(turns)? {
            None if !ended => Ok(()),
            code => self.lost(turns, token, code),
        }
    }

    /// Handles the whole frames read (counting deliveries in the member's phase); a close
    /// frame's code if one came.
    fn parse(&mut self, turns: &Turns) -> anyhow::Result<Option<u16>> {
        let mut at = 0;
        let mut closed = None;
        while let Some((opcode, payload, next)) = frame_at(&self.read[at..]) {
            let payload = at + payload.start..at + payload.end;
            at += next;
            match opcode {
                OP_TEXT => {
                    let text = std::str::from_utf8(&self.read[payload])
                        .context("a text frame that is not UTF-8")?;
                    let Some(seen) = glance(text)? else {
                        continue;
                    };
                    match seen {
                        Glimpse::Event {
                            channel,
                            seq,
                            created,
                            sent,
                        } => {
                            self.checker.observe(channel, seq);
                            if created {
                                let now = Instant::now();
                                self.share.deliveries += 1;
                                self.share.last_at = Some(now);
                                count_delivery(&turns.tallies, turns.start, self.phase, now, sent);
                            }
                        }
                        Glimpse::Joined { channel, last } => {
                            self.checker.start(channel, last);
                            self.channels.push(channel);
                        }
                        Glimpse::Left { channel } => self.channels.retain(|&c| c != channel),
                    }
                }
                OP_PING => {
                    let pong = masked(OP_PONG, &self.read[payload]);
                    self.write.extend_from_slice(&pong);
                }
                OP_CLOSE => {
                    let p = &self.read[payload];
                    closed = Some(if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    });
                    break;
                }
                OP_PONG => {}
                other => bail!("{}: a frame of opcode {other}", self.spec.who),
            }
        }
        self.read.drain(..at);
        if self.read.len() > MAX_UNREAD {
            bail!("{}: a frame past {MAX_UNREAD} bytes", self.spec.who);
        }
        self.flush();
        if let Some(code) = closed
            && (4001..=4003).contains(&code)
        {
            bail!("{}: closed with {code}", self.spec.who);
        }
        Ok(closed)
    }

    /// Counts the drop and begins connecting again, to resume from what the checker saw.
    /// The thread's other members read on meanwhile: the attempts go on in its turns
    /// ([`Member::go_on_resuming`], [`Member::tick`]).
    fn lost(&mut self, turns: &Turns, token: Token, code: Option<u16>) -> anyhow::Result<()> {
        let code = code.map_or_else(|| "no close frame".to_owned(), |c| c.to_string());
        *self.share.drops.entry(code).or_default() += 1;
        let _ = turns.poll.registry().deregister(&mut self.socket);
        let from = self
            .channels
            .iter()
            .filter_map(|&c| Some((c, self.checker.position(c)?)))
            .collect();
        self.read.clear();
        self.write.clear();
        let mut r = Box::new(Resume {
            from,
            failed: 0,
            attempt: None,
            at: Instant::now(),
        });
        let begun = r.begin(&self.spec, turns, token);
        self.resuming = Some(r);
        begun
    }

    /// A turn of the loop while connecting again: an attempt that took too long fails, and
    /// the next one begins when due. An error once the attempts are used up, or the rig is
    /// gone or finishing.
    fn tick(&mut self, turns: &Turns, token: Token, now: Instant) -> anyhow::Result<()> {
        let Some(r) = &mut self.resuming else {
            return Ok(());
        };
        if now < r.at {
            return Ok(());
        }
        if r.attempt.is_some() {
            let late = anyhow::anyhow!("no ready within {HANDSHAKE:?}");
            return r.failed(late, &self.spec, turns);
        }
        r.begin(&self.spec, turns, token)
    }

    /// The socket of an attempt to connect again is ready: goes on with the opening; once
    /// `ready` came, reads from the new connection (and what came with `ready`).
    fn go_on_resuming(&mut self, turns: &Turns, token: Token) -> anyhow::Result<()> {
        let Some(r) = &mut self.resuming else {
            return Ok(());
        };
        let Some((socket, opening)) = &mut r.attempt else {
            return Ok(());
        };
        let opened = match opening.drive(socket) {
            Ok(None) => return Ok(()),
            Ok(Some(opened)) => opened,
            Err(e) => return r.failed(e, &self.spec, turns),
        };
        let Some((mut socket, _)) = r.attempt.take() else {
            return Ok(());
        };
        self.resuming = None;
        turns
            .poll
            .registry()
            .reregister(&mut socket, token, Interest::READABLE)
            .context("register a member again")?;
        self.socket = socket;
        self.read = opened.rest;
        for &(c, last) in &opened.channels {
            if self.checker.position(c).is_none() {
                self.checker.start(c, last);
                self.channels.push(c);
            }
        }
        // What came with `ready` (the events replayed after it, often) is in the buffer
        // already: no readiness will report it.
        match self.parse(turns)? {
            None => Ok(()),
            code => self.lost(turns, token, code),
        }
    }

    /// Writes what is waiting (a pong); what the socket does not take waits for the next
    /// read of this member (the server pings every few seconds, and waits longer).
    fn flush(&mut self) {
        // A failed write: the read side sees the end.
        if write_available(&mut self.socket, &mut self.write).is_err() {
            self.write.clear();
        }
    }

    /// Says goodbye with a close frame (not waited for).
    fn close(&mut self) {
        let _ = self.socket.write(&masked(OP_CLOSE, &1000u16.to_be_bytes()));
    }
}

/// Writes what the non-blocking socket takes of `out`, and drains that from it.
fn write_available(socket: &mut TcpStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    while !out.is_empty() {
        match socket.write(out) {
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads all a non-blocking socket has into `into`: whether the connection ended (the
/// peer closed), or its error.
fn read_available(socket: &mut TcpStream, into: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

const OP_TEXT: u8 = 1;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// The first whole frame in `buf` (a server's: unmasked, not fragmented): its opcode,
/// where its payload is, and where the next frame starts.
fn frame_at(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    let [b0, b1, ..] = *buf else {
        return None;
    };
    let (len, head) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let end = usize::try_from(len).ok()?.checked_add(head)?;
    (buf.len() >= end).then_some((b0 & 0x0f, head..end, end))
}

/// A client's frame: final, masked (the key need not be secret here).
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const KEY: [u8; 4] = [0x5a, 0x13, 0xc7, 0x81];
    let (head, used) = head_of(0x80 | opcode, 0x80, payload.len());
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.extend_from_slice(&head[..usize::from(used)]);
    out.extend_from_slice(&KEY);
    out.extend(payload.iter().zip(KEY.iter().cycle()).map(|(b, k)| b ^ k));
    out
}

/// What a member needs of a server frame.
#[derive(Debug, PartialEq, Eq)]
enum Glimpse {
    /// An event of a channel: a `message.created` (`created`) has `sent`, the bench's
    /// send time (µs since the rig's start), if it is a message the bench sent.
    Event {
        channel: i64,
        seq: i64,
        created: bool,
        sent: Option<u64>,
    },
    /// The connection now follows `channel`, from `last`.
    Joined { channel: i64, last: i64 },
    /// The connection no longer follows `channel` (a resume does not name it).
    Left { channel: i64 },
}

/// The fields a member reads; the rest of the frame is skipped unparsed.
#[derive(Deserialize)]
struct Glance<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    channel_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default, borrow)]
    message: Option<GlanceMessage<'a>>,
    #[serde(default, borrow)]
    channel: Option<GlancePosition<'a>>,
    #[serde(default, borrow)]
    channels: Option<Vec<GlancePosition<'a>>>,
    #[serde(default, borrow)]
    error: Option<GlanceError<'a>>,
}

#[derive(Deserialize)]
struct GlanceMessage<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
struct GlancePosition<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    last_seq: i64,
}

#[derive(Deserialize)]
struct GlanceError<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
    #[serde(default, borrow)]
    message: Cow<'a, str>,
}

fn id(name: &str, s: Option<&str>) -> anyhow::Result<i64> {
    s.with_context(|| format!("no {name}"))?
        .parse()
        .with_context(|| format!("{name} is not an id"))
}

/// Reads a frame after `ready` as the client library would (`crate::client::frame`):
/// events and joins matter; everything else (pongs, typing, presence, profiles, the
/// answers to ops this member does not make) is let by.
fn glance(text: &str) -> anyhow::Result<Option<Glimpse>> {
    let g: Glance = serde_json::from_str(text).with_context(|| format!("a frame: {text}"))?;
    Ok(Some(match g.kind.as_ref() {
        "channel.joined" => {
            let c = g.channel.context("channel.joined without its channel")?;
            Glimpse::Joined {
                channel: id("channel.id", Some(&c.id))?,
                last: c.last_seq,
            }
        }
        "channel.left" => Glimpse::Left {
            channel: id("channel_id", g.channel_id.as_deref())?,
        },
        k if ["message.", "member.", "channel.", "reaction."]
            .iter()
            .any(|p| k.starts_with(p)) =>
        {
            let created = k == "message.created" && g.message.is_some();
            let sent = g.message.filter(|_| created).and_then(|m| sent_at(&m.text));
            Glimpse::Event {
                channel: id("channel_id", g.channel_id.as_deref())?,
                seq: g.seq.unwrap_or(0),
                created,
                sent,
            }
        }
        _ => return Ok(None),
    }))
}

/// The send time the bench wrote at the start of its texts (`t<µs> …`).
fn sent_at(text: &str) -> Option<u64> {
    text.split(' ').next()?.strip_prefix('t')?.parse().ok()
}

/// The opening of `/v1/ws` (the upgrade, the hello, up to `ready`) as bytes to write and
/// bytes read, with no I/O of its own: a blocking socket drives it at the start
/// ([`handshake`]), a member's turns when it connects again ([`Opening::drive`]).
struct Opening {
    /// To write: the upgrade's request, then the hello.
    out: Vec<u8>,
    /// Read and not yet understood.
    read: Vec<u8>,
    /// The hello, until the upgrade is answered.
    hello: Option<Vec<u8>>,
}

/// What an opening ends with.
struct Opened {
    /// What was read past `ready`.
    rest: Vec<u8>,
    /// `ready`'s channels, with their last seqs.
    channels: Vec<(i64, i64)>,
}

impl Opening {
    /// Says hello as `spec`'s member, resuming `resume`.
    fn new(spec: &Spec, resume: &HashMap<i64, i64>) -> Self {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            spec.path, spec.host
        );
        let resume: BTreeMap<String, i64> =
            resume.iter().map(|(c, s)| (c.to_string(), *s)).collect();
        let hello = serde_json::json!({"op": "hello", "token": spec.token, "resume": resume});
        Self {
            out: request.into_bytes(),
            read: Vec::with_capacity(4096),
            hello: Some(masked(OP_TEXT, hello.to_string().as_bytes())),
        }
    }

    /// Understands what was read: the hello is queued once the upgrade is answered, and
    /// `Some` once `ready` came.
    fn advance(&mut self) -> anyhow::Result<Option<Opened>> {
        if let Some(hello) = &mut self.hello {
            let Some(at) = self.read.windows(4).position(|w| w == b"\r\n\r\n") else {
                if self.read.len() > MAX_UNREAD {
                    bail!("an upgrade's answer past {MAX_UNREAD} bytes");
                }
                return Ok(None);
            };
            let head_end = at + 4;
            let status = String::from_utf8_lossy(&self.read[..head_end]);
            if !status.starts_with("HTTP/1.1 101") {
                bail!(
                    "the upgrade was answered {}",
                    status.lines().next().unwrap_or("")
                );
            }
            self.read.drain(..head_end);
            self.out.append(hello);
            self.hello = None;
        }
        while let Some((opcode, payload, next)) = frame_at(&self.read) {
            if opcode == OP_TEXT {
                let text = std::str::from_utf8(&self.read[payload]).context("ready: not UTF-8")?;
                let g: Glance =
                    serde_json::from_str(text).with_context(|| format!("before ready: {text}"))?;
                match g.kind.as_ref() {
                    "ready" => {
                        let channels = g
                            .channels
                            .unwrap_or_default()
                            .iter()
                            .map(|c| Ok((id("channels.id", Some(&c.id))?, c.last_seq)))
                            .collect::<anyhow::Result<_>>()?;
                        self.read.drain(..next);
                        return Ok(Some(Opened {
                            rest: std::mem::take(&mut self.read),
                            channels,
                        }));
                    }
                    "error" => {
                        let e = g.error.context("an error without its error")?;
                        bail!("refused: {}: {}", e.code, e.message);
                    }
                    other => bail!("before ready: a {other} frame"),
                }
            }
            if opcode == OP_CLOSE {
                bail!("closed before ready");
            }
            self.read.drain(..next);
        }
        if self.read.len() > MAX_UNREAD {
            bail!("a frame before ready past {MAX_UNREAD} bytes");
        }
        Ok(None)
    }

    /// What is being waited for, for an error's context.
    fn doing(&self) -> &'static str {
        if self.hello.is_some() {
            "the upgrade"
        } else if !self.out.is_empty() {
            "the hello"
        } else {
            "ready"
        }
    }

    /// Goes on over a non-blocking socket that is ready (registered edge-triggered for
    /// both directions): writes what it takes, reads all it has. `Some` once `ready`
    /// came; an error if the connection failed or ended first.
    fn drive(&mut self, socket: &mut TcpStream) -> anyhow::Result<Option<Opened>> {
        if let Some(e) = socket.take_error().context("connect")? {
            return Err(anyhow::Error::new(e).context("connect"));
        }
        loop {
            write_available(socket, &mut self.out)
                .map_err(|e| anyhow::Error::new(e).context(self.doing()))?;
            // The connection's end, or its failure, is looked at after what came before
            // it: `ready` and a close right behind it (the server's `RESTARTING`, a slow
            // consumer's replay), or an error frame, read in one turn.
            let ended = match read_available(socket, &mut self.read) {
                Ok(false) => None,
                Ok(true) => Some(anyhow::anyhow!("the server closed before {}", self.doing())),
                Err(e) => Some(anyhow::Error::new(e).context(self.doing())),
            };
            let queued = self.out.len();
            if let Some(opened) = self.advance()? {
                // The end, if it came, shows again to the member's reads once the socket
                // is registered as the member's.
                return Ok(Some(opened));
            }
            if let Some(e) = ended {
                return Err(e);
            }
            // The hello came due: write it now (the socket's writable edge has passed).
            if self.out.len() == queued {
                return Ok(None);
            }
        }
    }
}

/// Opens `/v1/ws` on a blocking socket, says hello (resuming `resume`) and reads up to
/// `ready`: the socket (now non-blocking) and what the opening ended with.
fn handshake(spec: &Spec, resume: &HashMap<i64, i64>) -> anyhow::Result<(StdStream, Opened)> {
    let mut s = StdStream::connect_timeout(&spec.addr, HANDSHAKE).context("connect")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HANDSHAKE))?;
    s.set_write_timeout(Some(HANDSHAKE))?;
    let mut opening = Opening::new(spec, resume);
    let mut buf = [0u8; 4096];
    loop {
        if !opening.out.is_empty() {
            s.write_all(&opening.out).context(opening.doing())?;
            opening.out.clear();
        }
        if let Some(opened) = opening.advance()? {
            s.set_nonblocking(true)?;
            return Ok((s, opened));
        }
        if !opening.out.is_empty() {
            continue;
        }
        let n = s
            .read(&mut buf)
            .with_context(|| format!("read up to {}", opening.doing()))?;
        if n == 0 {
            bail!("the server closed before {}", opening.doing());
        }
        opening.read.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's frame (unmasked) of `payload`.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let (head, used) = head_of(0x80 | opcode, 0, payload.len());
        [&head[..usize::from(used)], payload].concat()
    }

    /// A server in this process, on a runtime of its own (pings every 50 ms, an idle
    /// timeout of 400 ms): alice, who sends, and members in one channel with her.
    struct Server {
        rt: tokio::runtime::Runtime,
        addr: SocketAddr,
        alice: crate::client::Api,
        channel: i64,
        tokens: Vec<String>,
        stop: Option<oneshot::Sender<()>>,
        server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
        _dir: tempfile::TempDir,
    }

    impl Server {
        fn start(members: &[&str]) -> Self {
            use crate::client::Api;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut config = crate::Config::with_data_dir(dir.path());
            config.hash_cost = crate::auth::HashCost::insecure_fast();
            config.limits.lift_per_user();
            config.gateway.ping_interval = Duration::from_millis(50);
            config.gateway.idle_timeout = Duration::from_millis(400);
            let (stop, stopped) = oneshot::channel::<()>();
            let (addr, alice, tokens, channel, server) = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let server = tokio::spawn(crate::serve(listener, config, async move {
                    let _ = stopped.await;
                }));
                let base = format!("http://{addr}");
                let mut alice = Api::new(&base);
                alice.register("alice", "a-password-1").await.unwrap();
                let (mut ids, mut tokens) = (Vec::new(), Vec::new());
                for name in members {
                    let mut m = Api::new(&base);
                    ids.push(m.register(name, "m-password-1").await.unwrap());
                    tokens.push(m.token().unwrap().to_owned());
                }
                let channel = alice.create_channel("room", "group", &ids).await.unwrap();
                (addr, alice, tokens, channel, server)
            });
            Self {
                rt,
                addr,
                alice,
                channel,
                tokens,
                stop: Some(stop),
                server: Some(server),
                _dir: dir,
            }
        }

        /// Member `i`'s spec.
        fn spec(&self, i: usize, who: &str) -> Spec {
            Spec {
                addr: self.addr,
                host: self.addr.to_string(),
                path: "/v1/ws".into(),
                token: self.tokens[i].clone(),
                who: who.into(),
            }
        }

        /// Alice sends `t<i> m` for each `i` in `from..to`.
        fn send(&self, from: u32, to: u32) {
            self.rt.block_on(async {
                for i in from..to {
                    self.alice
                        .send(self.channel, &format!("t{i} m"), None)
                        .await
                        .unwrap();
                }
            });
        }

        fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            let server = self.server.take().unwrap();
            self.rt.block_on(server).unwrap().unwrap();
        }
    }

    /// A thread's loop in small: members on one poll, driven (their readiness and their
    /// turns) until `until` holds and `at_least` has passed, or a bounded time.
    struct Driver {
        turns: Turns,
        events: Events,
        _controller: watch::Sender<Control>,
    }

    impl Driver {
        fn new() -> Self {
            let (controller, control) = watch::channel(Control::Running);
            Self {
                turns: Turns {
                    poll: Poll::new().unwrap(),
                    start: Instant::now(),
                    control,
                    tallies: Tallies::new(),
                },
                events: Events::with_capacity(16),
                _controller: controller,
            }
        }

        fn connect(&self, spec: Spec, i: usize) -> Member {
            Member::connect(spec, &self.turns, Token(i)).unwrap()
        }

        fn drive(
            &mut self,
            ms: &mut [Member],
            until: &dyn Fn(&[Member]) -> bool,
            at_least: Duration,
        ) {
            let begun = Instant::now();
            while !(until(ms) && begun.elapsed() >= at_least) {
                assert!(begun.elapsed() < Duration::from_secs(20), "timed out");
                self.turns.poll.poll(&mut self.events, Some(TURN)).unwrap();
                for event in self.events.iter() {
                    let i = event.token().0;
                    ms[i].ready(&self.turns, Token(i)).unwrap();
                    // Nothing whole is left for a readiness that may never come (the
                    // events a resume's `ready` brought with it, say).
                    assert!(frame_at(&ms[i].read).is_none(), "a whole frame left unread");
                }
                for (i, m) in ms.iter_mut().enumerate() {
                    m.tick(&self.turns, Token(i), Instant::now()).unwrap();
                }
            }
        }
    }

    /// Member `i` has seen `channel` through `seq`.
    fn at(i: usize, channel: i64, seq: i64) -> impl Fn(&[Member]) -> bool {
        move |ms: &[Member]| ms[i].checker.position(channel) >= Some(seq)
    }

    /// A member against a real server answers the server's pings (with pings every
    /// 50 ms and an idle timeout of 400 ms, a member that did not would be dropped), and
    /// a member whose connection is lost without a close frame counts the drop, connects
    /// again resuming from what it saw, and gets what was sent meanwhile: every event
    /// once, in order.
    #[test]
    fn a_member_answers_pings_and_resumes_after_a_lost_connection() {
        let server = Server::start(&["bob"]);
        let channel = server.channel;
        let mut d = Driver::new();
        let mut ms = vec![d.connect(server.spec(0, "bob"), 0)];
        server.send(0, 3);
        // Three messages, then a second of pings.
        d.drive(&mut ms, &at(0, channel, 3), Duration::from_secs(1));
        assert!(
            ms[0].share.drops.is_empty(),
            "dropped: {:?}",
            ms[0].share.drops
        );
        assert_eq!(ms[0].share.deliveries, 3);
        // The network goes: no close frame, the socket ends under the member. (Eight
        // times: the events replayed after a resume's `ready` come in the same read as
        // `ready` in about two resumes of five, and must be read then.)
        const DROPS: u32 = 8;
        for k in 0..DROPS {
            ms[0].socket.shutdown(std::net::Shutdown::Both).unwrap();
            server.send(3 + 3 * k, 6 + 3 * k);
            d.drive(
                &mut ms,
                &at(0, channel, i64::from(6 + 3 * k)),
                Duration::ZERO,
            );
        }
        let m = &mut ms[0];
        assert_eq!(
            m.share.drops,
            BTreeMap::from([("no close frame".to_owned(), u64::from(DROPS))])
        );
        let last = i64::from(3 + 3 * DROPS);
        assert_eq!(
            m.share.deliveries, last as u64,
            "those sent meanwhile, once each"
        );
        let violations = std::mem::take(&mut m.checker).finish(&HashMap::from([(channel, last)]));
        assert_eq!(violations, crate::bench::check::Violations::default());
        server.stop();
    }

    /// A member connecting again holds up no other member of its thread: while its
    /// attempts are refused, and then while one hangs unanswered, the other reads every
    /// event as it comes. Once the server answers, the first resumes and gets what was
    /// sent meanwhile, once each, in order.
    #[test]
    fn a_member_connecting_again_holds_up_no_other_member() {
        let server = Server::start(&["bob", "carol"]);
        let channel = server.channel;
        let mut d = Driver::new();
        let mut ms = vec![
            d.connect(server.spec(0, "bob"), 0),
            d.connect(server.spec(1, "carol"), 1),
        ];
        // Bob's next attempts go where nothing listens.
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        ms[0].spec.addr = refused;
        ms[0].socket.shutdown(std::net::Shutdown::Both).unwrap();
        server.send(0, 3);
        let failed =
            |n: u32| move |ms: &[Member]| ms[0].resuming.as_ref().is_some_and(|r| r.failed >= n);
        d.drive(
            &mut ms,
            &|ms: &[Member]| at(1, channel, 3)(ms) && failed(2)(ms),
            Duration::ZERO,
        );
        assert_eq!(ms[1].share.deliveries, 3, "carol read on");
        assert!(ms[0].resuming.is_some(), "bob is still connecting");
        // Then where a listener takes the connection and never answers.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let hung_at = hung.local_addr().unwrap();
        ms[0].spec.addr = hung_at;
        let hanging = move |ms: &[Member]| {
            ms[0].resuming.as_ref().is_some_and(|r| {
                r.attempt
                    .as_ref()
                    .is_some_and(|(s, _)| s.peer_addr().ok() == Some(hung_at))
            })
        };
        d.drive(&mut ms, &hanging, Duration::ZERO);
        let failed_before = ms[0].resuming.as_ref().unwrap().failed;
        server.send(3, 6);
        d.drive(&mut ms, &at(1, channel, 6), Duration::from_millis(300));
        assert!(hanging(&ms), "bob's attempt still waits for its answer");
        assert_eq!(
            ms[0].resuming.as_ref().unwrap().failed,
            failed_before,
            "the same attempt all along"
        );
        assert_eq!(ms[1].share.deliveries, 6, "carol read on");
        // The attempt times out (brought forward); the next reaches the server.
        ms[0].spec.addr = server.addr;
        ms[0].resuming.as_mut().unwrap().at = Instant::now();
        d.drive(&mut ms, &at(0, channel, 6), Duration::ZERO);
        assert!(ms[0].resuming.is_none());
        assert_eq!(
            ms[0].share.drops,
            BTreeMap::from([("no close frame".to_owned(), 1)])
        );
        for m in &mut ms {
            assert_eq!(m.share.deliveries, 6, "{}: each once", m.spec.who);
            let violations = std::mem::take(&mut m.checker).finish(&HashMap::from([(channel, 6)]));
            assert_eq!(violations, crate::bench::check::Violations::default());
        }
        drop(hung);
        server.stop();
    }

    /// Drives an opening over a real socket whose server side writes `answer` (after
    /// the request came) and closes: what the opening ended with.
    fn open_against(answer: &[u8]) -> anyhow::Result<Option<Opened>> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = Spec {
            addr,
            host: addr.to_string(),
            path: "/v1/ws".into(),
            token: "a-token".into(),
            who: "m".into(),
        };
        let mut socket = TcpStream::connect(addr).unwrap();
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(
                &mut socket,
                Token(0),
                Interest::READABLE | Interest::WRITABLE,
            )
            .unwrap();
        let mut opening = Opening::new(&spec, &HashMap::new());
        let (mut server, _) = listener.accept().unwrap();
        let mut events = Events::with_capacity(4);
        // The request goes out.
        let begun = Instant::now();
        while !opening.out.is_empty() {
            assert!(begun.elapsed() < Duration::from_secs(10), "timed out");
            poll.poll(&mut events, Some(TURN)).unwrap();
            assert!(opening.drive(&mut socket).unwrap().is_none());
        }
        let mut request = [0u8; 1024];
        assert!(server.read(&mut request).unwrap() > 0);
        // The whole answer and the end arrive before the opening's next turn.
        server.write_all(answer).unwrap();
        drop(server);
        std::thread::sleep(Duration::from_millis(50));
        opening.drive(&mut socket)
    }

    /// An opening that read `ready` and the connection's end in one turn opens (the end
    /// is then the member's to read: a drop, resumed), and one that read an error frame
    /// and the end fails with the error, not as a close before `ready`.
    #[test]
    fn an_opening_looks_at_what_it_read_before_the_end_that_came_with_it() {
        let upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let ready = server_frame(
            OP_TEXT,
            br#"{"type":"ready","channels":[{"id":"7","last_seq":4}]}"#,
        );
        let event = server_frame(
            OP_TEXT,
            br#"{"type":"message.created","channel_id":"7","seq":5}"#,
        );
        let close = server_frame(OP_CLOSE, &1012u16.to_be_bytes());
        let opened = open_against(&[&upgrade[..], &ready, &event, &close].concat())
            .unwrap()
            .expect("ready came");
        assert_eq!(opened.channels, vec![(7, 4)]);
        assert_eq!(
            opened.rest,
            [event, close].concat(),
            "the rest is the member's"
        );
        let refused = server_frame(
            OP_TEXT,
            br#"{"type":"error","error":{"code":"unauthorized","message":"bad token"}}"#,
        );
        let e = open_against(&[&upgrade[..], &refused].concat())
            .err()
            .expect("refused");
        assert!(
            format!("{e:#}").contains("refused: unauthorized: bad token"),
            "{e:#}"
        );
    }

    #[test]
    fn frames_are_found_whole_in_each_length_form_and_not_before() {
        for len in [0, 5, 125, 126, 300, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; len];
            let mut buf = server_frame(OP_TEXT, &payload);
            let whole = buf.len();
            buf.extend_from_slice(&server_frame(OP_PING, b"p"));
            let (op, at, next) = frame_at(&buf).unwrap();
            assert_eq!((op, at.len(), next), (OP_TEXT, len, whole), "{len}");
            assert_eq!(&buf[at], &payload[..]);
            assert_eq!(frame_at(&buf[next..]).unwrap().0, OP_PING);
            // A length no buffer holds is never whole (and does not overflow).
            let mut huge = vec![0x81, 127];
            huge.extend_from_slice(&u64::MAX.to_be_bytes());
            assert!(frame_at(&huge).is_none());
            for cut in [1, 2, whole - 1] {
                if cut < whole {
                    assert!(frame_at(&buf[..cut]).is_none(), "{len} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn a_masked_frame_unmasks_to_its_payload() {
        for len in [0usize, 3, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = masked(OP_PONG, &payload);
            assert_eq!(f[0], 0x80 | OP_PONG);
            assert_eq!(f[1] & 0x80, 0x80, "masked");
            let head = match f[1] & 0x7f {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            let key = &f[head..head + 4];
            let got: Vec<u8> = f[head + 4..]
                .iter()
                .zip(key.iter().cycle())
                .map(|(b, k)| b ^ k)
                .collect();
            assert_eq!(got, payload);
        }
    }

    #[test]
    fn the_server_frames_a_member_reads_are_read_as_the_client_library_reads_them() {
        use crate::wire::protocol;
        let message = crate::model::Message {
            id: 9,
            channel_id: 5,
            seq: 3,
            author_id: 2,
            text: "t12345 padding \"quoted\" \u{e9}".into(),
            ..crate::model::Message::default()
        };
        let created = protocol::event(&crate::model::Event {
            channel_id: 5,
            seq: 3,
            at: 0,
            body: crate::model::EventBody::MessageCreated(message),
        });
        assert_eq!(
            glance(&created).unwrap(),
            Some(Glimpse::Event {
                channel: 5,
                seq: 3,
                created: true,
                sent: Some(12345)
            })
        );
        let parsed = crate::client::parse_frame(&created).unwrap();
        assert!(
            matches!(parsed, crate::client::Frame::Event(e) if e.seq == 3 && e.channel_id == 5)
        );
        assert_eq!(glance(r#"{"type":"pong"}"#).unwrap(), None);
        assert_eq!(
            glance(r#"{"type":"channel.joined","channel":{"id":"7","last_seq":4,"name":"x"}}"#)
                .unwrap(),
            Some(Glimpse::Joined {
                channel: 7,
                last: 4
            })
        );
        assert_eq!(
            glance(r#"{"type":"member.added","channel_id":"7","seq":5,"user_id":"2"}"#).unwrap(),
            Some(Glimpse::Event {
                channel: 7,
                seq: 5,
                created: false,
                sent: None
            })
        );
        assert!(glance("not json").is_err());
    }
}
