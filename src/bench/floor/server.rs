//! The floor's server: one epoll loop over plain TCP. Each round it reads what came,
//! numbers each record in its channel, appends the round to a preallocated log in one
//! write and `fdatasync`s it once, then writes each record's ack to its sender and the
//! record to every member of its channel, one write per socket.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;

use anyhow::Context;
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::{ACK_BYTES, HELLO_BYTES, Role, SEQ, channel_of};

const LISTENER: Token = Token(usize::MAX);
const STOP: Token = Token(usize::MAX - 1);
const WAKE: Token = Token(usize::MAX - 2);
/// A round writing to more sockets than this splits them over two threads (if asked to).
const SPLIT_AT: usize = 64;

/// How the server runs.
pub struct Setup {
    pub record_bytes: usize,
    /// The log's size: written through once, then overwritten from the start (a reused
    /// WAL), so no round's `fdatasync` has a file size to record.
    pub log_bytes: u64,
    pub send_threads: usize,
    pub sync: bool,
    /// Commit on a thread of its own, as Natter's writer does: the loop hands it a round
    /// and is woken with it committed, taking the next round meanwhile (a group commit).
    pub writer_thread: bool,
}

struct Conn {
    socket: TcpStream,
    read: Vec<u8>,
    write: Vec<u8>,
    role: Option<Role>,
    /// Registered for writable: a write left bytes behind.
    waiting: bool,
}

/// The preallocated log, written round after round and wrapping at its end.
struct Log {
    file: File,
    bytes: u64,
    /// Where the next round goes.
    offset: u64,
    sync: bool,
}

/// Where rounds are committed.
enum Committer {
    /// On the loop's thread.
    Inline(Log),
    /// On a thread of its own, one round at a time.
    Thread {
        rounds: mpsc::Sender<Vec<u8>>,
        committed: mpsc::Receiver<anyhow::Result<Vec<u8>>>,
        /// The senders of the round being committed.
        in_flight: Option<Vec<usize>>,
    },
}

struct Floor<'a> {
    setup: &'a Setup,
    poll: Poll,
    committer: Committer,
    conns: Vec<Conn>,
    members: HashMap<u32, Vec<usize>>,
    last_seq: HashMap<u32, u64>,
    /// The round's records, back to back as they go to the log, and whose each is.
    round: Vec<u8>,
    senders: Vec<usize>,
    touched: Vec<usize>,
}

/// Serves on `listener` until `stop` is readable or closed (the child's stdin, whose
/// other end its parent holds).
pub fn serve(
    listener: std::net::TcpListener,
    log: &Path,
    setup: &Setup,
    stop: BorrowedFd<'_>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let poll = Poll::new().context("create the poll")?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .context("register the listener")?;
    poll.registry()
        .register(&mut SourceFd(&stop.as_raw_fd()), STOP, Interest::READABLE)
        .context("register the stop handle")?;
    let log = Log {
        file: preallocate(log, setup.log_bytes)?,
        bytes: setup.log_bytes,
        offset: 0,
        sync: setup.sync,
    };
    let committer = if setup.writer_thread {
        let waker = Waker::new(poll.registry(), WAKE).context("create the waker")?;
        Committer::spawn(log, waker)
    } else {
        Committer::Inline(log)
    };
    let mut floor = Floor {
        setup,
        poll,
        committer,
        conns: Vec::new(),
        members: HashMap::new(),
        last_seq: HashMap::new(),
        round: Vec::new(),
        senders: Vec::new(),
        touched: Vec::new(),
    };
    let mut events = Events::with_capacity(4096);
    loop {
        floor.poll.poll(&mut events, None).context("poll")?;
        let mut woken = false;
        for event in events.iter() {
            match event.token() {
                LISTENER => floor.accept(&listener)?,
                STOP => return Ok(()),
                WAKE => woken = true,
                Token(i) => {
                    if event.is_writable() {
                        floor.write_waiting(i)?;
                    }
                    if event.is_readable() {
                        floor.read(i)?;
                    }
                }
            }
        }
        floor.round_done(woken)?;
    }
}

/// Gives each record of a round the next seq of its channel.
fn number(last_seq: &mut HashMap<u32, u64>, round: &mut [u8], record_bytes: usize) {
    for record in round.chunks_exact_mut(record_bytes) {
        let seq = last_seq.entry(channel_of(record)).or_default();
        *seq += 1;
        record[SEQ].copy_from_slice(&seq.to_le_bytes());
    }
}

impl Log {
    /// Puts a round on disk: one write (two where the log wraps) and one `fdatasync`.
    fn append(&mut self, round: &[u8]) -> anyhow::Result<()> {
        let mut rest = round;
        while !rest.is_empty() {
            let room = (self.bytes - self.offset) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.file
                .write_all_at(now, self.offset)
                .context("write the log")?;
            self.offset = (self.offset + now.len() as u64) % self.bytes;
            rest = later;
        }
        if self.sync {
            self.file.sync_data().context("fdatasync the log")?;
        }
        Ok(())
    }
}

