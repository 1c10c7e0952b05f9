//! Outgoing webhooks (issue 17) against a real HTTP receiver started by the test: every
//! event at least once, in seq order, signed; a receiver that fails (5xx, timeouts,
//! refused connections) and recovers gets everything after with no gap; a SIGKILL of the
//! server mid-delivery resumes from the cursor; private addresses are refused.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::child::ServerProcess;
use common::{Client, TestServer};
use reqwest::Method;
use serde_json::{Value, json};

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    Fail(u16),
    /// Answers 200, this late.
    Slow(Duration),
}

/// One request the receiver answered.
#[derive(Debug, Clone)]
struct Got {
    seq: i64,
    key: String,
    signature: String,
    body: Bytes,
    ok: bool,
}

#[derive(Clone)]
struct Shared {
    got: Arc<Mutex<Vec<Got>>>,
    mode: Arc<Mutex<Mode>>,
}

/// A real HTTP server on loopback that records what it is sent.
struct Receiver {
    addr: SocketAddr,
    shared: Shared,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn receive(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mode = *s.mode.lock().unwrap();
    if let Mode::Slow(d) = mode {
        tokio::time::sleep(d).await;
    }
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let status = match mode {
        Mode::Fail(code) => StatusCode::from_u16(code).unwrap(),
        _ => StatusCode::OK,
    };
    s.got.lock().unwrap().push(Got {
        seq: event["seq"].as_i64().unwrap_or(-1),
        key: header("natter-idempotency-key"),
        signature: header("natter-signature"),
        body,
        ok: status.is_success(),
    });
    status
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shared = Shared {
            got: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Ok)),
        };
        let mut r = Self {
            addr: listener.local_addr().unwrap(),
            shared,
            task: None,
        };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(self.shared.clone());
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    fn got(&self) -> Vec<Got> {
        self.shared.got.lock().unwrap().clone()
    }

    /// Seqs answered with a 2xx, in the order they arrived.
    fn delivered(&self) -> Vec<i64> {
        self.got().iter().filter(|g| g.ok).map(|g| g.seq).collect()
    }

    /// Stops listening: connections are refused until [`Receiver::restart`].
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    /// Waits until every seq of `seqs` was answered with a 2xx.
    async fn wait_for(&self, seqs: &BTreeSet<i64>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got: BTreeSet<i64> = self.delivered().into_iter().collect();
            if seqs.is_subset(&got) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "missing {:?}",
                seqs.difference(&got).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every seq delivered is the next one after the last delivered, or a repeat of one
/// already delivered (at least once, in order): the first deliveries of seqs are
/// strictly increasing. Returns how many were repeats.
fn assert_in_order(delivered: &[i64]) -> usize {
    let mut seen = BTreeSet::new();
    let mut last = i64::MIN;
    let mut repeats = 0;
    for &seq in delivered {
        if !seen.insert(seq) {
            repeats += 1;
            continue;
        }
        assert!(seq > last, "seq {seq} arrived after {last}: {delivered:?}");
        last = seq;
    }
    repeats
}

/// Checks every request's `Natter-Signature` with the Python code the API notes give.
fn assert_signed(got: &[Got], secret: &str) {
    let notes = include_str!("../docs/api.md");
    let start = notes
        .find("```python\n")
        .expect("the API notes have Python verification code");
    let code = &notes[start + 10..];
    // The block sits in a list item: its lines are indented by two spaces.
    let code: String = code[..code.find("```").unwrap()]
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let cases: Vec<Value> = got
        .iter()
        .map(
            |g| json!({"header": g.signature, "body": String::from_utf8(g.body.to_vec()).unwrap()}),
        )
        .collect();
    let script = format!(
        "{code}\nimport json, sys\ncases = json.load(sys.stdin)\nbad = [c for c in cases if not verify({secret:?}, c['header'], c['body'].encode())]\nforged = verify({secret:?}, cases[0]['header'], cases[0]['body'].encode() + b' ')\nprint(len(cases), len(bad), forged)\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&cases).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("{} 0 False", got.len()),
        "every signature verifies, a changed body does not"
    );
}

fn allow_loopback(c: &mut natter::Config) {
    c.webhooks.allow = vec!["127.0.0.0/8".parse().unwrap()];
    c.webhooks.timeout = Duration::from_secs(1);
    c.webhooks.max_backoff = Duration::from_secs(1);
}

async fn subscribe(admin: &Client, channel: &str, body: Value) -> (String, String) {
    let a = admin
        .post(&format!("/v1/channels/{channel}/subscriptions"), body)
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    (
        a.body["subscription"]["id"].as_str().unwrap().to_owned(),
        a.body["secret"].as_str().unwrap().to_owned(),
    )
}

/// The subscription as its channel's admin sees it.
async fn status(admin: &Client, channel: &str) -> Value {
    let a = admin
        .get(&format!("/v1/channels/{channel}/subscriptions"))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    a.body["subscriptions"][0].clone()
}

/// Waits until the subscription's status satisfies `pred`.
async fn until_status(admin: &Client, channel: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(admin, channel).await;
        if pred(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `n` messages; their seqs.
async fn send(c: &Client, channel: &str, n: usize, tag: &str) -> BTreeSet<i64> {
    let mut seqs = BTreeSet::new();
    for i in 0..n {
        let a = c.send(channel, &format!("{tag} {i}"), None).await;
        assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
        seqs.insert(a.body["seq"].as_i64().unwrap());
    }
    seqs
}

async fn every_event_arrives_signed_in_order_through_failures() {
    let mut receiver = Receiver::start().await;
    let server = TestServer::start_with(allow_loopback).await;
    let alice = server.client().register("alice").await;
    let bob = server.client().register("bob").await;
    let channel = alice.create_channel("ops", "group", &[&bob]).await;
    let before = send(&alice, &channel, 3, "before").await;
    let (sub_id, secret) = subscribe(&alice, &channel, json!({"url": receiver.url()})).await;
    assert!(secret.starts_with("whsec_"));
    // Only the channel's owner and admins see or change subscriptions.
    let by_member = bob
        .get(&format!("/v1/channels/{channel}/subscriptions"))
        .await;
    assert_eq!(by_member.status, StatusCode::FORBIDDEN);

    // From now on (the default): what was sent before is not delivered.
    let mut all = send(&bob, &channel, 30, "first").await;
    receiver.wait_for(&all).await;
    assert!(receiver.delivered().iter().all(|s| !before.contains(s)));
    let s = until_status(&alice, &channel, |s| s["lag"] == 0).await;
    assert_eq!(s["status"], "active");
    assert_eq!(s["id"], sub_id.as_str());

    // A failing endpoint (5xx) backs off, shows why, and gets everything once it recovers.
    receiver.set(Mode::Fail(503));
    all.extend(send(&bob, &channel, 10, "during 5xx").await);
    let s = until_status(&alice, &channel, |s| s["failures"].as_i64() >= Some(2)).await;
    assert!(s["last_error"].as_str().unwrap().contains("503"), "{s}");
    assert!(
        s["next_try_at"].is_string() && s["failing_since"].is_string(),
        "{s}"
    );
    assert!(s["lag"].as_i64().unwrap() > 0, "{s}");
    receiver.set(Mode::Ok);
    receiver.wait_for(&all).await;
    until_status(&alice, &channel, |s| s["failures"] == 0 && s["lag"] == 0).await;

    // Timeouts.
    receiver.set(Mode::Slow(Duration::from_secs(3)));
    all.extend(send(&bob, &channel, 5, "during timeouts").await);
    let s = until_status(&alice, &channel, |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
    })
    .await;
    assert!(s["failures"].as_i64() >= Some(1), "{s}");
    receiver.set(Mode::Ok);
    receiver.wait_for(&all).await;

    // Refused connections.
    receiver.stop().await;
    all.extend(send(&bob, &channel, 5, "while down").await);
    until_status(&alice, &channel, |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("connect"))
    })
    .await;
    receiver.restart().await;
    receiver.wait_for(&all).await;

    // Paused: nothing goes out until it is resumed, then it goes on from its cursor.
    let path = format!("/v1/channels/{channel}/subscriptions/{sub_id}");
    let paused = alice
        .call(Method::PATCH, &path, Some(json!({"status": "paused"})))
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{paused:?}");
    assert_eq!(paused.body["status"], "paused");
    let while_paused = send(&bob, &channel, 3, "while paused").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got: BTreeSet<i64> = receiver.delivered().into_iter().collect();
    assert!(got.is_disjoint(&while_paused), "delivered while paused");
    let resumed = alice
        .call(Method::PATCH, &path, Some(json!({"status": "active"})))
        .await;
    assert_eq!(resumed.body["status"], "active");
    all.extend(while_paused);
    receiver.wait_for(&all).await;

    // Every event once at least, in seq order, with its idempotency key and a valid
    // signature; a member joining is an event too.
    let delivered = receiver.delivered();
    let repeats = assert_in_order(&delivered);
    let seqs: BTreeSet<i64> = delivered.iter().copied().collect();
    let (first, last) = (*seqs.first().unwrap(), *seqs.last().unwrap());
    assert_eq!(seqs.len() as i64, last - first + 1, "no gap: {seqs:?}");
    assert!(repeats <= 2, "{repeats} repeats without a crash");
    for g in receiver.got() {
        assert_eq!(g.key, format!("{channel}:{}", g.seq));
    }
    assert_signed(&receiver.got(), &secret);
    server.stop().await;
    receiver.stop().await;
}

