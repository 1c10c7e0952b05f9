//! The HTTP connection loop under the API: every accepted socket is counted (in total
//! and per client address) and refused cheaply past the caps, and every connection is
//! watched for the three ways a client can hold one without using it: headers that never
//! finish, a body that never finishes (bounded by the JSON extractor), and an idle
//! keep-alive. WebSockets keep their count until the socket closes, as the count lives in
//! the socket.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::gateway::outbox::Socket;

/// Bounds on connections and their timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, in total.
    pub max_connections: usize,
    /// Connections open at once from one client address (a trusted proxy is exempt).
    pub max_per_address: usize,
    /// A request's headers must be complete this long after the server starts waiting
    /// for them (on a new connection, or after the first byte of a keep-alive's next one).
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Addresses exempt from the per-address cap (the reverse proxies).
    pub trusted: Vec<IpAddr>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub idle_closed: AtomicU64,
}

impl ConnStats {
    pub fn render(&self, out: &mut String) {
        use crate::metrics::{render_header, render_one, render_value};
        render_one(
            out,
            "natter_http_connections",
            "gauge",
            "HTTP connections open (WebSockets included).",
            self.open.load(Ordering::Relaxed),
        );
        render_header(
            out,
            "natter_http_connections_closed_total",
            "counter",
            "Connections refused at the caps or closed by a timeout, by reason.",
        );
        for (reason, n) in [
            ("refused", &self.refused),
            ("header_timeout", &self.header_timeouts),
            ("idle", &self.idle_closed),
        ] {
            render_value(
                out,
                "natter_http_connections_closed_total",
                &format!("reason=\"{reason}\""),
                n.load(Ordering::Relaxed),
            );
        }
    }
}

/// Open connections in total and by address.
struct Counts {
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

impl Counts {
    /// A slot for a connection from `ip`, or `None` past a cap.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let ip = ip.to_canonical();
        let per_address = !self.limits.trusted.contains(&ip);
        // An IPv6 client is counted by its /64, as for the rate limits.
        let ip = crate::ratelimit::address_key(ip);
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if self.stats.open.load(Ordering::Relaxed) >= self.limits.max_connections {
            return None;
        }
        if per_address {
            let n = by_address.entry(ip).or_default();
            if *n >= self.limits.max_per_address {
                return None;
            }
            *n += 1;
        }
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            counts: Arc::clone(self),
            ip: per_address.then_some(ip),
        })
    }
}

/// One admitted connection's place in the counts, given back when dropped.
struct Slot {
    counts: Arc<Counts>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.stats.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut by_address = self
                .counts
                .by_address
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = by_address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_address.remove(&ip);
                }
            }
        }
    }
}

