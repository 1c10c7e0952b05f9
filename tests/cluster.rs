//! Cluster mode: several nodes on the same PostgreSQL shards, joined by a real
//! `nats-server` (`--bus nats://…`). Events sent through any node reach the members online
//! on every node, in order and once; membership changes and logouts cross nodes; the
//! cluster keeps delivering while NATS is away. Needs PostgreSQL 15 and nats-server
//! (CI installs them); skipped loudly elsewhere.

mod common;

use std::time::Duration;

use natter::client::{ClientError, Frame, Incoming, Realtime};
use serde_json::json;

use common::nats::Nats;
use common::ws::{self, id};
use common::{Client, TestServer};

/// `n` nodes (node ids 1..=n) on two fresh shards and one NATS; `None` to skip.
async fn cluster(n: usize) -> Option<(Nats, Vec<TestServer>)> {
    let nats = Nats::start()?;
    let shards = common::pg::databases(2).await?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let (shards, url) = (shards.clone(), nats.url());
        nodes.push(
            TestServer::start_with(move |c| {
                c.store = Some(natter::store::StoreLocation::Postgres(shards));
                c.bus = Some(vec![url]);
                c.node_id = i as u16 + 1;
                c.gateway.presence_grace = Duration::from_millis(500);
            })
            .await,
        );
    }
    for node in &nodes {
        wait_for_bus(&node.client(), true).await;
    }
    Some((nats, nodes))
}

