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

/// How long a handshake may take, and a blocking write of a handshake.
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
                let mut load = Load {
                    poll: match Poll::new() {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = connected.send(Err(e.into()));
                            return;
                        }
                    },
                    members: Vec::with_capacity(mine.len()),
                    start,
                    control,
                    shares,
                    tallies,
                    progress,
                };
                for (spec, outcome) in mine {
                    let token = Token(load.members.len());
                    match Member::connect(spec, &load.poll, token, start, &load.tallies) {
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

/// One thread's members, driven until the controller says finish.
struct Load {
    poll: Poll,
    members: Vec<(Member, Option<oneshot::Sender<anyhow::Result<Seen>>>)>,
    start: Instant,
    control: watch::Receiver<Control>,
    shares: mpsc::UnboundedSender<Share>,
    tallies: Arc<Tallies>,
    progress: Arc<Progress>,
}

impl Load {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut now_control = self.control.borrow_and_update().clone();
        let mut last_expected: Arc<HashMap<i64, i64>> = Arc::default();
        let mut looked = Instant::now();
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(TURN))
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
                let taken = member.take(
                    &self.poll,
                    Token(i),
                    self.start,
                    &self.tallies,
                    &self.control,
                );
                delivered += member.share.deliveries - before;
                if let Err(e) = taken
                    && let Some(o) = outcome.take()
                {
                    // Read no more: the rig fails the phase with the error.
                    let _ = self.poll.registry().deregister(&mut member.socket);
                    let _ = member.socket.shutdown(std::net::Shutdown::Both);
                    let _ = o.send(Err(e));
                }
            }
            if delivered > 0 {
                self.progress
                    .delivered
                    .fetch_add(delivered, Ordering::Relaxed);
            }
            // (The rig gone: finish.)
            let Ok(changed) = self.control.has_changed() else {
                break;
            };
            if changed {
                now_control = self.control.borrow_and_update().clone();
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
            if let Some(o) = outcome.take() {
                m.close();
                let violations = std::mem::take(&mut m.checker).finish(&last_expected);
                let _ = o.send(Ok(Seen { violations }));
            }
        }
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
}