impl Committer {
    /// A writer thread that commits each round it is handed, hands it back and wakes the
    /// loop; it ends when the loop drops its side.
    fn spawn(mut log: Log, waker: Waker) -> Self {
        let (rounds, to_commit) = mpsc::channel::<Vec<u8>>();
        let (done, committed) = mpsc::channel();
        std::thread::spawn(move || {
            for round in to_commit {
                let outcome = log.append(&round).map(|()| round);
                if done.send(outcome).is_err() || waker.wake().is_err() {
                    return;
                }
            }
        });
        Committer::Thread {
            rounds,
            committed,
            in_flight: None,
        }
    }
}

/// A log of `bytes` written through and synced.
fn preallocate(path: &Path, bytes: u64) -> anyhow::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < bytes {
        let n = chunk.len().min((bytes - at) as usize);
        file.write_all_at(&chunk[..n], at)
            .context("preallocate the log")?;
        at += n as u64;
    }
    file.sync_all().context("sync the new log")?;
    Ok(file)
}

impl Floor<'_> {
    fn accept(&mut self, listener: &TcpListener) -> anyhow::Result<()> {
        loop {
            let (mut socket, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e).context("accept a connection"),
            };
            socket.set_nodelay(true)?;
            let token = Token(self.conns.len());
            self.poll
                .registry()
                .register(&mut socket, token, Interest::READABLE)
                .context("register a connection")?;
            self.conns.push(Conn {
                socket,
                read: Vec::new(),
                write: Vec::new(),
                role: None,
                waiting: false,
            });
        }
    }

    /// Takes what connection `i` sent: its hello (its role, answered with one byte once
    /// registered), then its whole records into the round.
    fn read(&mut self, i: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[i];
        read_all(&mut conn.socket, &mut conn.read);
        if conn.role.is_none() {
            if conn.read.len() < HELLO_BYTES {
                return Ok(());
            }
            let role =
                Role::parse(&conn.read[..HELLO_BYTES]).context("read a connection's hello")?;
            conn.read.drain(..HELLO_BYTES);
            if let Role::Member(channel) = role {
                self.members.entry(channel).or_default().push(i);
            }
            conn.role = Some(role);
            conn.write.push(b'k');
            self.touched.push(i);
        }
        let whole = conn.read.len() / self.setup.record_bytes * self.setup.record_bytes;
        self.round.extend_from_slice(&conn.read[..whole]);
        conn.read.drain(..whole);
        self.senders
            .resize(self.round.len() / self.setup.record_bytes, i);
        Ok(())
    }

    /// After a poll's events: commits the round read and fans it out (inline), or fans
    /// out the round the writer thread has committed (`woken`) and hands it the next.
    fn round_done(&mut self, woken: bool) -> anyhow::Result<()> {
        let mut round = std::mem::take(&mut self.round);
        let mut senders = std::mem::take(&mut self.senders);
        match &mut self.committer {
            Committer::Inline(log) => {
                if !round.is_empty() {
                    number(&mut self.last_seq, &mut round, self.setup.record_bytes);
                    log.append(&round)?;
                }
                self.fan_out(&round, &senders)?;
                round.clear();
                senders.clear();
                (self.round, self.senders) = (round, senders);
            }
            Committer::Thread {
                rounds,
                committed,
                in_flight,
            } => {
                let mut done = None;
                if woken {
                    let round = committed.recv().context("hear from the writer thread")??;
                    done = Some((round, in_flight.take().unwrap_or_default()));
                }
                if in_flight.is_none() && !round.is_empty() {
                    number(&mut self.last_seq, &mut round, self.setup.record_bytes);
                    *in_flight = Some(senders);
                    rounds
                        .send(round)
                        .context("hand a round to the writer thread")?;
                } else {
                    (self.round, self.senders) = (round, senders);
                }
                let (round, senders) = done.unwrap_or_default();
                self.fan_out(&round, &senders)?;
            }
        }
        Ok(())
    }

    /// Acks each of a committed round's records to its sender and writes it to every
    /// member of its channel (and any answers to hellos).
    fn fan_out(&mut self, round: &[u8], senders: &[usize]) -> anyhow::Result<()> {
        if round.is_empty() && self.touched.is_empty() {
            return Ok(());
        }
        let record_bytes = self.setup.record_bytes;
        for (&from, record) in senders.iter().zip(round.chunks_exact(record_bytes)) {
            self.conns[from]
                .write
                .extend_from_slice(&record[..ACK_BYTES]);
            self.touched.push(from);
            let members = self.members.get(&channel_of(record));
            for &m in members.map_or(&[][..], Vec::as_slice) {
                self.conns[m].write.extend_from_slice(record);
                self.touched.push(m);
            }
        }
        self.touched.sort_unstable();
        self.touched.dedup();
        write_out(&mut self.conns, &self.touched, self.setup.send_threads);
        for &i in &self.touched {
            let conn = &mut self.conns[i];
            if !conn.write.is_empty() && !conn.waiting {
                conn.waiting = true;
                self.poll
                    .registry()
                    .reregister(
                        &mut conn.socket,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .context("wait for a connection to take more")?;
            }
        }
        self.touched.clear();
        Ok(())
    }

    /// Connection `i` can take more of what a write left behind.
    fn write_waiting(&mut self, i: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[i];
        flush(&mut conn.socket, &mut conn.write);
        if conn.write.is_empty() && conn.waiting {
            conn.waiting = false;
            self.poll
                .registry()
                .reregister(&mut conn.socket, Token(i), Interest::READABLE)
                .context("stop waiting on a connection")?;
        }
        Ok(())
    }
}

