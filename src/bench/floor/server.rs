//! The floor's server: one epoll loop over plain TCP. Each round it reads what came,
//! appends the round's records to a preallocated log in one write and `fdatasync`s it
//! once, then writes each record's ack to its sender and the record to every member of
//! its channel, one write per socket.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context;
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use super::{ACK_BYTES, HELLO_BYTES, Role, SEQ};

/// The log's size: written through once, then overwritten from the start (a reused WAL).
const LOG_BYTES: u64 = 64 << 20;
const LISTENER: Token = Token(usize::MAX);
const STDIN: Token = Token(usize::MAX - 1);
/// A round writing to more sockets than this splits them over two threads (if asked to).
const SPLIT_AT: usize = 64;

struct Conn {
    socket: TcpStream,
    read: Vec<u8>,
    write: Vec<u8>,
    role: Option<Role>,
    /// Registered for writable: a write left bytes behind.
    waiting: bool,
}

/// How the server runs.
pub struct Setup {
    pub record_bytes: usize,
    pub send_threads: usize,
    pub sync: bool,
}

/// Serves until its stdin closes (the parent holds the other end), printing
/// `listening ADDR` on stdout once it accepts.
pub fn serve(log: &Path, setup: &Setup) -> anyhow::Result<()> {
    let file = preallocate(log)?;
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind("127.0.0.1:0".parse()?)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    poll.registry()
        .register(&mut SourceFd(&0), STDIN, Interest::READABLE)?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;

    let mut conns: Vec<Conn> = Vec::new();
    let mut members: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let mut events = Events::with_capacity(4096);
    let mut offset = 0u64;
    // The round's records, back to back as they go to the log, and whose each is.
    let mut round: Vec<u8> = Vec::new();
    let mut senders: Vec<usize> = Vec::new();
    let mut touched: Vec<usize> = Vec::new();
    loop {
        poll.poll(&mut events, None).context("poll")?;
        for event in events.iter() {
            match event.token() {
                LISTENER => accept(&listener, poll.registry(), &mut conns)?,
                STDIN => return Ok(()),
                Token(i) => {
                    let conn = &mut conns[i];
                    if event.is_writable() {
                        flush(conn);
                        if conn.write.is_empty() {
                            conn.waiting = false;
                            poll.registry().reregister(
                                &mut conn.socket,
                                Token(i),
                                Interest::READABLE,
                            )?;
                        }
                    }
                    if event.is_readable() {
                        read_all(conn);
                        take(i, conn, &mut members, setup.record_bytes, &mut round)?;
                        senders.resize(round.len() / setup.record_bytes, i);
                    }
                }
            }
        }
        if round.is_empty() {
            continue;
        }
        for record in round.chunks_exact_mut(setup.record_bytes) {
            let seq = last_seq.entry(super::channel_of(record)).or_default();
            *seq += 1;
            record[SEQ].copy_from_slice(&seq.to_le_bytes());
        }
        if offset + round.len() as u64 > LOG_BYTES {
            offset = 0;
        }
        file.write_all_at(&round, offset).context("write the log")?;
        offset += round.len() as u64;
        if setup.sync {
            file.sync_data().context("fdatasync the log")?;
        }
        for (&from, record) in senders.iter().zip(round.chunks_exact(setup.record_bytes)) {
            conns[from].write.extend_from_slice(&record[..ACK_BYTES]);
            touched.push(from);
            for &m in members
                .get(&super::channel_of(record))
                .map_or(&[][..], Vec::as_slice)
            {
                conns[m].write.extend_from_slice(record);
                touched.push(m);
            }
        }
        round.clear();
        senders.clear();
        touched.sort_unstable();
        touched.dedup();
        write_out(&mut conns, &touched, setup.send_threads);
        for &i in &touched {
            let conn = &mut conns[i];
            if !conn.write.is_empty() && !conn.waiting {
                conn.waiting = true;
                poll.registry().reregister(
                    &mut conn.socket,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
            }
        }
        touched.clear();
    }
}

/// A log of [`LOG_BYTES`] written through and synced, so a round's write overwrites
/// allocated blocks and its `fdatasync` has no size to record.
fn preallocate(path: &Path) -> anyhow::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0u8; 1 << 20];
    for i in 0..LOG_BYTES / chunk.len() as u64 {
        file.write_all_at(&chunk, i * chunk.len() as u64)?;
    }
    file.sync_all().context("sync the new log")?;
    Ok(file)
}

fn accept(
    listener: &TcpListener,
    registry: &Registry,
    conns: &mut Vec<Conn>,
) -> anyhow::Result<()> {
    loop {
        match listener.accept() {
            Ok((mut socket, _)) => {
                socket.set_nodelay(true)?;
                registry.register(&mut socket, Token(conns.len()), Interest::READABLE)?;
                conns.push(Conn {
                    socket,
                    read: Vec::new(),
                    write: Vec::new(),
                    role: None,
                    waiting: false,
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e).context("accept"),
        }
    }
}

/// Everything the socket has now (a closed or failed socket just stops giving).
fn read_all(conn: &mut Conn) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.socket.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => conn.read.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A connection's hello (its role, answered with one byte once registered), then its
/// whole records into the round.
fn take(
    i: usize,
    conn: &mut Conn,
    members: &mut HashMap<u32, Vec<usize>>,
    record_bytes: usize,
    round: &mut Vec<u8>,
) -> anyhow::Result<()> {
    if conn.role.is_none() {
        if conn.read.len() < HELLO_BYTES {
            return Ok(());
        }
        let role = Role::parse(&conn.read[..HELLO_BYTES]).context("a bad hello")?;
        conn.read.drain(..HELLO_BYTES);
        if let Role::Member(channel) = role {
            members.entry(channel).or_default().push(i);
        }
        conn.role = Some(role);
        conn.socket.write_all(b"k").context("answer a hello")?;
    }
    let whole = conn.read.len() / record_bytes * record_bytes;
    round.extend_from_slice(&conn.read[..whole]);
    conn.read.drain(..whole);
    Ok(())
}

/// Writes every touched connection's bytes, on two threads when asked and worth it.
fn write_out(conns: &mut [Conn], touched: &[usize], threads: usize) {
    if threads < 2 || touched.len() <= SPLIT_AT {
        touched.iter().for_each(|&i| flush(&mut conns[i]));
        return;
    }
    let mid = touched[touched.len() / 2];
    let (low, high) = conns.split_at_mut(mid);
    let (first, second) = touched.split_at(touched.partition_point(|&i| i < mid));
    std::thread::scope(|s| {
        s.spawn(|| first.iter().for_each(|&i| flush(&mut low[i])));
        second.iter().for_each(|&i| flush(&mut high[i - mid]));
    });
}

/// Writes what the socket takes now; the rest waits for it to be writable.
fn flush(conn: &mut Conn) {
    while !conn.write.is_empty() {
        match conn.socket.write(&conn.write) {
            Ok(n) => {
                conn.write.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => {
                conn.write.clear();
                return;
            }
        }
    }
}