impl Member {
    fn connect(
        spec: Spec,
        poll: &Poll,
        token: Token,
        start: Instant,
        tallies: &Tallies,
    ) -> anyhow::Result<Self> {
        let (stream, read, ready) =
            handshake(&spec, &HashMap::new()).with_context(|| format!("connect {}", spec.who))?;
        let mut checker = Checker::new(spec.who.clone());
        let mut channels = Vec::with_capacity(ready.len());
        for &(c, last) in &ready {
            checker.start(c, last);
            channels.push(c);
        }
        let mut socket = TcpStream::from_std(stream);
        poll.registry()
            .register(&mut socket, token, Interest::READABLE)
            .context("register a member")?;
        let mut m = Self {
            spec,
            socket,
            read,
            write: Vec::new(),
            channels,
            checker,
            share: Share::new(),
            phase: 0,
            deadline: None,
        };
        // Frames that came with `ready`.
        m.parse(start, tallies, 0)?;
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

    /// Reads what the socket has and handles every whole frame in it. A drop is counted
    /// and followed by a resume; an error only if the member cannot go on.
    fn take(
        &mut self,
        poll: &Poll,
        token: Token,
        start: Instant,
        tallies: &Tallies,
        control: &watch::Receiver<Control>,
    ) -> anyhow::Result<()> {
        self.flush();
        let mut closed = false;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.socket.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.read.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut ended = match self.parse(start, tallies, self.phase)? {
            None if !closed => return Ok(()),
            code => code,
        };
        loop {
            self.resume(poll, token, ended, control)?;
            // What came with the new `ready` (the events replayed after it, often) is
            // in the buffer already: no readiness will report it.
            ended = match self.parse(start, tallies, self.phase)? {
                None => return Ok(()),
                code => code,
            };
        }
    }

    /// Handles the whole frames read; a close frame's code if one came.
    fn parse(
        &mut self,
        start: Instant,
        tallies: &Tallies,
        phase: u32,
    ) -> anyhow::Result<Option<u16>> {
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
                                count_delivery(tallies, start, phase, now, sent);
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

    /// Counts the drop and connects again, resuming from what the checker saw.
    /// Blocking: the thread's other members wait (a handshake takes a millisecond or two
    /// while the server is up; up to [`ATTEMPTS`] × [`RETRY`] while it is not), and it
    /// gives up at once when the rig is gone or finishing.
    fn resume(
        &mut self,
        poll: &Poll,
        token: Token,
        code: Option<u16>,
        control: &watch::Receiver<Control>,
    ) -> anyhow::Result<()> {
        let code = code.map_or_else(|| "no close frame".to_owned(), |c| c.to_string());
        *self.share.drops.entry(code).or_default() += 1;
        let _ = poll.registry().deregister(&mut self.socket);
        let resume: HashMap<i64, i64> = self
            .channels
            .iter()
            .filter_map(|&c| Some((c, self.checker.position(c)?)))
            .collect();
        let mut attempt = 0;
        let (stream, read, ready) = loop {
            match handshake(&self.spec, &resume) {
                Ok(done) => break done,
                Err(e)
                    if attempt + 1 >= ATTEMPTS
                        || control.has_changed().is_err()
                        || matches!(*control.borrow(), Control::Finish) =>
                {
                    return Err(e.context(format!("{}: resume", self.spec.who)));
                }
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(RETRY);
                }
            }
        };
        for &(c, last) in &ready {
            if self.checker.position(c).is_none() {
                self.checker.start(c, last);
                self.channels.push(c);
            }
        }
        self.socket = TcpStream::from_std(stream);
        self.read = read;
        self.write.clear();
        poll.registry()
            .register(&mut self.socket, token, Interest::READABLE)
            .context("register a member again")?;
        Ok(())
    }

    /// Writes what is waiting (a pong); what the socket does not take waits for the next
    /// read of this member (the server pings every few seconds, and waits longer).
    fn flush(&mut self) {
        while !self.write.is_empty() {
            match self.socket.write(&self.write) {
                Ok(n) => {
                    self.write.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The read side sees the end.
                Err(_) => {
                    self.write.clear();
                    break;
                }
            }
        }
    }

    /// Says goodbye with a close frame (not waited for).
    fn close(&mut self) {
        let _ = self.socket.write(&masked(OP_CLOSE, &1000u16.to_be_bytes()));
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

/// Opens `/v1/ws` on a blocking socket, says hello (resuming `resume`) and reads up to
/// `ready`: the socket (now non-blocking), what was read past `ready`, and `ready`'s
/// channels with their last seqs.
#[allow(clippy::type_complexity)]
fn handshake(
    spec: &Spec,
    resume: &HashMap<i64, i64>,
) -> anyhow::Result<(StdStream, Vec<u8>, Vec<(i64, i64)>)> {
    let mut s = StdStream::connect_timeout(&spec.addr, HANDSHAKE).context("connect")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HANDSHAKE))?;
    s.set_write_timeout(Some(HANDSHAKE))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        spec.path, spec.host
    );
    s.write_all(request.as_bytes()).context("ask to upgrade")?;
    let mut read = Vec::with_capacity(4096);
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if read.len() > MAX_UNREAD {
            bail!("an upgrade's answer past {MAX_UNREAD} bytes");
        }
        let n = s.read(&mut buf).context("read the upgrade's answer")?;
        if n == 0 {
            bail!("the server closed before answering the upgrade");
        }
        read.extend_from_slice(&buf[..n]);
    };
    let status = String::from_utf8_lossy(&read[..head_end.min(read.len())]);
    if !status.starts_with("HTTP/1.1 101") {
        bail!(
            "the upgrade was answered {}",
            status.lines().next().unwrap_or("")
        );
    }
    read.drain(..head_end);
    let resume: BTreeMap<String, i64> = resume.iter().map(|(c, s)| (c.to_string(), *s)).collect();
    let hello = serde_json::json!({"op": "hello", "token": spec.token, "resume": resume});
    s.write_all(&masked(OP_TEXT, hello.to_string().as_bytes()))
        .context("say hello")?;
    loop {
        if let Some((opcode, payload, next)) = frame_at(&read) {
            if opcode == OP_TEXT {
                let text = std::str::from_utf8(&read[payload]).context("ready: not UTF-8")?;
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
                        read.drain(..next);
                        s.set_nonblocking(true)?;
                        return Ok((s, read, channels));
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
            read.drain(..next);
            continue;
        }
        if read.len() > MAX_UNREAD {
            bail!("a frame before ready past {MAX_UNREAD} bytes");
        }
        let n = s.read(&mut buf).context("read up to ready")?;
        if n == 0 {
            bail!("the server closed before ready");
        }
        read.extend_from_slice(&buf[..n]);
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

    /// A member against a real server (in this process, on a runtime of its own): it
    /// answers the server's pings (with pings every 50 ms and an idle timeout of 400 ms,
    /// a member that did not would be dropped), and a member whose connection is lost
    /// without a close frame counts the drop, connects again resuming from what it saw,
    /// and gets what was sent meanwhile: every event once, in order.
    #[test]
    fn a_member_answers_pings_and_resumes_after_a_lost_connection() {
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
        let (addr, a, b_token, channel, server) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(crate::serve(listener, config, async move {
                let _ = stopped.await;
            }));
            let base = format!("http://{addr}");
            let mut a = Api::new(&base);
            a.register("alice", "a-password-1").await.unwrap();
            let mut b = Api::new(&base);
            let b_id = b.register("bob", "b-password-1").await.unwrap();
            let channel = a.create_channel("room", "group", &[b_id]).await.unwrap();
            (addr, a, b.token().unwrap().to_owned(), channel, server)
        });
        let send = |from: u32, to: u32| {
            rt.block_on(async {
                for i in from..to {
                    a.send(channel, &format!("t{i} m"), None).await.unwrap();
                }
            });
        };
        let spec = Spec {
            addr,
            host: addr.to_string(),
            path: "/v1/ws".into(),
            token: b_token,
            who: "bob".into(),
        };
        let mut poll = Poll::new().unwrap();
        let tallies = Tallies::new();
        let (_controller, control) = watch::channel(Control::Running);
        let start = Instant::now();
        let mut m = Member::connect(spec, &poll, Token(0), start, &tallies).unwrap();
        let mut events = Events::with_capacity(16);
        // Reads until `until` holds, or a bounded time passes.
        let mut drive = |m: &mut Member, until: &dyn Fn(&Member) -> bool, at_least: Duration| {
            let begun = Instant::now();
            while !(until(m) && begun.elapsed() >= at_least) {
                assert!(begun.elapsed() < Duration::from_secs(20), "timed out");
                poll.poll(&mut events, Some(TURN)).unwrap();
                if !events.is_empty() {
                    m.take(&poll, Token(0), start, &tallies, &control).unwrap();
                    // Nothing whole is left for a readiness that may never come (the
                    // events a resume's `ready` brought with it, say).
                    assert!(frame_at(&m.read).is_none(), "a whole frame left unread");
                }
            }
        };
        let at = |seq: i64| move |m: &Member| m.checker.position(channel) >= Some(seq);
        send(0, 3);
        // Three messages, then a second of pings.
        drive(&mut m, &at(3), Duration::from_secs(1));
        assert!(m.share.drops.is_empty(), "dropped: {:?}", m.share.drops);
        assert_eq!(m.share.deliveries, 3);
        // The network goes: no close frame, the socket ends under the member. (Eight
        // times: the events replayed after a resume's `ready` come in the same read as
        // `ready` in about two resumes of five, and must be read then.)
        const DROPS: u32 = 8;
        for k in 0..DROPS {
            m.socket.shutdown(std::net::Shutdown::Both).unwrap();
            send(3 + 3 * k, 6 + 3 * k);
            drive(&mut m, &at(i64::from(6 + 3 * k)), Duration::ZERO);
        }
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
        let _ = stop.send(());
        rt.block_on(server).unwrap().unwrap();
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
