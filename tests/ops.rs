//! Running Natter in production: `/metrics` against a scripted workload, the alert rules
//! and dashboard against what is exported (and against promtool), request ids, and logs
//! that never hold a password or a token.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::child::ServerProcess;
use common::ws::*;
use common::{TestServer, scrape};
use natter::client::Frame;
use natter::ratelimit::Rate;
use reqwest::StatusCode;
use serde_json::json;

/// How much each sample moved between two scrapes (absent before counts as 0).
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, key: &str) -> f64 {
    let a = after
        .get(key)
        .unwrap_or_else(|| panic!("{key} is exported: {after:#?}"));
    a - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_workload_moves_the_counters_by_exactly_its_amounts() {
    let server = TestServer::start_with(|c| {
        c.limits.send = Rate {
            per_second: 0.001,
            burst: 6.0,
        };
    })
    .await;
    let anon = server.client();
    let alice = anon.register("alice").await;
    let bob = anon.register("bob").await;
    let ch = alice.create_channel("room", "group", &[&bob]).await;
    let mut rb = connect(&bob).await;
    let before = scrape(&server.base()).await;

    // Five new messages over REST, one resend of the first (idempotent: not new), one
    // send over the rate limit (burst 6: the resend took a token too), two unknown
    // routes, one history page, one wrong login.
    for i in 0..5 {
        let a = alice
            .send(&ch, &format!("m{i}"), Some(&format!("c{i}")))
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    }
    let again = alice.send(&ch, "m0", Some("c0")).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    let limited = alice.send(&ch, "one too many", None).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    for _ in 0..2 {
        assert_eq!(
            anon.get("/v1/nothing-here").await.status,
            StatusCode::NOT_FOUND
        );
    }
    let page = alice.get(&format!("/v1/channels/{ch}/messages")).await;
    assert_eq!(page.status, StatusCode::OK);
    let wrong = anon
        .post(
            "/v1/sessions",
            json!({"username": "alice", "password": "not her password"}),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    // Bob, online, gets exactly the five message events.
    let frames = until(
        &mut rb,
        |f| matches!(f, Frame::Event(e) if e.message.as_ref().is_some_and(|m| m.text == "m4")),
    )
    .await;
    assert_eq!(seqs(&frames, id(&ch)).len(), 5, "{frames:?}");

    let after = scrape(&server.base()).await;
    let d = |key: &str| delta(&before, &after, key);
    let messages = r#"route="/v1/channels/{id}/messages""#;
    let post = format!(r#"method="POST",{messages}"#);
    let get = format!(r#"method="GET",{messages}"#);
    let requests = |labels: &str, status: u16| {
        d(&format!(
            r#"natter_http_requests_total{{{labels},status="{status}"}}"#
        ))
    };
    assert_eq!(requests(&post, 201), 5.0);
    assert_eq!(requests(&post, 200), 1.0, "the idempotent resend");
    assert_eq!(requests(&post, 429), 1.0);
    assert_eq!(requests(&get, 200), 1.0);
    assert_eq!(requests(r#"method="GET",route="unmatched""#, 404), 2.0);
    assert_eq!(requests(r#"method="POST",route="/v1/sessions""#, 401), 1.0);
    // The latency histogram of a route counts every answer of that route.
    let latency = |labels: &str, series: &str| {
        d(&format!(
            "natter_http_request_duration_seconds_{series}{{{labels}}}"
        ))
    };
    assert_eq!(latency(&post, "count"), 7.0);
    assert_eq!(latency(&format!(r#"{post},le="+Inf""#), "bucket"), 7.0);
    assert_eq!(latency(&get, "count"), 1.0);
    assert_eq!(d("natter_messages_accepted_total"), 5.0);
    assert_eq!(d("natter_events_committed_total"), 5.0);
    assert_eq!(d("natter_events_delivered_total"), 5.0);
    assert!((0.0..=5.0).contains(&d("natter_events_delivered_by_fanout_total")));
    assert_eq!(d(r#"natter_rate_limited_total{limit="send"}"#), 1.0);
    assert_eq!(d(r#"natter_rate_limited_total{limit="login"}"#), 0.0);
    assert_eq!(d(r#"natter_rate_limited_total{limit="signup"}"#), 0.0);
    assert_eq!(d("natter_write_overloaded_total"), 0.0);
    assert_eq!(d("natter_ws_slow_consumers_total"), 0.0);
    assert_eq!(d("natter_commit_failures_total"), 0.0);
    // Commits: the five new messages and the resend (the store answers it with the
    // original) reach the writer; the send refused by the limit and the wrong login do
    // not. So 6 ops committed, in 1 to 6 commits.
    assert_eq!(d("natter_commit_batch_ops_sum"), 6.0);
    let commits = d("natter_commit_batch_ops_count");
    assert!((1.0..=6.0).contains(&commits), "{commits}");
    assert_eq!(d("natter_commit_duration_seconds_count"), commits);
    // Gauges.
    assert_eq!(after["natter_ws_connections"], 1.0);
    assert_eq!(after["natter_write_queue_depth"], 0.0);
    assert_eq!(after["natter_write_queue_capacity"], 16_384.0);
    assert_eq!(after["natter_ready"], 1.0);
    assert_eq!(after[r#"natter_feature_enabled{feature="typing"}"#], 1.0);
    assert_eq!(
        after[&format!(
            r#"natter_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
    for gauge in [
        "natter_process_resident_memory_bytes",
        "natter_process_open_fds",
        "natter_process_max_fds",
        "natter_data_dir_free_bytes",
        "natter_data_dir_size_bytes",
        "natter_db_bytes",
    ] {
        assert!(after[gauge] > 0.0, "{gauge}");
    }
    assert!(after["natter_process_cpu_seconds_total"] > 0.0);
    assert!(after.contains_key("natter_event_cache_hits_total"));
    assert!(after.contains_key("natter_event_cache_misses_total"));
    drop(rb);
    server.stop().await;
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_sane_caller_id_is_kept() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let kept = http
        .get(format!("{}/healthz", server.base()))
        .header("x-request-id", "lb-7f3a:42")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], "lb-7f3a:42");
    let mut seen = BTreeSet::new();
    for path in ["/healthz", "/v1/nothing", "/v1/channels", "/metrics"] {
        let a = http
            .get(format!("{}{path}", server.base()))
            .header("x-request-id", "bad id with spaces")
            .send()
            .await
            .unwrap();
        let id = a.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(id, "bad id with spaces", "{path}");
        assert!(seen.insert(id), "{path}: ids are unique");
    }
    server.stop().await;
}

/// Every `natter_*` name in `text`.
fn natter_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("natter_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary && end > start + "natter_".len() {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The names `/metrics` exports, by its `# TYPE` lines (histograms with their series).
async fn exported(base: &str) -> BTreeSet<String> {
    let text = common::metrics_text(base).await;
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The names in `named` that the server does not export.
fn not_exported<'a>(named: &'a BTreeSet<String>, exported: &BTreeSet<String>) -> Vec<&'a str> {
    named
        .iter()
        .filter(|n| !exported.contains(*n))
        .map(String::as_str)
        .collect()
}

fn ops_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn the_alerts_and_the_dashboard_use_only_exported_metrics() {
    let server = TestServer::start().await;
    let mut exported = exported(&server.base()).await;
    // What a server on PostgreSQL exports too (per-shard store metrics). Without
    // PostgreSQL here (and without CI), the dashboard's `natter_store_*` names are taken
    // on trust.
    let mut on_postgres = BTreeSet::new();
    let pg_present = common::pg::shared().is_some();
    // And a cluster node: the bus's and the dispatcher's metrics.
    let nats = common::nats::Nats::start();
    common::on_postgres(async {
        let pg = TestServer::start().await;
        on_postgres = self::exported(&pg.base()).await;
        pg.stop().await;
        if let Some(nats) = &nats {
            let url = nats.url();
            let node = TestServer::start_with(|c| c.bus = Some(vec![url])).await;
            on_postgres.extend(self::exported(&node.base()).await);
            node.stop().await;
        }
    })
    .await;
    if pg_present {
        assert!(
            on_postgres.contains("natter_store_shard_up"),
            "{on_postgres:?}"
        );
    }
    exported.extend(on_postgres);
    let alerts = natter_names(&ops_file("ops/prometheus/alerts.yml"));
    let dashboard_text = ops_file("ops/grafana/natter.json");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            used.extend(natter_names(t["expr"].as_str().unwrap()));
        }
    }
    assert!(alerts.len() >= 8, "{alerts:?}");
    assert!(used.len() >= 20, "{used:?}");
    let named = &alerts | &used;
    let mut missing = not_exported(&named, &exported);
    if !pg_present {
        missing.retain(|n| !n.starts_with("natter_store_"));
    }
    if !pg_present || nats.is_none() {
        missing.retain(|n| !n.starts_with("natter_bus_") && !n.starts_with("natter_cluster_"));
    }
    assert!(missing.is_empty(), "not exported: {missing:?}");
    // The check itself can fail: a rule with a misspelt name is caught.
    let typo = natter_names("rate(natter_mesages_accepted_total[5m]) > natter_ready");
    assert_eq!(
        not_exported(&typo, &exported),
        ["natter_mesages_accepted_total"]
    );
    // And the other way: the dashboard shows every metric the server exports.
    let unshown: Vec<_> = exported
        .iter()
        .filter(|n| {
            !used.contains(*n)
                && !n.ends_with("_bucket")
                && !n.ends_with("_sum")
                && !n.ends_with("_count")
        })
        .filter(|n| {
            let base = n.as_str();
            !used.iter().any(|u| u.starts_with(base))
        })
        .filter(|n| *n != "natter_ws_outbox_peak_bytes")
        .collect();
    assert!(
        unshown.is_empty(),
        "exported but not on the dashboard: {unshown:?}"
    );
    server.stop().await;
}

/// Runs promtool in `dir`; `None` if it is not installed.
fn promtool(dir: &Path, args: &[&str]) -> Option<std::process::Output> {
    match std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("run promtool: {e}"),
    }
}

#[test]
fn promtool_accepts_the_rules_their_unit_tests_and_the_dashboard_queries() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/prometheus");
    let check = promtool(&dir, &["check", "rules", "alerts.yml"]);
    if !common::available("promtool (apt-get install prometheus)", check.is_some()) {
        return;
    }
    let check = check.unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let tests = promtool(&dir, &["test", "rules", "alerts.test.yml"]).unwrap();
    assert!(
        tests.status.success(),
        "{}{}",
        String::from_utf8_lossy(&tests.stdout),
        String::from_utf8_lossy(&tests.stderr)
    );
    // The dashboard's queries, with Grafana's variables filled in, as recording rules:
    // promtool parses each one.
    let dashboard: serde_json::Value =
        serde_json::from_str(&ops_file("ops/grafana/natter.json")).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, panel) in dashboard["panels"].as_array().unwrap().iter().enumerate() {
        for (j, t) in panel["targets"].as_array().unwrap().iter().enumerate() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            rules.push_str(&format!(
                "      - record: dashboard:panel{i}:target{j}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("dashboard.yml"), rules).unwrap();
    let parsed = promtool(tmp.path(), &["check", "rules", "dashboard.yml"]).unwrap();
    assert!(
        parsed.status.success(),
        "{}{}",
        String::from_utf8_lossy(&parsed.stdout),
        String::from_utf8_lossy(&parsed.stderr)
    );
    // And promtool does fail on a broken rule, so the checks above mean something.
    std::fs::write(
        tmp.path().join("broken.yml"),
        "groups:\n  - name: x\n    rules:\n      - record: x:y\n        expr: rate(natter_x[5m]\n",
    )
    .unwrap();
    assert!(
        !promtool(tmp.path(), &["check", "rules", "broken.yml"])
            .unwrap()
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_whole_session_hold_no_password_or_token_and_name_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(
        dir.path(),
        "127.0.0.1:0",
        &["--log", "trace", "--log-format", "json"],
        &[],
    )
    .await;
    let anon = common::Client::new(&server.base());
    let password = "correct-horse-battery-staple-91";
    let wrong_password = "wrong-password-7731-zz";
    let as_carol = |path: &'static str, password: &'static str| {
        anon.post(path, json!({"username": "carol", "password": password}))
    };
    let created = as_carol("/v1/users", password).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let mut tokens = vec![created.body["token"].as_str().unwrap().to_owned()];
    let login = as_carol("/v1/sessions", password).await;
    assert_eq!(login.status, StatusCode::OK);
    tokens.push(login.body["token"].as_str().unwrap().to_owned());
    let wrong = as_carol("/v1/sessions", wrong_password).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let mut carol = anon.clone();
    carol.token = Some(tokens[1].clone());
    carol.user_id = login.body["user"]["id"].as_str().unwrap().to_owned();
    let dave = anon.register("dave").await;
    tokens.push(dave.token.clone().unwrap());
    let ch = carol.create_channel("room", "group", &[&dave]).await;
    // Real time: hello carries the token; a send and its delivery.
    let mut rc = connect(&carol).await;
    let mut rd = connect(&dave).await;
    rc.send_raw(
        &json!({"op": "send", "channel_id": ch, "text": "hello dave", "client_id": "c1"})
            .to_string(),
    )
    .await
    .unwrap();
    until(&mut rd, |f| matches!(f, Frame::Event(_))).await;
    // A bad token in a header and in a hello.
    let mut forged = anon.clone();
    forged.token = Some("forged-token-0123456789abcdef".into());
    assert_eq!(
        forged.get("/v1/channels").await.status,
        StatusCode::UNAUTHORIZED
    );
    // A request id we choose, to find in the log.
    let traced = reqwest::Client::new()
        .get(format!("{}/v1/channels", server.base()))
        .bearer_auth(&tokens[1])
        .header("x-request-id", "trace-me-4711")
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), StatusCode::OK);
    // Logout.
    let out = carol
        .call(reqwest::Method::DELETE, "/v1/sessions/current", None)
        .await;
    assert!(out.status.is_success(), "{out:?}");
    drop((rc, rd));
    let mut server = server;
    server.signal("TERM").await;
    assert!(server.wait(Duration::from_secs(30)).await.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.log_text();
    let answered = log.lines().filter(|l| l.contains("natter::access")).count();
    assert!(answered >= 8, "every request logged its answer: {log}");
    for secret in [password, wrong_password, "forged-token-0123456789abcdef"]
        .into_iter()
        .chain(tokens.iter().map(String::as_str))
    {
        assert!(!log.contains(secret), "the log holds a secret: {secret}");
    }
    // Every line is JSON; request lines carry their id.
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert!(
        log.lines()
            .any(|l| l.contains("\"id\":\"trace-me-4711\"") && l.contains("natter::access")),
        "the access line names the request id"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_limits_apply_per_forwarded_client() {
    let server = TestServer::start_with(common::behind_proxy_one_signup_each).await;
    let http = reqwest::Client::new();
    let signup = |name: &'static str, forwarded: &'static str| {
        let http = http.clone();
        let url = format!("{}/v1/users", server.base());
        async move {
            http.post(url)
                .header("x-forwarded-for", forwarded)
                .json(&json!({"username": name, "password": "password-long-enough"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(signup("first", "198.51.100.7").await, StatusCode::CREATED);
    assert_eq!(
        signup("second", "198.51.100.7").await,
        StatusCode::TOO_MANY_REQUESTS,
        "the same client through the proxy"
    );
    assert_eq!(
        signup("third", "203.0.113.9").await,
        StatusCode::CREATED,
        "another client through the same proxy"
    );
    server.stop().await;
}

#[tokio::test]
async fn metrics_listen_serves_metrics_on_its_own_address_only() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let at: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = TestServer::start_with(|c| c.metrics_listen = Some(at)).await;
    let main = reqwest::get(format!("{}/metrics", server.base()))
        .await
        .unwrap();
    assert_eq!(
        main.status(),
        StatusCode::NOT_FOUND,
        "not on the public address"
    );
    let mut scraped = None;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(format!("http://{at}/metrics")).await {
            scraped = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let scraped = scraped.expect("the metrics address answers");
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("natter_build_info{"));
    let other = reqwest::get(format!("http://{at}/v1/channels"))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND, "only /metrics there");
    server.stop().await;
}
