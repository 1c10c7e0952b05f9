//! A server restart under connected clients: SIGTERM closes every WebSocket with 1012,
//! the server restarts on the same data and port, and the clients (the library's
//! reconnect-and-resume) go on with nothing lost and nothing duplicated.

mod common;

use common::child::ServerProcess;
use common::ws::*;
use natter::client::{Frame, Incoming, Realtime};
use std::collections::HashMap;

/// What one connection has seen.
#[derive(Default)]
struct Seen {
    seqs: Vec<i64>,
    closes: Vec<Option<u16>>,
    acks: HashMap<String, i64>,
}

/// Reads `rt` until `done` holds, or until the connection drops (when `stop_on_drop`).
async fn drain(
    rt: &mut Realtime,
    chan: i64,
    seen: &mut Seen,
    stop_on_drop: bool,
    done: impl Fn(&Seen) -> bool,
) {
    while !done(seen) {
        match tokio::time::timeout(WAIT, rt.next())
            .await
            .expect("progress within the wait")
            .expect("the client keeps working")
        {
            Incoming::Frame(Frame::Event(e)) if e.channel_id == chan => seen.seqs.push(e.seq),
            Incoming::Frame(Frame::Ack { client_id, message }) => {
                seen.acks.insert(client_id, message.id);
            }
            Incoming::Dropped { code } => {
                seen.closes.push(code);
                if stop_on_drop {
                    return;
                }
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn clients_resume_across_a_sigterm_restart_with_nothing_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path()).await;
    let listen = server.addr.to_string();
    let base = server.base();
    let a = common::Client::new(&base).register("alice").await;
    let b = common::Client::new(&base).register("bob").await;
    let ch = a.create_channel("room", "group", &[&b]).await;
    let chan = id(&ch);
    let mut sender = connect(&a).await;
    let mut reader = connect(&b).await;
    let start = *reader.positions().get(&chan).unwrap();

    let (mut a_seen, mut b_seen) = (Seen::default(), Seen::default());
    // Before the restart: 100 sends, some of them acknowledged.
    for i in 0..100 {
        sender
            .send(chan, &format!("m{i}"), &format!("c{i}"))
            .await
            .unwrap();
    }
    // SIGTERM with those sends in flight.
    server.terminate().await;
    // Every connection is told to come back (1012), after the answers it was owed.
    drain(&mut reader, chan, &mut b_seen, true, |_| false).await;
    drain(&mut sender, chan, &mut a_seen, true, |_| false).await;
    assert_eq!(a_seen.closes, [Some(1012)]);
    assert_eq!(b_seen.closes, [Some(1012)]);
    let acked_before = a_seen.acks.len();
    eprintln!(
        "before the restart: {acked_before} acked, reader saw {} events",
        b_seen.seqs.len()
    );

    // Sends made while the server is down wait in the client.
    for i in 100..120 {
        sender
            .send(chan, &format!("m{i}"), &format!("c{i}"))
            .await
            .unwrap();
    }
    let server = ServerProcess::start_at(dir.path(), &listen).await;
    // The sender reconnects, resumes and sends again whatever was not acknowledged.
    for i in 120..150 {
        sender
            .send(chan, &format!("m{i}"), &format!("c{i}"))
            .await
            .unwrap();
    }
    let last = start + 150;
    drain(&mut sender, chan, &mut a_seen, false, |s| {
        s.acks.len() == 150 && s.seqs.last() == Some(&last)
    })
    .await;
    drain(&mut reader, chan, &mut b_seen, false, |s| {
        s.seqs.last() == Some(&last)
    })
    .await;
    assert_eq!(
        b_seen.seqs,
        (start + 1..=last).collect::<Vec<_>>(),
        "the reader saw every event once, in order"
    );
    assert_eq!(
        a_seen.seqs,
        (start + 1..=last).collect::<Vec<_>>(),
        "so did the sender"
    );
    let acks = a_seen.acks;

    let messages = a.all_messages(&ch).await;
    assert_eq!(messages.len(), 150, "each send stored once");
    // In the order they were sent, across the restart and the resends.
    let cids: Vec<&str> = messages
        .iter()
        .map(|m| m["client_id"].as_str().unwrap())
        .collect();
    let sent: Vec<String> = (0..150).map(|i| format!("c{i}")).collect();
    assert_eq!(cids, sent.iter().map(String::as_str).collect::<Vec<_>>());
    for (cid, id) in &acks {
        assert!(
            messages.iter().any(|m| m["client_id"] == cid.as_str()
                && m["id"].as_str().and_then(|s| s.parse::<i64>().ok()) == Some(*id)),
            "ack {cid} matches the stored message"
        );
    }
    server.terminate().await;
}