/// Everything the socket has now (a closed or failed socket just stops giving).
fn read_all(socket: &mut TcpStream, into: &mut Vec<u8>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes every touched connection's bytes, on two threads when asked and worth it: the
/// second a scoped thread of that round (its start and join cost tens of microseconds, in
/// a round of more than [`SPLIT_AT`] writes of several microseconds each).
fn write_out(conns: &mut [Conn], touched: &[usize], threads: usize) {
    let out = |c: &mut Conn| flush(&mut c.socket, &mut c.write);
    if threads < 2 || touched.len() <= SPLIT_AT {
        touched.iter().for_each(|&i| out(&mut conns[i]));
        return;
    }
    let mid = touched[touched.len() / 2];
    let (low, high) = conns.split_at_mut(mid);
    let (first, second) = touched.split_at(touched.partition_point(|&i| i < mid));
    std::thread::scope(|s| {
        s.spawn(|| first.iter().for_each(|&i| out(&mut low[i])));
        second.iter().for_each(|&i| out(&mut high[i - mid]));
    });
}

/// Writes what the socket takes now; the rest waits for it to be writable.
fn flush(socket: &mut TcpStream, bytes: &mut Vec<u8>) {
    let mut done = 0;
    while done < bytes.len() {
        match socket.write(&bytes[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => {
                done = bytes.len();
                break;
            }
        }
    }
    bytes.drain(..done);
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsFd;
    use std::time::Duration;

    use super::super::{CHANNEL, Role, seq_of};
    use super::*;

    const RECORD: usize = 64 * 1024;
    const RECORDS: usize = 200;

    fn connect(addr: std::net::SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// A member with a small receive buffer that reads nothing while 12.5 MiB come for it
    /// (more than the kernel's buffers hold, so the server's writes to it block and wait
    /// for writable), a sender whose hello and records come in one write, a log that
    /// wraps forty times: every record acked, then delivered once, in order, numbered
    /// 1.., and the log never grows past its size; committed inline and on a writer
    /// thread.
    #[test]
    fn a_stalled_member_gets_every_record_in_order_and_the_log_stays_its_size() {
        for writer_thread in [false, true] {
            stalled_member(writer_thread);
        }
    }

    fn stalled_member(writer_thread: bool) {
        // Removed when dropped, a failed assertion's unwinding included.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_read, stop_write) = std::io::pipe().unwrap();
        let setup = Setup {
            record_bytes: RECORD,
            log_bytes: 320 * 1024,
            send_threads: 2,
            sync: true,
            writer_thread,
        };
        let server = {
            let log = log.clone();
            std::thread::spawn(move || serve(listener, &log, &setup, stop_read.as_fd()))
        };

        let mut member = connect(addr);
        let small: libc::c_int = 256 * 1024;
        // SAFETY: sets an int option on a socket this test owns, from a valid pointer.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&member),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const small).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        member.write_all(&Role::Member(7).hello()).unwrap();
        let mut k = [0u8; 1];
        member.read_exact(&mut k).unwrap();
        assert_eq!(&k, b"k");

        let mut sender = connect(addr);
        let mut bytes = Role::Sender.hello().to_vec();
        for i in 0..RECORDS {
            let mut record = vec![0u8; RECORD];
            record[..ACK_BYTES].copy_from_slice(&(i as u64).to_le_bytes());
            record[CHANNEL].copy_from_slice(&7u32.to_le_bytes());
            bytes.extend_from_slice(&record);
        }
        let writer = std::thread::spawn(move || {
            sender.write_all(&bytes).unwrap();
            let mut answers = vec![0u8; 1 + RECORDS * ACK_BYTES];
            sender.read_exact(&mut answers).unwrap();
            answers
        });
        let answers = writer.join().unwrap();
        assert_eq!(answers[0], b'k');
        for (i, ack) in answers[1..].chunks_exact(ACK_BYTES).enumerate() {
            assert_eq!(u64::from_le_bytes(ack.try_into().unwrap()), i as u64);
        }

        // Only now the member reads: everything it missed is still on its way.
        let mut got = vec![0u8; RECORDS * RECORD];
        member.read_exact(&mut got).unwrap();
        for (i, record) in got.chunks_exact(RECORD).enumerate() {
            assert_eq!(
                u64::from_le_bytes(record[..8].try_into().unwrap()),
                i as u64
            );
            assert_eq!(seq_of(record), i as u64 + 1);
        }
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 320 * 1024);

        drop(stop_write);
        server.join().unwrap().unwrap();
    }
}