/// What the watchdog of one connection sees: counters and flags only (no clock read per
/// read or write); the watchdog keeps the times itself, at its tick's granularity.
struct Activity {
    /// Bumped by every read or write that moved bytes, and every answer.
    events: AtomicU64,
    /// The server waits for a request's headers (on a new connection, or since the first
    /// byte after the last request was taken).
    awaiting_head: AtomicBool,
    /// Requests being answered.
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            events: AtomicU64::new(0),
            // A new connection owes its first request's headers.
            awaiting_head: AtomicBool::new(true),
            busy: AtomicUsize::new(0),
        }
    }

    fn read(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
        // The first byte after a request was taken starts the next one's head.
        if self.busy.load(Ordering::Relaxed) == 0 && !self.awaiting_head.load(Ordering::Relaxed) {
            self.awaiting_head.store(true, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// The socket, with its slot and its activity. The socket is shared: a WebSocket
/// session lends it to the fan-out, which writes a channel's next events to it while the
/// session's task waits ([`crate::gateway::outbox::Outbox::deliver`]).
struct Watched {
    io: Socket,
    activity: Arc<Activity>,
    _slot: Slot,
    spill: Spill,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = this
            .spill
            .poll_read(Pin::new(&mut Shared(&this.io)), cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

/// Bytes one read from a socket takes when its reader asks for less
/// ([`Spill::poll_read`]).
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Where a small read lands first: one buffer per thread, not per connection.
    static CHUNK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
}

/// Reads larger than the reader asks for, the rest kept until it asks again. A WebSocket
/// reads 256 bytes at a time (its buffer is held for the connection's whole life: see
/// `api::ws`), so a client's burst of pipelined frames took a system call per 256 bytes;
/// read through this, the burst takes one. The rest is held only until it is read: an idle
/// connection holds nothing (an empty box), a busy one at most [`READ_CHUNK`] bytes.
/// (A box and a `u32` rather than a `Vec` and a `usize`: every connection holds one.)
#[derive(Default)]
struct Spill {
    rest: Box<[u8]>,
    at: u32,
}

impl Spill {
    fn poll_read<S: AsyncRead>(
        &mut self,
        io: Pin<&mut S>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let at = self.at as usize;
        if at < self.rest.len() {
            let n = buf.remaining().min(self.rest.len() - at);
            buf.put_slice(&self.rest[at..at + n]);
            // At most READ_CHUNK: fits.
            self.at = (at + n) as u32;
            if at + n == self.rest.len() {
                *self = Self::default();
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_CHUNK / 2 {
            return io.poll_read(cx, buf);
        }
        CHUNK.with_borrow_mut(|chunk| {
            let mut read = ReadBuf::new(chunk);
            let polled = io.poll_read(cx, &mut read);
            let got = read.filled();
            let n = buf.remaining().min(got.len());
            buf.put_slice(&got[..n]);
            if n < got.len() {
                self.rest = got[n..].into();
                self.at = 0;
            }
            polled
        })
    }
}

/// A shared socket's reads, as `TcpStream`'s own: wait for readable, read what is there.
struct Shared<'a>(&'a TcpStream);

impl AsyncRead for Shared<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use std::os::fd::AsRawFd;
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            let asked = buf.remaining();
            let mut got = 0;
            // A read that fills less than it asked for drained the socket, and new bytes
            // bring a new edge (`epoll`), so the readiness is cleared then, as
            // `TcpStream::poll_read` clears it: the next read waits for that edge instead
            // of costing a `read` that finds nothing (one per frame a client sends, before).
            // `try_io` clears it only if no event came meanwhile.
            let read = self.0.try_io(tokio::io::Interest::READABLE, || {
                // SAFETY: nothing here de-initializes any of these bytes; `read` only
                // writes them.
                let space = unsafe { buf.unfilled_mut() };
                // SAFETY: `space` is writable memory of `space.len()` bytes, which `read`
                // writes at most; the bytes it wrote are marked filled below.
                let n = unsafe {
                    libc::read(self.0.as_raw_fd(), space.as_mut_ptr().cast(), space.len())
                };
                let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
                got = n;
                // (Not with mio's `poll(2)` fallback, which is not edge-triggered: as
                // Tokio.)
                if cfg!(all(
                    target_os = "linux",
                    not(mio_unsupported_force_poll_poll)
                )) && 0 < n
                    && n < asked
                {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got == 0 => continue,
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
                _ => {
                    // SAFETY: `read` initialized these `got` bytes.
                    unsafe { buf.assume_init(got) };
                    buf.advance(got);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl Watched {
    /// Writes as `TcpStream`'s own writes do: wait for writable, write what fits.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        write: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.io.poll_write_ready(cx))?;
            match write(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) => {
                    if n > 0 {
                        self.activity.wrote();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, |io| io.try_write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // As `TcpStream::poll_shutdown`: the write side, at once.
        Poll::Ready(socket2::SockRef::from(&*self.io).shutdown(std::net::Shutdown::Write))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, |io| io.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// What a refused connection is told, written without waiting (a socket that cannot
/// take it at once just gets closed).
fn refusal() -> Vec<u8> {
    let body =
        r#"{"error":{"code":"unavailable","message":"too many connections; retry shortly"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, asks every
/// connection to finish its request in flight and close, and returns once all have.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let counts = Arc::new(Counts {
        limits: limits.clone(),
        stats: Arc::clone(&stats),
        by_address: Mutex::default(),
    });
    let refusal = refusal();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Some(slot) = counts.admit(peer.ip()) else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = stream.try_write(&refusal);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set TCP_NODELAY");
        }
        let activity = Arc::new(Activity::new());
        let io = Watched {
            io: Arc::new(stream),
            activity: Arc::clone(&activity),
            _slot: slot,
            spill: Spill::default(),
        };
        tasks.spawn(connection(
            io,
            peer,
            app.clone(),
            activity,
            Timeouts {
                header: limits.header_timeout,
                idle: limits.idle_timeout,
            },
            Arc::clone(&stats),
            stopped.clone(),
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The two timers the watchdog of a connection keeps.
#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// Serves one connection, closing it when its headers or its idleness run past the
/// limits, or gracefully when the server stops.
async fn connection(
    io: Watched,
    peer: SocketAddr,
    app: Router,
    activity: Arc<Activity>,
    limits: Timeouts,
    stats: Arc<ConnStats>,
    mut stopped: watch::Receiver<bool>,
) {
    let seen = Arc::clone(&activity);
    let socket = Arc::clone(&io.io);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        // The socket itself, for a WebSocket session (see `Watched`).
        if req.headers().contains_key(hyper::header::UPGRADE) {
            req.extensions_mut().insert(Arc::clone(&socket));
        }
        seen.awaiting_head.store(false, Ordering::Relaxed);
        seen.busy.fetch_add(1, Ordering::Relaxed);
        let app = app.clone();
        let seen = Arc::clone(&seen);
        async move {
            let answer = app.oneshot(req).await;
            seen.busy.fetch_sub(1, Ordering::Relaxed);
            seen.wrote();
            answer
        }
    });
    // No timer for hyper: given one, it arms a header timer of its own on every request
    // (30 s by default). The watchdog below keeps the header and idle timeouts.
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let tick = (limits.header.min(limits.idle) / 4)
        .clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut every = tokio::time::interval(tick);
    // The watchdog's own clock: when the events counter last moved, and since when the
    // server has been waiting for headers.
    let mut events = 0;
    let mut moved_at = Instant::now();
    let mut head_since = Some(moved_at);
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "serve a connection");
                }
                return;
            }
            _ = stopped.wait_for(|s| *s) => break,
            _ = every.tick() => {
                let now = Instant::now();
                let seen = activity.events.load(Ordering::Relaxed);
                if seen != events {
                    (events, moved_at) = (seen, now);
                }
                if activity.busy.load(Ordering::Relaxed) > 0 {
                    head_since = None;
                    continue;
                }
                if !activity.awaiting_head.load(Ordering::Relaxed) {
                    head_since = None;
                } else if head_since.is_none() {
                    head_since = Some(moved_at.min(now));
                }
                if head_since.is_some_and(|t| now - t > limits.header) {
                    stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "request headers not received in time; closing");
                    return;
                }
                if now - moved_at > limits.idle {
                    stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.header, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;

    /// A shared socket's reads (through its readiness, not `TcpStream`'s own reads) get
    /// every byte in order across short reads and pauses, each pause's data waking the
    /// reader, and the end of the stream as a read of nothing.
    #[tokio::test]
    async fn a_shared_socket_reads_everything_across_short_reads_and_pauses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let reader = listener.accept().await.unwrap().0;
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let sending = sent.clone();
        let write = tokio::spawn(async move {
            // Pieces of uneven size with pauses: reads of 4 KiB come up short often.
            for (i, piece) in sending.chunks(3_001).enumerate() {
                writer.write_all(piece).await.unwrap();
                if i % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        let mut got = Vec::new();
        let mut space = vec![0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut space);
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                poll_fn(|cx| Pin::new(&mut Shared(&reader)).poll_read(cx, &mut buf)),
            )
            .await
            .expect("every piece wakes the reader");
            read.unwrap();
            if buf.filled().is_empty() {
                break;
            }
            got.extend_from_slice(buf.filled());
        }
        write.await.unwrap();
        assert_eq!(got, sent);
    }

    /// The read system calls this thread has made, from its `/proc/thread-self/io`
    /// (opened on it), read with one `pread` a time. (`syscr` counts the `read` family,
    /// not `recv`: the shared socket's reads are `read`s.)
    #[cfg(target_os = "linux")]
    fn reads_so_far(io: &std::fs::File) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut text = [0u8; 1024];
        let n = io.read_at(&mut text, 0).unwrap();
        std::str::from_utf8(&text[..n])
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("syscr: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A read that drains the socket costs one system call: the next read waits for the
    /// next bytes' readiness rather than reading again to find nothing (which it did
    /// once per frame a client sent). The next bytes still wake it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_read_that_drains_the_socket_reads_once_and_the_next_bytes_wake_it() {
        // One thread: the reads counted are the test's and the runtime's, all here.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut writer = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let reader = listener.accept().await.unwrap().0;
            let io = std::fs::File::open("/proc/thread-self/io").unwrap();
            // What looking costs (its own `pread`, counted or not).
            let looked = reads_so_far(&io);
            let looking = reads_so_far(&io) - looked;
            let mut space = vec![0u8; 4096];
            for round in 0..3u8 {
                writer.write_all(&[round; 100]).await.unwrap();
                // The bytes are there (`poll`, not counted: a new socket is taken for
                // readable before anything came).
                let mut fd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&reader),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid `pollfd`.
                assert_eq!(unsafe { libc::poll(&mut fd, 1, 10_000) }, 1);
                reader.readable().await.unwrap();
                let before = reads_so_far(&io);
                let mut buf = ReadBuf::new(&mut space);
                let first = poll_fn(|cx| {
                    Poll::Ready(Pin::new(&mut Shared(&reader)).poll_read(cx, &mut buf))
                })
                .await;
                assert!(matches!(first, Poll::Ready(Ok(()))), "{first:?}");
                assert_eq!(buf.filled(), &[round; 100][..]);
                // Drained, the socket is no longer taken for readable: an attempt to read
                // is refused without trying.
                let mut tried = false;
                let probe = reader.try_io(tokio::io::Interest::READABLE, || {
                    tried = true;
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                assert!(
                    probe.is_err() && !tried,
                    "round {round}: still taken for readable"
                );
                // The next read waits, with no system call to find that out.
                let mut buf = ReadBuf::new(&mut space);
                let next = poll_fn(|cx| {
                    Poll::Ready(Pin::new(&mut Shared(&reader)).poll_read(cx, &mut buf))
                })
                .await;
                assert!(next.is_pending(), "{next:?}");
                assert_eq!(
                    reads_so_far(&io) - before - looking,
                    1,
                    "round {round}: one read"
                );
            }
            // The next bytes wake the waiting read.
            let mut buf = ReadBuf::new(&mut space);
            let read = poll_fn(|cx| Pin::new(&mut Shared(&reader)).poll_read(cx, &mut buf));
            let (read, wrote) = tokio::join!(
                tokio::time::timeout(Duration::from_secs(10), read),
                writer.write_all(b"more"),
            );
            wrote.unwrap();
            read.expect("the bytes woke the reader").unwrap();
            assert_eq!(buf.filled(), b"more");
        });
    }

    /// Reads through `spill` into buffers of `size` bytes until `want` bytes came.
    async fn read_all(spill: &mut Spill, io: &mut TcpStream, size: usize, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            let mut space = vec![0; size];
            let mut buf = ReadBuf::new(&mut space);
            poll_fn(|cx| spill.poll_read(Pin::new(&mut *io), cx, &mut buf))
                .await
                .unwrap();
            assert!(
                !buf.filled().is_empty(),
                "end of stream after {} bytes",
                got.len()
            );
            got.extend_from_slice(buf.filled());
        }
        got
    }

    #[tokio::test]
    async fn small_reads_take_a_burst_in_one_read_and_hand_it_over_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut reader, _) = listener.accept().await.unwrap();
        let burst: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&burst).await.unwrap();
        writer.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut spill = Spill::default();
        // The first small read takes what has arrived (more than it asked for)...
        let first = read_all(&mut spill, &mut reader, 256, 1).await;
        assert_eq!(first, burst[..256]);
        assert!(
            spill.rest.len() > 256,
            "the rest is kept: {}",
            spill.rest.len()
        );
        // ...and the reads after it get the rest, in order, with nothing lost.
        let rest = read_all(&mut spill, &mut reader, 256, burst.len() - 256).await;
        assert_eq!([first, rest].concat(), burst);
        // Drained, it holds nothing.
        assert_eq!((spill.rest.len(), spill.at), (0, 0));
        // A reader that asks for much reads straight from the socket.
        writer.write_all(&burst).await.unwrap();
        let big = read_all(&mut spill, &mut reader, READ_CHUNK, burst.len()).await;
        assert_eq!(big, burst);
        assert_eq!(spill.rest.len(), 0);
        // A read that would wait leaves nothing behind.
        let mut space = [0u8; 256];
        let mut buf = ReadBuf::new(&mut space);
        let pending = poll_fn(|cx| {
            Poll::Ready(
                spill
                    .poll_read(Pin::new(&mut reader), cx, &mut buf)
                    .is_pending(),
            )
        })
        .await;
        assert!(pending);
        assert_eq!(spill.rest.len(), 0);
        // The peer's end of stream comes through as a read of nothing.
        drop(writer);
        let mut buf = ReadBuf::new(&mut space);
        poll_fn(|cx| spill.poll_read(Pin::new(&mut reader), cx, &mut buf))
            .await
            .unwrap();
        assert!(buf.filled().is_empty());
    }
}
