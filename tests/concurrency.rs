//! Many concurrent writers into shared channels: every channel's seqs are exactly 1..=N
//! and every acknowledged message is in history with the seq it was acknowledged with.

mod common;

use std::collections::HashMap;

use common::{TestServer, assert_gap_free};
use reqwest::StatusCode;

const CLIENTS: usize = 50;
const MESSAGES: usize = 100;
const CHANNELS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_into_five_channels() {
    fifty_clients().await
}

/// The same with the server on two PostgreSQL shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_into_five_channels_on_postgres() {
    common::on_postgres(fifty_clients()).await
}

async fn fifty_clients() {
    let server = TestServer::start().await;
    let anon = server.client();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(anon.register(&format!("writer{i}")).await);
    }
    let members: Vec<_> = clients[1..].iter().collect();
    let mut channels = Vec::new();
    for i in 0..CHANNELS {
        channels.push(
            clients[0]
                .create_channel(&format!("shared{i}"), "group", &members)
                .await,
        );
    }

    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let c = c.clone();
            let channels = channels.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..MESSAGES {
                    let ch = &channels[(i + n) % CHANNELS];
                    let a = c
                        .send(ch, &format!("{i}/{n}"), Some(&format!("{i}-{n}")))
                        .await;
                    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
                    acked.push((
                        ch.clone(),
                        a.body["id"].as_str().unwrap().to_owned(),
                        a.body["seq"].as_i64().unwrap(),
                    ));
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), CLIENTS * MESSAGES);

    for ch in &channels {
        let events = clients[0].all_events(ch).await;
        assert_eq!(
            assert_gap_free(&events) as usize,
            CLIENTS + CLIENTS * MESSAGES / CHANNELS
        );
        let history: HashMap<String, i64> = clients[0]
            .all_messages(ch)
            .await
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["seq"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(history.len(), CLIENTS * MESSAGES / CHANNELS);
        for (_, id, seq) in acked.iter().filter(|(c, _, _)| c == ch) {
            assert_eq!(
                history.get(id),
                Some(seq),
                "acknowledged message {id} missing or moved"
            );
        }
    }
    server.stop().await;
}