/// Waits until the node's `/readyz` says its bus is up (or down).
async fn wait_for_bus(node: &Client, up: bool) {
    let want = if up { "bus: up" } else { "bus: down" };
    for _ in 0..200 {
        let a = node.get("/readyz").await;
        if a.body.as_str().is_some_and(|b| b.contains(want)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/readyz never said {want}");
}

/// Reads `rt` until it has the channel's events through `last`; returns their seqs in
/// arrival order (after the position it started from).
async fn collect(rt: &mut Realtime, channel: i64, last: i64) -> Vec<i64> {
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seqs.last().copied().unwrap_or(0) < last {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rt.next()).await {
            Ok(Ok(Incoming::Frame(Frame::Event(e)))) if e.channel_id == channel => seqs.push(e.seq),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the connection failed: {e}"),
            Err(_) => panic!("only {seqs:?} of channel {channel} through {last} arrived"),
        }
    }
    seqs
}

/// Each seq once, in order, with none missing, from `from + 1` through `last`.
fn assert_exactly_once(seqs: &[i64], from: i64, last: i64) {
    let want: Vec<i64> = (from + 1..=last).collect();
    assert_eq!(
        seqs,
        want.as_slice(),
        "events missing, repeated or out of order"
    );
}

/// The newest message and the event at `seq`, read through `reader`, are the write
/// acknowledged as `seq` (read-your-writes, whichever node took the write).
async fn reads_back(reader: &Client, channel: &str, seq: i64) {
    let page = reader
        .get(&format!("/v1/channels/{channel}/messages?limit=1"))
        .await;
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(
        page.body["messages"][0]["seq"].as_i64(),
        Some(seq),
        "{page:?}"
    );
    let events = reader
        .get(&format!(
            "/v1/channels/{channel}/events?after_seq={}",
            seq - 1
        ))
        .await;
    assert_eq!(
        events.body["events"][0]["seq"].as_i64(),
        Some(seq),
        "{events:?}"
    );
}

/// The seq a channel stood at in the receiver's `ready`.
fn start_of(rt: &Realtime, channel: i64) -> i64 {
    rt.positions().get(&channel).copied().unwrap_or(0)
}

#[tokio::test]
async fn members_on_three_nodes_get_every_event_once_in_order() {
    let Some((_nats, nodes)) = cluster(3).await else {
        return;
    };
    let mut users = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        users.push(node.client().register(&format!("member{i}")).await);
    }
    let members: Vec<&Client> = users[1..].iter().collect();
    let channel = users[0].create_channel("everyone", "group", &members).await;
    let ch = id(&channel);
    // One receiver per node, and a second channel only nodes 0 and 2 follow.
    let mut receivers = Vec::new();
    for u in &users {
        receivers.push(ws::connect(u).await);
    }
    let starts: Vec<i64> = receivers.iter().map(|r| start_of(r, ch)).collect();
    // Every node sends at once, each through its own node.
    let per_node = 40;
    let sends = users.iter().enumerate().map(|(n, u)| {
        let channel = channel.clone();
        async move {
            for k in 0..per_node {
                let a = u
                    .send(&channel, &format!("n{n}-{k}"), Some(&format!("n{n}-{k}")))
                    .await;
                assert_eq!(a.status, 201, "{a:?}");
            }
        }
    });
    futures_util::future::join_all(sends).await;
    let last = users[0].all_events(&channel).await.len() as i64;
    assert_eq!(last, starts[0] + 3 * per_node as i64);
    for (rt, from) in receivers.iter_mut().zip(&starts) {
        let seqs = collect(rt, ch, last).await;
        assert_exactly_once(&seqs, *from, last);
    }
    // Over the bus, not only by the periodic check.
    for node in &nodes {
        assert!(ws::metric(&node.client(), "natter_bus_received_total").await > 0.0);
    }
    // A read right after a write on another node sees it (read-your-writes).
    for (n, u) in users.iter().enumerate() {
        let reader = users[(n + 1) % 3].clone();
        let a = u.send(&channel, "ryw", None).await;
        assert_eq!(a.status, 201);
        let seq = a.body["seq"].as_i64().unwrap();
        reads_back(&reader, &channel, seq).await;
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn membership_and_logout_cross_nodes() {
    let Some((_nats, nodes)) = cluster(3).await else {
        return;
    };
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let owner = a.client().register("owner").await;
    let guest = c.client().register("guest").await;
    let channel = owner.create_channel("later", "group", &[]).await;
    let ch = id(&channel);
    // The guest is online on node C only, following nothing of the channel.
    let mut rt = ws::connect(&guest).await;
    // Added through node A: node C learns it from the guest's subject.
    let added = owner
        .call(
            reqwest::Method::PUT,
            &format!("/v1/channels/{channel}/members/{}", guest.user_id),
            Some(json!({})),
        )
        .await;
    assert!(added.status.is_success(), "{added:?}");
    let frames = ws::until(
        &mut rt,
        |f| matches!(f, Frame::Joined { channel_id, .. } if *channel_id == ch),
    )
    .await;
    let Some(Frame::Joined { last_seq, .. }) = frames.last() else {
        unreachable!()
    };
    let joined_at = *last_seq;
    // What is sent after, through node B, arrives.
    let owner_on_b = owner.with_base(&b.base());
    for k in 0..5 {
        assert_eq!(
            owner_on_b
                .send(&channel, &format!("after {k}"), None)
                .await
                .status,
            201
        );
    }
    let last = owner.all_events(&channel).await.len() as i64;
    let seqs = collect(&mut rt, ch, last).await;
    assert_exactly_once(&seqs, joined_at, last);
    // The guest's token works on node C (and is cached there)...
    let guest_on_c = guest.with_base(&c.base());
    assert_eq!(guest_on_c.get("/v1/users/me").await.status, 200);
    // ...until a logout on node A: its socket on node C closes with 4001, and node C
    // refuses the token.
    let guest_on_a = guest.with_base(&a.base());
    let out = guest_on_a
        .call(reqwest::Method::DELETE, "/v1/sessions/current", None)
        .await;
    assert_eq!(out.status, 204, "{out:?}");
    let closed = tokio::time::timeout(ws::WAIT, async {
        loop {
            match rt.next().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the socket on node C closes");
    assert!(
        matches!(closed, ClientError::Closed { code: 4001, .. }),
        "{closed:?}"
    );
    assert_eq!(guest_on_c.get("/v1/users/me").await.status, 401);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn presence_crosses_nodes() {
    let Some((_nats, nodes)) = cluster(2).await else {
        return;
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    let alice = a.client().register("alice").await;
    let bob = b.client().register("bob").await;
    let channel = alice.create_channel("room", "group", &[&bob]).await;
    let mut rb = ws::connect(&bob).await;
    rb.send_raw(&json!({"op": "presence.subscribe", "channel_id": channel}).to_string())
        .await
        .unwrap();
    let frames = ws::until(&mut rb, |f| matches!(f, Frame::Presence(_))).await;
    let Some(Frame::Presence(now)) = frames.last() else {
        unreachable!()
    };
    let me = id(&alice.user_id);
    assert!(
        now.iter().any(|p| p.user_id == me && p.status == "offline"),
        "{now:?}"
    );
    // Alice online on node A: Bob, on node B, hears it; then offline.
    let ra = ws::connect(&alice).await;
    let said = |status: &'static str| move |f: &Frame| matches!(f, Frame::PresenceUpdated(p) if p.user_id == me && p.status == status);
    ws::until(&mut rb, said("online")).await;
    let on_b = bob.get(&format!("/v1/channels/{channel}/presence")).await;
    assert!(on_b.body.to_string().contains("online"), "{on_b:?}");
    drop(ra);
    let frames = ws::until(&mut rb, said("offline")).await;
    assert!(
        matches!(frames.last(), Some(Frame::PresenceUpdated(p)) if p.last_seen_at.is_none()),
        "node B learns the time from the store, not the word: {frames:?}"
    );
    // Node A recorded when she left; node B reads it.
    let mut shown = None;
    for _ in 0..50 {
        let list = bob
            .get(&format!("/v1/channels/{channel}/presence"))
            .await
            .body;
        let alice_now = list["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["user_id"] == json!(alice.user_id))
            .cloned();
        if alice_now
            .as_ref()
            .is_some_and(|m| m["last_seen_at"].is_string())
        {
            shown = alice_now;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = shown.expect("node B shows when Alice was last online");
    assert_eq!(shown["status"], "offline");
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn nats_stopped_mid_burst_loses_and_repeats_nothing() {
    let Some((nats, nodes)) = cluster(2).await else {
        return;
    };
    let sender = nodes[0].client().register("sender").await;
    let receiver = nodes[1].client().register("receiver").await;
    let channel = sender.create_channel("burst", "group", &[&receiver]).await;
    let ch = id(&channel);
    let mut rt = ws::connect(&receiver).await;
    let metric = |name: &'static str| {
        let c = nodes[1].client();
        async move { ws::metric(&c, name).await }
    };
    let mut at = start_of(&rt, ch);
    let paced = |from: usize, n: usize, pause: u64| {
        let (sender, channel) = (&sender, &channel);
        async move {
            for k in from..from + n {
                let a = sender.send(channel, &format!("m{k}"), None).await;
                assert_eq!(a.status, 201, "{a:?}");
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    };
    let burst = |from: usize, n: usize| paced(from, n, 5);
    // Over NATS.
    let ((), seqs) = tokio::join!(burst(0, 50), collect(&mut rt, ch, at + 50));
    assert_exactly_once(&seqs, at, at + 50);
    at += 50;
    assert!(metric("natter_bus_received_total").await >= 50.0);
    // NATS goes away mid-burst, for several seconds: the rest of the burst still
    // arrives, by the periodic check, though nothing is sent after it to show the gap.
    let down = tokio::time::Instant::now();
    let ((), seqs) = tokio::join!(
        async {
            burst(50, 25).await;
            nats.stop();
            paced(75, 25, 120).await;
        },
        collect(&mut rt, ch, at + 50)
    );
    assert_exactly_once(&seqs, at, at + 50);
    at += 50;
    wait_for_bus(&nodes[0].client(), false).await;
    let filled = metric("natter_dispatch_gap_filled_events_total").await;
    assert!(
        filled >= 1.0,
        "events sent while NATS was down came from the store"
    );
    // A user online on node B, added meanwhile (through node A) to a channel nobody on
    // node B follows: that addition went nowhere. Once NATS is back, the session reads
    // its channels again and joins.
    let late = nodes[1].client().register("late").await;
    let mut late_rt = ws::connect(&late).await;
    let other = sender.create_channel("while away", "group", &[&late]).await;
    // NATS back mid-burst: nothing lost or repeated across the change.
    let ((), seqs) = tokio::join!(
        async {
            burst(100, 25).await;
            assert!(
                down.elapsed() >= Duration::from_secs(3),
                "NATS was away for seconds"
            );
            nats.start_again();
            burst(125, 25).await;
        },
        collect(&mut rt, ch, at + 50)
    );
    assert_exactly_once(&seqs, at, at + 50);
    at += 50;
    let other = id(&other);
    ws::until(
        &mut late_rt,
        |f| matches!(f, Frame::Joined { channel_id, .. } if *channel_id == other),
    )
    .await;
    // Back at full speed: events come over the bus again, none from the store.
    wait_for_bus(&nodes[0].client(), true).await;
    wait_for_bus(&nodes[1].client(), true).await;
    let received = metric("natter_bus_received_total").await;
    let filled = metric("natter_dispatch_gap_filled_events_total").await;
    let ((), seqs) = tokio::join!(burst(150, 20), collect(&mut rt, ch, at + 20));
    assert_exactly_once(&seqs, at, at + 20);
    assert!(metric("natter_bus_received_total").await >= received + 20.0);
    assert_eq!(
        metric("natter_dispatch_gap_filled_events_total").await,
        filled,
        "with NATS back, nothing needed the store"
    );
    for node in nodes {
        node.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// Whole processes behind nginx: rolling restarts and a node killed with -9.

mod processes {
    use std::collections::{BTreeSet, HashMap};
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use natter::client::{Api, Frame, Incoming, Realtime};
    use reqwest::StatusCode;

    use super::common::child::ServerProcess;
    use super::common::nats::Nats;
    use super::common::{self, Client, free_port};

    /// nginx running the shipped `ops/cluster/nginx.conf` with test ports, in the
    /// foreground (killed with the test process, even on a panic).
    pub struct Nginx {
        child: std::process::Child,
        pub port: u16,
        _dir: tempfile::TempDir,
    }

    impl Nginx {
        pub fn start(nodes: &[u16]) -> Option<Self> {
            if !common::available(
                "nginx (apt-get install nginx)",
                Path::new("/usr/sbin/nginx").exists(),
            ) {
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let shipped = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/cluster/nginx.conf"),
            )
            .unwrap();
            let mut site = shipped.replace(
                "listen 127.0.0.1:8100;",
                &format!("listen 127.0.0.1:{port};"),
            );
            for (i, node) in nodes.iter().enumerate() {
                let from = format!("server 127.0.0.1:{} ", 8101 + i);
                assert!(site.contains(&from), "ops/cluster/nginx.conf has `{from}`");
                site = site.replace(&from, &format!("server 127.0.0.1:{node} "));
            }
            let d = dir.path().display();
            let conf = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 1024; }}\nhttp {{\naccess_log off;\n\
                 client_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
                 {site}\n}}\n"
            );
            let path = dir.path().join("nginx.conf");
            std::fs::write(&path, conf).unwrap();
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new("/usr/sbin/nginx");
            cmd.arg("-c").arg(&path).stdin(std::process::Stdio::null());
            // SAFETY: only an async-signal-safe call between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            // Held by the guard at once: stopped and waited for however this ends.
            let nginx = Self {
                child: cmd.spawn().expect("start nginx"),
                port,
                _dir: dir,
            };
            for _ in 0..200 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(nginx);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("nginx listens within 4 s");
        }

        pub fn base(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    impl Drop for Nginx {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if std::thread::panicking() {
                let log = std::fs::read_to_string(self._dir.path().join("error.log"));
                eprintln!("nginx error log:\n{}", log.unwrap_or_default());
            }
        }
    }

    /// Three `natter serve` processes (node ids 1–3) on fixed ports, two shards, one NATS,
    /// and nginx in front.
    pub struct Cluster {
        pub nats: Nats,
        pub nginx: Nginx,
        pub nodes: Vec<Option<ServerProcess>>,
        pub ports: Vec<u16>,
        dirs: Vec<tempfile::TempDir>,
        store: String,
    }

    impl Cluster {
        pub async fn start() -> Option<Self> {
            let nats = Nats::start()?;
            let shards = common::pg::databases(2).await?;
            let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
            let nginx = Nginx::start(&ports)?;
            let mut cluster = Self {
                nats,
                nginx,
                nodes: Vec::new(),
                ports,
                dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
                store: shards.join(","),
            };
            for n in 0..3 {
                let node = cluster.spawn(n).await;
                cluster.nodes.push(Some(node));
            }
            Some(cluster)
        }

        async fn spawn(&self, n: usize) -> ServerProcess {
            let listen = format!("127.0.0.1:{}", self.ports[n]);
            let node_id = (n + 1).to_string();
            let bus = self.nats.url();
            ServerProcess::start_with(
                self.dirs[n].path(),
                &listen,
                &["--store", &self.store, "--bus", &bus, "--node-id", &node_id],
                &[
                    ("NATTER_DRAIN_DELAY_SECS", "1"),
                    ("NATTER_TRUSTED_PROXIES", "127.0.0.1"),
                ],
            )
            .await
        }

        /// SIGTERM, a clean exit, and a start again on the same port.
        pub async fn restart(&mut self, n: usize) {
            let node = self.nodes[n].take().unwrap();
            node.terminate().await;
            let node = self.spawn(n).await;
            self.nodes[n] = Some(node);
        }

        pub async fn kill(&mut self, n: usize) {
            self.nodes[n].take().unwrap().kill().await;
        }

        pub async fn stop(mut self) {
            for node in self.nodes.iter_mut().filter_map(Option::take) {
                node.terminate().await;
            }
        }
    }

    /// A receiver through nginx with the client library: reconnects and resumes by
    /// itself; records every event of `channel` and fails on a repeat or a gap.
    async fn receive(
        api: Api,
        channel: i64,
        last: Arc<std::sync::atomic::AtomicI64>,
        done: Arc<AtomicBool>,
    ) -> (Vec<i64>, i64, u32) {
        let (mut rt, ready) = Realtime::connect(&api, HashMap::new()).await.unwrap();
        let Frame::Ready { channels, .. } = ready else {
            panic!("{ready:?}")
        };
        let from = channels.iter().find(|c| c.0 == channel).unwrap().1;
        let mut seqs = Vec::new();
        let mut reconnects = 0;
        loop {
            let target = last.load(Ordering::SeqCst);
            if done.load(Ordering::SeqCst) && seqs.last().copied().unwrap_or(from) >= target {
                rt.close().await;
                return (seqs, from, reconnects);
            }
            match tokio::time::timeout(Duration::from_millis(200), rt.next()).await {
                Err(_) => continue,
                Ok(Ok(Incoming::Frame(Frame::Event(e)))) if e.channel_id == channel => {
                    seqs.push(e.seq)
                }
                Ok(Ok(Incoming::Dropped { .. })) => reconnects += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("a receiver's session failed for good: {e}"),
            }
        }
    }

    /// Sends messages through `c` until `stop` (and at least 50), each retried with its
    /// client_id until acknowledged (bounded); returns the client_ids acknowledged.
    async fn send(c: Client, channel: String, tag: String, stop: Arc<AtomicBool>) -> Vec<String> {
        let mut acked = Vec::new();
        for k in 0.. {
            if k >= 50 && stop.load(Ordering::SeqCst) {
                break;
            }
            let client_id = format!("{tag}-{k}");
            let mut tries = 0;
            loop {
                tries += 1;
                assert!(tries < 200, "{client_id} never acknowledged");
                let body = serde_json::json!({"text": client_id, "client_id": client_id});
                let answer = c
                    .raw(
                        reqwest::Method::POST,
                        &format!("/v1/channels/{channel}/messages"),
                        Some(serde_json::to_vec(&body).unwrap()),
                    )
                    .await;
                match answer {
                    Ok(a) if a.status == StatusCode::CREATED || a.status == StatusCode::OK => break,
                    Ok(a) if a.status.is_server_error() => {}
                    Ok(a) => panic!("{client_id}: {a:?}"),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acked.push(client_id);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        acked
    }

    /// Runs senders and receivers through nginx while `disrupt` works on the cluster, then
    /// checks that every receiver got every event once in order and the store holds
    /// exactly the acknowledged messages.
    async fn under_load(
        cluster: &mut Cluster,
        disrupt: impl AsyncFnOnce(&mut Cluster, &Client, &str),
    ) {
        let front = Client::new(&cluster.nginx.base());
        let mut users = Vec::new();
        for i in 0..6 {
            users.push(front.register(&format!("user{i}")).await);
        }
        let members: Vec<&Client> = users[1..].iter().collect();
        let channel = users[0].create_channel("load", "group", &members).await;
        let ch: i64 = channel.parse().unwrap();
        let last = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
        let done = Arc::new(AtomicBool::new(false));
        let receivers: Vec<_> = users
            .iter()
            .map(|u| {
                let api = Api::new(&u.base).with_token(u.token.as_deref().unwrap());
                tokio::spawn(receive(api, ch, Arc::clone(&last), Arc::clone(&done)))
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        // Let every receiver get its ready before the load starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let senders: Vec<_> = users[..3]
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let stop = Arc::clone(&stop);
                tokio::spawn(send(u.clone(), channel.clone(), format!("s{i}"), stop))
            })
            .collect();
        disrupt(cluster, &users[3], &channel).await;
        // A little more load after the last disruption, then the senders finish.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        let mut acked = BTreeSet::new();
        for s in senders {
            acked.extend(s.await.unwrap());
        }
        // The log through nginx: every message once, exactly the acknowledged ones.
        let events = users[0].all_events(&channel).await;
        let final_seq = common::assert_gap_free(&events);
        let messages = users[0].all_messages(&channel).await;
        let stored: Vec<String> = messages
            .iter()
            .map(|m| m["client_id"].as_str().unwrap_or("").to_owned())
            .collect();
        let distinct: BTreeSet<String> = stored.iter().cloned().collect();
        assert_eq!(distinct.len(), stored.len(), "a message was stored twice");
        // A disrupting send of its own (see `disrupt`) is acknowledged too.
        let extra: BTreeSet<String> = distinct.difference(&acked).cloned().collect();
        assert!(
            extra.iter().all(|c| c.starts_with("probe")),
            "unacknowledged: {extra:?}"
        );
        assert!(acked.is_subset(&distinct), "acknowledged but lost");
        last.store(final_seq, Ordering::SeqCst);
        done.store(true, Ordering::SeqCst);
        let mut reconnects = 0;
        for r in receivers {
            let (seqs, from, n) = tokio::time::timeout(Duration::from_secs(60), r)
                .await
                .expect("every receiver catches up")
                .unwrap();
            let want: Vec<i64> = (from + 1..=final_seq).collect();
            assert_eq!(
                seqs, want,
                "a receiver missed, repeated or reordered events"
            );
            reconnects += n;
        }
        assert!(reconnects > 0, "the disruption moved some receivers");
    }

    #[tokio::test]
    async fn a_rolling_restart_through_nginx_loses_and_repeats_nothing() {
        let Some(mut cluster) = Cluster::start().await else {
            return;
        };
        under_load(&mut cluster, async |cluster, _, _| {
            for n in 0..3 {
                // Each node once the one before is back and nginx tries it again.
                tokio::time::sleep(Duration::from_millis(1200)).await;
                cluster.restart(n).await;
            }
        })
        .await;
        cluster.stop().await;
    }

    #[tokio::test]
    async fn a_node_killed_mid_burst_loses_and_repeats_nothing() {
        let Some(mut cluster) = Cluster::start().await else {
            return;
        };
        under_load(&mut cluster, async |cluster, user, channel| {
            tokio::time::sleep(Duration::from_millis(700)).await;
            // A send acknowledged by node 2 just before it dies reaches every member.
            let direct = user.with_base(&format!("http://127.0.0.1:{}", cluster.ports[1]));
            let a = direct.send(channel, "probe", Some("probe")).await;
            assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
            cluster.kill(1).await;
        })
        .await;
        cluster.stop().await;
    }
}

/// `ops/cluster/local-cluster.sh`, the README's way to try cluster mode: up (2 shards,
/// NATS, 3 nodes, nginx), a message through nginx, a node restarted, down (nothing left).
#[tokio::test]
async fn the_local_cluster_script_brings_a_cluster_up_and_down() {
    if !common::pg::installed()
        || !common::nats::installed()
        || !common::available(
            "nginx (apt-get install nginx)",
            std::path::Path::new("/usr/sbin/nginx").exists(),
        )
    {
        return;
    }
    fn free(port: u16) -> bool {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    }
    // Ports the script derives from its bases, all free now, and below the ephemeral
    // range (32768 and up), so that no outgoing connection of a test running meanwhile
    // takes one before the script binds it.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let pick = |offsets: &[u16], from: u16| {
        (0..500u32)
            .map(|i| from + (seed.wrapping_add(i.wrapping_mul(7919)) % 4_000) as u16)
            .find(|&p| offsets.iter().all(|o| free(p + o)))
            .expect("free ports")
    };
    let base = pick(&[0, 1, 2, 3], 20_000);
    let pg = pick(&[0, 1], 24_100);
    let nats = pick(&[0], 28_200);
    let dir = tempfile::tempdir().unwrap();
    let cluster_dir = dir.path().join("cluster");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/cluster/local-cluster.sh");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .env("NATTER_BIN", env!("CARGO_BIN_EXE_natter"))
            .env("CLUSTER_DIR", &cluster_dir)
            .env("PORT_BASE", base.to_string())
            .env("PG_PORT", pg.to_string())
            .env("NATS_PORT", nats.to_string())
            .env("NATTER_INSECURE_FAST_PASSWORD_HASH", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = run(&["up"]);
    // Whatever happens next, the cluster goes down.
    struct Down<F: Fn(&[&str]) -> (bool, String)>(F);
    impl<F: Fn(&[&str]) -> (bool, String)> Drop for Down<F> {
        fn drop(&mut self) {
            let _ = (self.0)(&["down"]);
        }
    }
    let down = Down(run);
    assert!(ok, "{out}");
    let front = Client::new(&format!("http://127.0.0.1:{base}"));
    let a = front.register("alice").await;
    let channel = a.create_channel("tried", "group", &[]).await;
    assert_eq!(a.send(&channel, "hello, cluster", None).await.status, 201);
    let (ok, out) = (down.0)(&["status"]);
    assert!(ok && out.matches("bus: up").count() == 3, "{out}");
    let (ok, out) = (down.0)(&["restart", "2"]);
    assert!(ok, "{out}");
    let messages = a.all_messages(&channel).await;
    assert_eq!(messages.len(), 1);
    let (ok, out) = (down.0)(&["down"]);
    assert!(ok, "{out}");
    assert!(!cluster_dir.exists(), "down deletes the cluster's data");
    for port in [base, base + 1, pg, nats] {
        assert!(free(port), "port {port} still taken after down");
    }
}

/// A shard's streaming replica answers history and event reads once it has replayed the
/// reader's writes; a read right after a write on another node still sees it; with the
/// replica stopped, reads go to the primary without an error.
#[tokio::test]
async fn reads_use_a_caught_up_replica_and_survive_its_loss() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let Some(shards) = common::pg::databases(2).await else {
        return;
    };
    let primary = common::pg::shared().unwrap();
    let replica = primary.replica();
    let with_replica: Vec<String> = shards
        .iter()
        .map(|u| format!("{u}?replica=127.0.0.1:{}", replica.port))
        .collect();
    let mut nodes = Vec::new();
    for n in 0..2u16 {
        let (store, url) = (with_replica.clone(), nats.url());
        nodes.push(
            TestServer::start_with(move |c| {
                c.store = Some(natter::store::StoreLocation::Postgres(store));
                c.bus = Some(vec![url]);
                c.node_id = n + 1;
            })
            .await,
        );
    }
    let writer = nodes[0].client().register("writer").await;
    let channel = writer.create_channel("replicated", "group", &[]).await;
    let reader = writer.with_base(&nodes[1].base());
    let replica_reads = |node: &TestServer| {
        let c = node.client();
        async move {
            common::scrape(&c.base)
                .await
                .iter()
                .filter(|(k, _)| k.starts_with("natter_store_replica_reads_total{"))
                .map(|(_, v)| v)
                .sum::<f64>()
        }
    };
    // Each write, read back at once through the other node: always there.
    for k in 0..30 {
        let sent = writer.send(&channel, &format!("w{k}"), None).await;
        assert_eq!(sent.status, 201);
        let seq = sent.body["seq"].as_i64().unwrap();
        reads_back(&reader, &channel, seq).await;
    }
    // The replica has caught up: reads go to it.
    // (Other tests write to the same PostgreSQL meanwhile, so a read may still find the
    // replica a moment behind and go to the primary; bounded.)
    let before = replica_reads(&nodes[1]).await;
    let mut served = 0.0;
    for _ in 0..200 {
        let page = reader
            .get(&format!("/v1/channels/{channel}/messages"))
            .await;
        assert_eq!(page.status, 200);
        assert_eq!(page.body["messages"].as_array().unwrap().len(), 30);
        served = replica_reads(&nodes[1]).await - before;
        if served >= 10.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served >= 10.0,
        "only {served} reads went to the caught-up replica"
    );
    // The replica goes away: reads go on, from the primary, without an error.
    replica.stop();
    for k in 0..20 {
        let sent = writer.send(&channel, &format!("after {k}"), None).await;
        assert_eq!(sent.status, 201);
        let page = reader
            .get(&format!("/v1/channels/{channel}/messages?limit=1"))
            .await;
        assert_eq!(page.status, 200, "{page:?}");
        assert_eq!(page.body["messages"][0]["text"], format!("after {k}"));
    }
    let up = common::scrape(&nodes[1].base()).await;
    assert!(
        up.iter()
            .any(|(k, v)| k.starts_with("natter_store_replica_up{") && *v == 0.0),
        "the replica shows as down"
    );
    for node in nodes {
        node.stop().await;
    }
}

/// Deleting an account on one node kills its tokens on every node at once (a session
/// cached on another node included, its socket there closed with 4001), and a member
/// online on a third node sees it turn into a deleted user.
#[tokio::test]
async fn a_deleted_accounts_tokens_die_on_every_node() {
    let Some((_nats, nodes)) = cluster(3).await else {
        return;
    };
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let leaver = a.client().register("leaver").await;
    let friend = b.client().register("friend").await;
    let channel = leaver.create_channel("soon", "group", &[&friend]).await;
    // A second session of the leaver's, used (and cached) on node C, online there.
    let login = c
        .client()
        .post(
            "/v1/sessions",
            json!({"username": "leaver", "password": "password-leaver"}),
        )
        .await;
    assert_eq!(login.status, 200, "{login:?}");
    let mut on_c = c.client();
    on_c.token = Some(login.body["token"].as_str().unwrap().to_owned());
    on_c.user_id = leaver.user_id.clone();
    assert_eq!(on_c.get("/v1/users/me").await.status, 200);
    let mut rt = ws::connect(&on_c).await;
    let mut friend_rt = ws::connect(&friend).await;
    let gone = leaver
        .call(
            reqwest::Method::DELETE,
            "/v1/users/me",
            Some(json!({"password": "password-leaver"})),
        )
        .await;
    assert_eq!(gone.status, 204, "{gone:?}");
    let closed = tokio::time::timeout(ws::WAIT, async {
        loop {
            match rt.next().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the socket on node C closes");
    assert!(
        matches!(closed, ClientError::Closed { code: 4001, .. }),
        "{closed:?}"
    );
    assert_eq!(on_c.get("/v1/users/me").await.status, 401);
    assert_eq!(
        leaver.with_base(&b.base()).get("/v1/users/me").await.status,
        401
    );
    let leaver_id = id(&leaver.user_id);
    let ch = id(&channel);
    let seen = ws::until(&mut friend_rt, |f| {
        matches!(f, Frame::Event(e)
            if e.channel_id == ch && e.kind == "member.removed" && e.user_id == Some(leaver_id))
    })
    .await;
    assert!(
        seen.iter().any(|f| matches!(f,
            Frame::UserUpdated { user_id, deleted: true, .. } if *user_id == leaver_id)),
        "{seen:?}"
    );
    for node in nodes {
        node.stop().await;
    }
}
