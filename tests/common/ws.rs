//! WebSocket helpers: the client library logged in as a test user, a raw socket for
//! protocol-level tests, and collectors that check what arrives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use natter::client::{Api, Frame, Incoming, Realtime};
use tokio_tungstenite::tungstenite::Message;

use super::Client;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn api(c: &Client) -> Api {
    Api::new(&c.base).with_token(c.token.as_deref().unwrap())
}

pub async fn connect(c: &Client) -> Realtime {
    connect_resuming(c, HashMap::new()).await
}

pub async fn connect_resuming(c: &Client, resume: HashMap<i64, i64>) -> Realtime {
    let (rt, ready) = Realtime::connect(&api(c), resume).await.unwrap();
    assert!(matches!(ready, Frame::Ready { .. }), "{ready:?}");
    rt
}

/// The next frame, failing the test after [`WAIT`].
pub async fn next(rt: &mut Realtime) -> Incoming {
    tokio::time::timeout(WAIT, rt.next())
        .await
        .expect("a frame within the wait")
        .expect("the connection works")
}

/// Reads until `pred` matches a frame, returning every frame read up to it.
pub async fn until(rt: &mut Realtime, mut pred: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
    let mut seen = Vec::new();
    loop {
        if let Incoming::Frame(f) = next(rt).await {
            let done = pred(&f);
            seen.push(f);
            if done {
                return seen;
            }
        }
    }
}

/// The seqs of `channel`'s events among `frames`, in arrival order.
pub fn seqs(frames: &[Frame], channel: i64) -> Vec<i64> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Event(e) if e.channel_id == channel => Some(e.seq),
            _ => None,
        })
        .collect()
}

pub fn id(s: &str) -> i64 {
    s.parse().unwrap()
}

pub type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A socket with its receive buffer set by hand to `bytes` (the kernel then does not grow
/// it, as it would up to 32 MiB here), so that the server's writes fill it soon.
pub fn small_socket(bytes: u32) -> tokio::net::TcpSocket {
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(bytes).unwrap();
    tcp
}

/// `/v1/ws` over a socket the test connected.
pub async fn raw_over(addr: SocketAddr, tcp: tokio::net::TcpStream) -> RawWs {
    tokio_tungstenite::client_async(
        format!("ws://{addr}/v1/ws"),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap()
    .0
}

/// `/v1/ws` over a [`small_socket`].
pub async fn raw_small(addr: SocketAddr, bytes: u32) -> RawWs {
    raw_over(addr, small_socket(bytes).connect(addr).await.unwrap()).await
}

pub async fn raw(addr: SocketAddr) -> RawWs {
    tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .unwrap()
        .0
}

/// Reads frames until the server closes; returns the text frames and the close code.
/// (Over any socket: the client library's has a read buffer of its own.)
pub async fn read_to_close<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> (Vec<String>, Option<u16>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut texts = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the server answers in time")
        {
            Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
            Some(Ok(Message::Close(frame))) => return (texts, frame.map(|f| f.code.into())),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (texts, None),
        }
    }
}

pub async fn send_text(ws: &mut RawWs, text: &str) {
    ws.send(Message::text(text.to_owned())).await.unwrap();
}

/// A metric's value from `/metrics`.
pub async fn metric(c: &Client, name: &str) -> f64 {
    let samples = super::scrape(&c.base).await;
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("metric {name} in {samples:#?}"))
}
