//! Durability under SIGKILL: a server taking concurrent sends is killed at a random moment
//! and restarted on the same data. Every acknowledged message is there exactly once, every
//! channel's seqs stay gap-free, and retrying unacknowledged sends creates no duplicates.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::child::ServerProcess;
use common::{Client, assert_gap_free};
use reqwest::StatusCode;

const ROUNDS: usize = 5;
const WRITERS: usize = 8;
const CHANNELS: usize = 3;

/// (channel, client_id) → message id of every acknowledged send.
type Acked = HashMap<(String, String), String>;

/// A pseudo-random delay from the clock: the kill lands somewhere different each round.
fn kill_delay(round: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(200 + (nanos / 1000 + round as u64 * 137) % 600)
}

fn rebase(clients: &[Client], base: &str) -> Vec<Client> {
    clients.iter().map(|c| c.with_base(base)).collect()
}

/// Checks every channel: acknowledged sends present once with their id, no client_id
/// twice, events 1..=last_seq.
async fn verify(reader: &Client, channels: &[String], acked: &Acked) {
    for ch in channels {
        let messages = reader.all_messages(ch).await;
        let mut by_cid: HashMap<String, Vec<String>> = HashMap::new();
        for m in &messages {
            by_cid
                .entry(m["client_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(m["id"].as_str().unwrap().to_owned());
        }
        for (cid, ids) in &by_cid {
            assert_eq!(ids.len(), 1, "client_id {cid} stored {} times", ids.len());
        }
        for ((c, cid), id) in acked.iter().filter(|((c, _), _)| c == ch) {
            assert_eq!(
                by_cid.get(cid).map(|v| &v[0]),
                Some(id),
                "acknowledged {cid} in {c} lost or changed"
            );
        }
        let events = reader.all_events(ch).await;
        let n = assert_gap_free(&events);
        let last = reader.get(&format!("/v1/channels/{ch}")).await.body["last_seq"]
            .as_i64()
            .unwrap();
        assert_eq!(n, last, "the log ends at last_seq");
    }
}

/// Where the killed server keeps its data.
struct Data {
    dir: tempfile::TempDir,
    /// PostgreSQL shards (`--store`), or none: SQLite in `dir`.
    shards: Option<String>,
}

impl Data {
    async fn start(&self) -> ServerProcess {
        match &self.shards {
            None => ServerProcess::start(self.dir.path()).await,
            Some(shards) => {
                ServerProcess::start_with(
                    self.dir.path(),
                    "127.0.0.1:0",
                    &["--store", shards, "--node-id", "7"],
                    &[],
                )
                .await
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let data = Data {
        dir: tempfile::tempdir().unwrap(),
        shards: None,
    };
    sigkill_rounds(&data).await;
}

/// The same on two PostgreSQL shards: the restarted node takes over its node id once the
/// killed one's lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_on_postgres() {
    let Some(shards) = common::pg::databases(2).await else {
        return;
    };
    let data = Data {
        dir: tempfile::tempdir().unwrap(),
        shards: Some(shards.join(",")),
    };
    sigkill_rounds(&data).await;
}

async fn sigkill_rounds(data: &Data) {
    let server = data.start().await;
    let anon = Client::new(&server.base());
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(anon.register(&format!("crash{i}")).await);
    }
    let others: Vec<&Client> = users[1..].iter().collect();
    let mut channels = Vec::new();
    for i in 0..CHANNELS {
        channels.push(
            users[0]
                .create_channel(&format!("crash{i}"), "group", &others)
                .await,
        );
    }
    let mut acked = Acked::new();
    let mut server = Some(server);

    for round in 0..ROUNDS {
        let running = server.take().unwrap();
        let clients = rebase(&users, &running.base());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let client = clients[w % clients.len()].clone();
            let channels = channels.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut unknown = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) || n >= 100_000 {
                        break;
                    }
                    let ch = channels[(w + n) % channels.len()].clone();
                    let cid = format!("r{round}-w{w}-{n}");
                    let body =
                        serde_json::json!({"text": format!("message {cid}"), "client_id": cid});
                    let path = format!("/v1/channels/{ch}/messages");
                    match client
                        .raw(
                            reqwest::Method::POST,
                            &path,
                            Some(serde_json::to_vec(&body).unwrap()),
                        )
                        .await
                    {
                        Ok(a) if a.status == StatusCode::CREATED => {
                            acked.push(((ch, cid), a.body["id"].as_str().unwrap().to_owned()))
                        }
                        Ok(a) => panic!("unexpected answer {a:?}"),
                        // The connection died with the server: the outcome is unknown.
                        Err(_) => {
                            unknown.push((client.clone(), ch, cid));
                            break;
                        }
                    }
                }
                (acked, unknown)
            }));
        }
        tokio::time::sleep(kill_delay(round)).await;
        running.kill().await;
        stop.store(true, Ordering::Relaxed);
        let mut unknown = Vec::new();
        let mut acked_this_round = 0;
        for t in tasks {
            let (a, u) = t.await.unwrap();
            acked_this_round += a.len();
            acked.extend(a);
            unknown.extend(u);
        }
        assert!(
            acked_this_round > 0,
            "round {round} acknowledged nothing before the kill"
        );

        let restarted = data.start().await;
        let clients = rebase(&users, &restarted.base());
        verify(&clients[0], &channels, &acked).await;
        // Search finds what was acknowledged before the kill, the last send too (likely
        // unfolded then: the restarted server folds it and indexes it before answering).
        let mut round_acked: Vec<_> = acked
            .iter()
            .filter(|((_, cid), _)| cid.starts_with(&format!("r{round}-")))
            .collect();
        round_acked.sort_by_key(|(_, id)| id.parse::<i64>().unwrap());
        for ((_, cid), id) in round_acked.iter().rev().step_by(7).take(3) {
            let found = clients[0].get(&format!("/v1/search?q=%22{cid}%22")).await;
            assert_eq!(found.status, StatusCode::OK, "{found:?}");
            let ids: Vec<&str> = found.body["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["message"]["id"].as_str().unwrap())
                .collect();
            assert_eq!(ids, [id.as_str()], "search for acknowledged {cid}");
        }
        // Retrying an unacknowledged send commits it at most once.
        for (client, ch, cid) in unknown {
            let client = client.with_base(&restarted.base());
            let a = client
                .send(&ch, &format!("message {cid}"), Some(&cid))
                .await;
            assert!(
                a.status == StatusCode::CREATED || a.status == StatusCode::OK,
                "{a:?}"
            );
            acked.insert((ch, cid), a.body["id"].as_str().unwrap().to_owned());
        }
        verify(&clients[0], &channels, &acked).await;
        eprintln!(
            "round {round}: {acked_this_round} acknowledged before SIGKILL, {} in total",
            acked.len()
        );
        server = Some(restarted);
    }
    server.unwrap().kill().await;
}