/// A subscription whose endpoint keeps failing past the dead-after time turns dead and
/// is tried no more, until an admin resumes it; filtered types skip the rest.
async fn a_failing_subscription_dies_and_resumes_from_its_cursor() {
    let receiver = Receiver::start().await;
    let server = TestServer::start_with(|c| {
        allow_loopback(c);
        c.webhooks.dead_after = Duration::from_secs(2);
    })
    .await;
    let alice = server.client().register("alice").await;
    let channel = alice.create_channel("c", "group", &[]).await;
    let (sub_id, _) = subscribe(
        &alice,
        &channel,
        json!({"url": receiver.url(), "event_types": ["message.created"]}),
    )
    .await;
    receiver.set(Mode::Fail(500));
    let sent = send(&alice, &channel, 3, "m").await;
    let dead = until_status(&alice, &channel, |s| s["status"] == "dead").await;
    assert!(
        dead["last_error"].as_str().unwrap().contains("500"),
        "{dead}"
    );
    receiver.set(Mode::Ok);
    let tries = receiver.got().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.got().len(),
        tries,
        "a dead subscription is not tried"
    );
    // A rename is not a `message.created`: filtered out, though it moves the cursor.
    let renamed = alice
        .call(
            Method::PATCH,
            &format!("/v1/channels/{channel}"),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK);
    let resumed = alice
        .call(
            Method::PATCH,
            &format!("/v1/channels/{channel}/subscriptions/{sub_id}"),
            Some(json!({"status": "active"})),
        )
        .await;
    assert_eq!(resumed.body["status"], "active", "{resumed:?}");
    receiver.wait_for(&sent).await;
    until_status(&alice, &channel, |s| s["lag"] == 0).await;
    let types: BTreeSet<String> = receiver
        .got()
        .iter()
        .map(|g| {
            serde_json::from_slice::<Value>(&g.body).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(types, BTreeSet::from(["message.created".to_owned()]));
    server.stop().await;
}

crate::on_both_backends!(
    every_event_arrives_signed_in_order_through_failures,
    a_failing_subscription_dies_and_resumes_from_its_cursor,
);

/// Server-side request forgery: without an allow-list, URLs that are or resolve to
/// loopback, private or link-local addresses are refused, as are other schemes.
#[tokio::test]
async fn subscriptions_to_private_addresses_are_refused() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    let channel = alice.create_channel("c", "group", &[]).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "ftp://example.com/x",
        "http://user:pass@example.com/x",
        "not a url",
    ] {
        let a = alice
            .post(
                &format!("/v1/channels/{channel}/subscriptions"),
                json!({"url": url}),
            )
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{url}: {a:?}");
        assert_eq!(a.body["error"]["field"], "url", "{url}");
    }
    let a = alice
        .post(
            &format!("/v1/channels/{channel}/subscriptions"),
            json!({"url": "http://127.0.0.1:9/", "event_types": ["message.exploded"]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

/// The guard holds on every connection too, not only when a subscription is made: a
/// server restarted without the allow-list refuses to reach the loopback receiver, by
/// a name (`localhost`, through the resolver) or a literal address.
#[tokio::test]
async fn deliveries_to_private_addresses_are_refused_when_they_happen() {
    let receiver = Receiver::start().await;
    let server = TestServer::start_with(allow_loopback).await;
    let alice = server.client().register("alice").await;
    let channel = alice.create_channel("c", "group", &[]).await;
    let port = receiver.addr.port();
    for url in [
        format!("http://localhost:{port}/hook"),
        format!("http://127.0.0.1:{port}/hook"),
    ] {
        subscribe(&alice, &channel, json!({"url": url})).await;
    }
    let first = send(&alice, &channel, 1, "allowed").await;
    receiver.wait_for(&first).await;
    let server = server.restart().await;
    let alice = alice.with_base(&server.base());
    let before = receiver.got().len();
    send(&alice, &channel, 2, "refused").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let subs = alice
            .get(&format!("/v1/channels/{channel}/subscriptions"))
            .await
            .body["subscriptions"]
            .as_array()
            .unwrap()
            .clone();
        let refused = subs.iter().all(|s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("request forgery"))
        });
        if refused {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{subs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.got().len(), before, "nothing reached the receiver");
    server.stop().await;
}

/// A subscription is delivered under its creator's role: once they are no longer an
/// owner or admin of the channel it pauses, saying why, and another admin resuming it
/// takes it over.
#[tokio::test]
async fn a_removed_admins_subscription_pauses_until_another_admin_resumes_it() {
    let receiver = Receiver::start().await;
    let server = TestServer::start_with(allow_loopback).await;
    let alice = server.client().register("alice").await;
    let bob = server.client().register("bob").await;
    let channel = alice.create_channel("c", "group", &[&bob]).await;
    let member = format!("/v1/channels/{channel}/members/{}", bob.user_id);
    let promoted = alice
        .call(Method::PUT, &member, Some(json!({"role": "admin"})))
        .await;
    assert!(promoted.status.is_success(), "{promoted:?}");
    let (sub_id, _) = subscribe(&bob, &channel, json!({"url": receiver.url()})).await;
    let first = send(&alice, &channel, 2, "while bob is admin").await;
    receiver.wait_for(&first).await;
    let removed = alice.call(Method::DELETE, &member, None).await;
    assert!(removed.status.is_success(), "{removed:?}");
    let delivered = receiver.delivered().len();
    send(&alice, &channel, 2, "after bob left").await;
    let s = until_status(&alice, &channel, |s| s["status"] == "paused").await;
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("no longer an owner or admin"),
        "{s}"
    );
    assert_eq!(
        receiver.delivered().len(),
        delivered,
        "nothing more went out"
    );
    let resumed = alice
        .call(
            Method::PATCH,
            &format!("/v1/channels/{channel}/subscriptions/{sub_id}"),
            Some(json!({"status": "active"})),
        )
        .await;
    assert_eq!(
        resumed.body["creator_id"],
        alice.user_id.as_str(),
        "{resumed:?}"
    );
    until_status(&alice, &channel, |s| {
        s["lag"] == 0 && s["status"] == "active"
    })
    .await;
    server.stop().await;
}

/// SIGKILL mid-delivery: the restarted server resumes from the recorded cursor. Every
/// acknowledged message arrives; repeats are bounded by the window of events delivered
/// between two records of the cursor.
#[tokio::test]
async fn a_killed_server_resumes_delivery_from_its_cursor() {
    let receiver = Receiver::start().await;
    receiver.set(Mode::Slow(Duration::from_millis(10)));
    let dir = tempfile::tempdir().unwrap();
    let env = [("NATTER_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8")];
    let server = ServerProcess::start_with(dir.path(), "127.0.0.1:0", &[], &env).await;
    let alice = Client::new(&server.base()).register("alice").await;
    let channel = alice.create_channel("c", "group", &[]).await;
    subscribe(&alice, &channel, json!({"url": receiver.url()})).await;
    let acked = send(&alice, &channel, 150, "burst").await;
    // Kill once deliveries are under way, well before they are done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while receiver.delivered().len() < 45 {
        assert!(tokio::time::Instant::now() < deadline, "deliveries started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill().await;
    let before_kill = receiver.delivered().len();
    assert!(before_kill < acked.len(), "killed mid-delivery");
    receiver.set(Mode::Ok);
    let restarted = std::time::Instant::now();
    let server = ServerProcess::start_with(dir.path(), "127.0.0.1:0", &[], &env).await;
    receiver.wait_for(&acked).await;
    // Its own lease is the restarted node's at once: no wait for it to run out (30 s).
    assert!(
        restarted.elapsed() < Duration::from_secs(20),
        "delivery resumed after {:?}",
        restarted.elapsed()
    );
    let delivered = receiver.delivered();
    let repeats = assert_in_order(&delivered);
    assert!(
        repeats <= natter::delivery::WINDOW as usize + 1,
        "{repeats} repeats after one kill"
    );
    eprintln!("delivered {before_kill} before the kill; {repeats} repeated after it");
    server.terminate().await;
}
