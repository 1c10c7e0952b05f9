//! Stopping a loaded server: SIGTERM drains (every acknowledged send is stored, nothing
//! unstored is acknowledged, `/readyz` turns 503, new connections are refused, WebSockets
//! get 1012, exit 0), and a second signal exits at once without harming the store.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Client;
use common::child::ServerProcess;
use common::db;
use common::ws::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// What a sender was told: client id → the message id the server acknowledged.
type Acks = Arc<Mutex<HashMap<String, String>>>;

/// Sends over REST until the server stops answering (or `max` sends); every answer is
/// either a 2xx with the message (recorded) or an error. Returns (acked, failed).
async fn rest_sender(
    client: Client,
    channel: String,
    tag: String,
    max: usize,
    acks: Acks,
) -> (usize, usize) {
    let (mut acked, mut failed) = (0, 0);
    for i in 0..max {
        let cid = format!("{tag}-{i}");
        let body =
            serde_json::to_vec(&json!({"text": format!("text {cid}"), "client_id": cid})).unwrap();
        match client
            .raw(
                reqwest::Method::POST,
                &format!("/v1/channels/{channel}/messages"),
                Some(body),
            )
            .await
        {
            Ok(a) if a.status.is_success() => {
                let id = a.body["id"].as_str().unwrap().to_owned();
                acks.lock().unwrap().insert(cid, id);
                acked += 1;
            }
            Ok(a) => {
                // An answered refusal must say why: 503 while draining, never a 2xx.
                assert!(
                    a.status == StatusCode::SERVICE_UNAVAILABLE,
                    "unexpected answer {a:?}"
                );
                failed += 1;
            }
            Err(_) => {
                // Connection refused or closed: the server is gone or going.
                failed += 1;
                if failed > 20 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (acked, failed)
}

/// Sends over one WebSocket, `window` in flight, until the server closes it. Returns the
/// close code.
async fn ws_sender(
    client: Client,
    channel: String,
    tag: String,
    max: usize,
    acks: Acks,
) -> Option<u16> {
    let mut ws = raw(client
        .base
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap())
    .await;
    send_text(
        &mut ws,
        &json!({"op": "hello", "token": client.token.as_deref().unwrap()}).to_string(),
    )
    .await;
    let mut sent = 0;
    let mut in_flight = 0;
    let mut sending = true;
    let window = 32;
    loop {
        while sending && in_flight < window && sent < max {
            let frame = json!({"op": "send", "channel_id": channel, "text": "ws", "client_id": format!("{tag}-{sent}")});
            if ws.send(Message::text(frame.to_string())).await.is_err() {
                // The server is closing: read on to its close frame.
                sending = false;
                break;
            }
            sent += 1;
            in_flight += 1;
        }
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frames in time");
        match next {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str().unwrap() {
                    "ack" => {
                        acks.lock().unwrap().insert(
                            v["client_id"].as_str().unwrap().to_owned(),
                            v["message"]["id"].as_str().unwrap().to_owned(),
                        );
                        in_flight -= 1;
                    }
                    "error" => {
                        assert_ne!(v["error"]["code"], "internal", "{v}");
                        in_flight -= 1;
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Close(f))) => return f.map(|f| f.code.into()),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
        if sent == max && in_flight == 0 {
            return None;
        }
    }
}

/// The channel's messages in the stopped server's database: client id → message id;
/// asserts the database passes its integrity check and the channel's log is gap-free.
fn stored(data_dir: &Path, channel: &str) -> HashMap<String, String> {
    let db = db::open_checked(data_dir);
    let channel: i64 = channel.parse().unwrap();
    db::assert_gap_free(&db, channel);
    db::messages_with_client_ids(&db, channel)
        .into_iter()
        .map(|(_, cid, id)| (cid, id))
        .collect()
}

/// Waits until `n` sends were acknowledged, so the signal lands mid-burst.
async fn until_acked(acks: &Acks, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while acks.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "the burst got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every acknowledged send is stored, under the id it was acknowledged with.
fn assert_acked_are_stored(acks: &Acks, stored: &HashMap<String, String>) {
    let acks = acks.lock().unwrap();
    for (cid, id) in acks.iter() {
        assert_eq!(
            stored.get(cid),
            Some(id),
            "acknowledged send {cid} is stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_keeps_every_acknowledged_send_and_claims_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path()).await;
    let anon = Client::new(&server.base());
    let alice = anon.register("alice").await;
    let bob = anon.register("bob").await;
    let ch = alice.create_channel("room", "group", &[&bob]).await;
    let acks: Acks = Arc::default();
    let mut rest = Vec::new();
    for k in 0..6 {
        let who = if k % 2 == 0 { &alice } else { &bob };
        rest.push(tokio::spawn(rest_sender(
            who.clone(),
            ch.clone(),
            format!("rest{k}"),
            100_000,
            Arc::clone(&acks),
        )));
    }
    let mut ws = Vec::new();
    for k in 0..2 {
        ws.push(tokio::spawn(ws_sender(
            alice.clone(),
            ch.clone(),
            format!("ws{k}"),
            100_000,
            Arc::clone(&acks),
        )));
    }
    until_acked(&acks, 300).await;
    server.signal("TERM").await;
    let exit = server.wait(Duration::from_secs(30)).await;
    assert!(exit.success(), "drained and exited 0: {exit}");
    let mut failed = 0;
    for r in rest {
        failed += r.await.unwrap().1;
    }
    for w in ws {
        assert_eq!(
            w.await.unwrap(),
            Some(1012),
            "WebSockets are told to reconnect"
        );
    }
    assert!(failed > 0, "the senders ran into the drain");
    assert_eq!(db::unfolded_posts(dir.path()), 0, "a clean stop folds");
    let stored = stored(dir.path(), &ch);
    assert_acked_are_stored(&acks, &stored);
    let acked = acks.lock().unwrap().len();
    assert!(stored.len() >= acked);
    eprintln!(
        "{acked} acknowledged, {} stored ({} stored but unanswered), {failed} REST sends refused or cut off",
        stored.len(),
        stored.len() - acked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_turns_readyz_503_then_refuses_connections_and_closes_websockets_with_1012() {
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        ServerProcess::start_with(dir.path(), "127.0.0.1:0", &["--drain-delay-secs", "2"], &[])
            .await;
    let anon = Client::new(&server.base());
    let alice = anon.register("alice").await;
    let ch = alice.create_channel("room", "group", &[]).await;
    let mut ws = raw(server.addr).await;
    send_text(
        &mut ws,
        &json!({"op": "hello", "token": alice.token.as_deref().unwrap()}).to_string(),
    )
    .await;
    assert_eq!(anon.get("/readyz").await.status, StatusCode::OK);
    let signalled = Instant::now();
    server.signal("TERM").await;
    // During the delay: /readyz says 503 on new connections, and requests are still served.
    let mut not_ready = false;
    for _ in 0..200 {
        if Client::new(&server.base()).get("/readyz").await.status
            == StatusCode::SERVICE_UNAVAILABLE
        {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "/readyz turned 503");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "within the delay"
    );
    let sent = alice.send(&ch, "still served while draining", None).await;
    assert_eq!(sent.status, StatusCode::CREATED);
    // After the delay: the WebSocket gets 1012 and new connections are refused.
    let (_, code) = read_to_close(&mut ws).await;
    assert_eq!(code, Some(1012));
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "not before the delay"
    );
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(server.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections are refused");
    assert!(server.wait(Duration::from_secs(30)).await.success());
    let stored = stored(dir.path(), &ch);
    assert!(
        stored.is_empty(),
        "REST sends without a client id: {stored:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_store_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_with(
        dir.path(),
        "127.0.0.1:0",
        &["--drain-delay-secs", "60"],
        &[],
    )
    .await;
    let anon = Client::new(&server.base());
    let alice = anon.register("alice").await;
    let ch = alice.create_channel("room", "group", &[]).await;
    let acks: Acks = Arc::default();
    let senders: Vec<_> = (0..4)
        .map(|k| {
            tokio::spawn(rest_sender(
                alice.clone(),
                ch.clone(),
                format!("s{k}"),
                100_000,
                Arc::clone(&acks),
            ))
        })
        .collect();
    until_acked(&acks, 200).await;
    server.signal("TERM").await;
    for _ in 0..200 {
        if anon.get("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Draining would take 60 s; the second signal ends it now, mid-burst.
    let second = Instant::now();
    server.signal("INT").await;
    let exit = server.wait(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(128 + 2), "exit code says SIGINT: {exit}");
    assert!(second.elapsed() < Duration::from_secs(10));
    for s in senders {
        s.await.unwrap();
    }
    let stored_now = stored(dir.path(), &ch);
    assert_acked_are_stored(&acks, &stored_now);
    // The server starts again on the same data and serves every acknowledged message.
    let server = ServerProcess::start(dir.path()).await;
    let alice = alice.with_base(&server.base());
    let messages = alice.all_messages(&ch).await;
    let served: HashMap<String, String> = messages
        .iter()
        .map(|m| {
            (
                m["client_id"].as_str().unwrap().to_owned(),
                m["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_acked_are_stored(&acks, &served);
    assert_eq!(served.len(), stored_now.len());
    server.terminate().await;
}
