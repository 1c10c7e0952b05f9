//! Smoke runs of every `natter bench` scenario at small scale, each against a spawned
//! `natter serve` child: their correctness checks hold and their JSON and HTML reports
//! are produced and parse. Speed is never asserted.

mod common;

use natter::bench::RunArgs;
use natter::bench::fanout::{FanoutArgs, Rate, ShapeArgs, measure};
use natter::bench::report::Report;

fn run_args() -> RunArgs {
    RunArgs {
        spawn: true,
        server_bin: Some(env!("CARGO_BIN_EXE_natter").into()),
        quiet: true,
        ..RunArgs::default()
    }
}

fn figure(report: &Report, name: &str) -> Option<f64> {
    report
        .figures
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.value)
}

/// The JSON parses and names the scenario; the page is whole, has its charts and
/// fetches nothing.
fn check_outputs(report: &Report, scenario: &str, charts: usize) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["scenario"], scenario);
    assert_eq!(json["passed"], true);
    let html = report.to_html();
    assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
    assert!(
        html.matches("<svg").count() >= charts,
        "{scenario}: fewer than {charts} charts"
    );
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
    // Every chart draws its data, even from these runs of under two seconds, on axes with
    // labelled ticks (at least two on each, besides the unit and the x axis's title).
    for chart in html.split("<svg").skip(1) {
        let chart = &chart[..chart.find("</svg>").unwrap()];
        assert!(
            draws_data(chart),
            "{scenario}: a chart draws nothing: {chart}"
        );
        assert!(
            chart.matches("text-anchor=\"end\"").count() >= 2,
            "{scenario}: no y ticks: {chart}"
        );
        assert!(
            chart.matches("text-anchor=\"middle\"").count() >= 4,
            "{scenario}: no x ticks: {chart}"
        );
    }
    json
}

/// Bars, dots, or a line through at least two points.
fn draws_data(chart: &str) -> bool {
    let line = chart
        .split("<polyline")
        .skip(1)
        .filter_map(|p| p.split("points=\"").nth(1)?.split('"').next())
        .any(|points| points.split(' ').count() >= 2);
    line || chart.contains("<rect") || chart.contains("<circle")
}

fn fanout_args(rate: Rate) -> FanoutArgs {
    FanoutArgs {
        shape: ShapeArgs {
            channels: Some(2),
            members: Some(3),
            senders: Some(2),
            text_bytes: None,
        },
        messages: 40,
        rate,
        duration: None,
        window: 8,
        // Below the window: a closed loop also waits for the fan-out to deliver.
        lag: 1,
        run: run_args(),
    }
}

#[tokio::test]
async fn fanout_delivers_every_message_once_in_order_and_reports_it() {
    for rate in [Rate::Max, Rate::Fixed(400.0)] {
        let report = measure(&fanout_args(rate)).await.unwrap();
        assert!(report.passed, "{}", report.to_text());
        assert_eq!(report.checks.total(), 0);
        assert_eq!(figure(&report, "messages acked"), Some(40.0));
        // 20 messages per channel, 3 receivers each, 2 channels.
        assert_eq!(figure(&report, "deliveries"), Some(120.0));
        assert!(
            figure(&report, "server CPU per million deliveries").is_some(),
            "read from the spawned server's /metrics"
        );
        // Read from /proc in ticks: a short phase may round to none, but it is reported.
        assert!(figure(&report, "load CPU per million deliveries").is_some());
        let json = check_outputs(&report, "fanout", 4);
        assert_eq!(json["latencies"][1]["count"], 120);
        // On a schedule, how late each send went out (the load tool's own share of
        // every latency counted from the schedule); without one there is no lateness.
        let lateness = report.latencies.iter().find(|l| l.name == "send lateness");
        match rate {
            Rate::Max => assert!(lateness.is_none()),
            _ => assert_eq!(lateness.map(|l| l.count), Some(40)),
        }
    }
    // A schedule that rounds to no message is refused, not reported as a clean run.
    let empty = FanoutArgs {
        duration: Some(0.001),
        ..fanout_args(Rate::Fixed(100.0))
    };
    let refused = measure(&empty).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("nothing to send"),
        "{refused:#}"
    );
}

#[tokio::test]
async fn capacity_steps_up_until_a_bound_and_reports_the_headroom() {
    use natter::bench::capacity::{CapacityArgs, measure};
    let args = CapacityArgs {
        shape: ShapeArgs {
            channels: Some(2),
            members: Some(2),
            senders: Some(2),
            text_bytes: None,
        },
        start_rate: 40.0,
        growth: 2.0,
        step_secs: 0.5,
        max_steps: 2,
        refine: 1,
        max_p99_ms: 60_000.0,
        max_error_ratio: 0.01,
        run: run_args(),
    };
    // Bounds no step can break: every step sustains; the last rate is the answer.
    let report = measure(&args).await.unwrap();
    assert!(report.passed, "{}", report.to_text());
    assert_eq!(report.tables[0].rows.len(), 2, "{}", report.to_text());
    // Each step (a phase of the rig) has its own deliveries' latencies.
    for row in &report.tables[0].rows {
        let p99: f64 = row[4].parse().unwrap();
        assert!(p99 > 0.0, "{}", report.to_text());
    }
    assert_eq!(figure(&report, "highest sustainable rate"), Some(80.0));
    let peak = figure(&report, "peak to plan for (1.5x headroom)").unwrap();
    assert!((peak - 80.0 / 1.5).abs() < 1e-9);
    let json = check_outputs(&report, "capacity", 4);
    assert_eq!(json["tables"][0]["rows"][1][0], "80");

    // A bound every step breaks: none sustains, and the run halves the rate looking for
    // one, within its step budget; the stream is still checked and whole.
    let strict = CapacityArgs {
        max_p99_ms: 0.0,
        ..args
    };
    let report = measure(&strict).await.unwrap();
    assert!(report.passed, "{}", report.to_text());
    assert_eq!(figure(&report, "highest sustainable rate"), Some(0.0));
    assert_eq!(figure(&report, "lowest failing rate"), Some(20.0));
    let rates: Vec<&str> = report.tables[0]
        .rows
        .iter()
        .map(|r| r[0].as_str())
        .collect();
    assert_eq!(rates, ["40", "20"], "{}", report.to_text());
}

#[tokio::test]
async fn spike_reports_each_part_of_the_run_and_the_recovery() {
    use natter::bench::spike::{SpikeArgs, measure};
    let report = measure(&SpikeArgs {
        shape: ShapeArgs {
            channels: Some(2),
            members: Some(2),
            senders: Some(2),
            text_bytes: None,
        },
        rate: 40.0,
        burst: 5.0,
        before: 1.0,
        burst_secs: 1.0,
        after: 2.0,
        run: run_args(),
    })
    .await
    .unwrap();
    assert!(report.passed, "{}", report.to_text());
    // 40 + 200 + 80 messages, each to 2 receivers per channel.
    assert_eq!(figure(&report, "messages acked"), Some(320.0));
    assert_eq!(figure(&report, "deliveries"), Some(640.0));
    let parts: Vec<&str> = report.tables[0]
        .rows
        .iter()
        .map(|r| r[0].as_str())
        .collect();
    assert!(parts.contains(&"burst"), "{}", report.to_text());
    assert!(
        report
            .figures
            .iter()
            .any(|f| f.name.starts_with("recovery after the burst")),
        "{}",
        report.to_text()
    );
    check_outputs(&report, "spike", 6);
}

#[tokio::test]
async fn history_readers_see_every_message_once_and_report_it() {
    use natter::bench::history::{HistoryArgs, measure};
    let report = measure(&HistoryArgs {
        messages: 120,
        readers: 3,
        page: 7,
        duration: 0.3,
        run: run_args(),
    })
    .await
    .unwrap();
    assert!(report.passed, "{}", report.to_text());
    assert!(
        figure(&report, "full passes").unwrap() >= 3.0,
        "each reader finished at least one pass"
    );
    check_outputs(&report, "history", 1);
}

#[tokio::test]
async fn search_bench_times_every_kind_and_finds_only_the_users_channels() {
    use natter::bench::search::{SearchArgs, measure};
    let report = measure(&SearchArgs {
        messages: 3_000,
        channels: 12,
        users: 6,
        channels_per_user: 3,
        queries: 70,
        concurrency: 2,
        data_dir: None,
        run: RunArgs {
            quiet: true,
            ..RunArgs::default()
        },
    })
    .await
    .unwrap();
    assert!(report.passed, "{}", report.to_text());
    assert_eq!(report.latencies.len(), 7);
    for l in &report.latencies {
        assert_eq!(l.count, 10, "{}: every search of the kind answered", l.name);
    }
    // Common words are in most messages: those searches fill their pages.
    let rows = &report.tables[0].rows;
    let common: f64 = rows[0][2].parse().unwrap();
    assert!(common >= 19.0, "{rows:?}");
    check_outputs(&report, "search", 1);
}

#[tokio::test]
async fn connections_open_idle_sockets_from_several_sources_and_report_memory() {
    use natter::bench::connections::{ConnectionsArgs, measure};
    let report = measure(&ConnectionsArgs {
        connections: 30,
        concurrency: 8,
        per_source: 10,
        hold: 0.0,
        run: run_args(),
    })
    .await
    .unwrap();
    assert!(report.passed, "{}", report.to_text());
    assert_eq!(figure(&report, "opened"), Some(30.0));
    assert!(
        figure(&report, "server memory per connection").is_some(),
        "read from the child's /proc"
    );
    check_outputs(&report, "connections", 1);
}

/// The floor's bare server (a child process): every record acked, and delivered to every
/// member of its channel once and in order, two senders sharing a channel, each round's
/// 71 sockets written by two threads, the commits on a writer thread; the server's CPU
/// read.
#[test]
fn floor_acks_and_delivers_every_record_once_in_order() {
    use natter::bench::floor::{FloorArgs, measure};
    let args = FloorArgs {
        channels: 2,
        members: 70,
        senders: 3,
        rate: 300.0,
        duration: 1.0,
        record_bytes: 64,
        send_threads: 2,
        no_sync: false,
        writer_thread: true,
        data_dir: None,
        json: false,
        report: None,
        server_bin: Some(env!("CARGO_BIN_EXE_natter").into()),
        serve_log: None,
    };
    let report = measure(&args).unwrap();
    assert!(report.passed, "{}", report.to_text());
    assert_eq!(figure(&report, "messages acked"), Some(300.0));
    assert_eq!(figure(&report, "deliveries"), Some(300.0 * 70.0));
    assert!(figure(&report, "server CPU per message").is_some_and(|us| us > 0.0));
    check_outputs(&report, "floor", 3);
    let lateness = report.latencies.iter().find(|l| l.name == "send lateness");
    assert_eq!(lateness.map(|l| l.count), Some(300));
    // Flags out of range are refused before anything starts.
    for bad in [
        FloorArgs {
            send_threads: 3,
            ..args.clone()
        },
        FloorArgs {
            record_bytes: 8,
            ..args.clone()
        },
        FloorArgs {
            rate: f64::INFINITY,
            ..args.clone()
        },
    ] {
        assert!(measure(&bad).is_err());
    }
}

#[tokio::test]
async fn store_and_http_acknowledge_every_send_and_report_it() {
    use natter::bench::{HttpArgs, WriteArgs, measure_http, measure_store};
    let args = HttpArgs {
        write: WriteArgs {
            messages: 300,
            concurrency: 16,
            channels: 3,
            text_bytes: 20,
            mention: false,
            words: false,
            data_dir: None,
            rate: None,
        },
        run: run_args(),
    };
    let store = measure_store(&HttpArgs {
        run: RunArgs {
            spawn: false,
            ..run_args()
        },
        ..args.clone()
    })
    .await
    .unwrap();
    let http = measure_http(&args).await.unwrap();
    // Every text mentioning its sender: each send takes the store's slow path.
    let mut mentioning = args.clone();
    mentioning.write.mention = true;
    mentioning.run.spawn = false;
    let mentions = measure_store(&mentioning).await.unwrap();
    assert!(
        mentions.to_json().contains("\"mention\""),
        "{}",
        mentions.to_json()
    );
    for (report, scenario) in [(&store, "store"), (&http, "http"), (&mentions, "store")] {
        assert!(report.passed, "{}", report.to_text());
        assert_eq!(figure(report, "messages acked"), Some(300.0));
        let json = check_outputs(report, scenario, 1);
        assert_eq!(json["latencies"][0]["count"], 300);
    }
    let refused = measure_store(&HttpArgs {
        run: RunArgs {
            url: vec!["http://127.0.0.1:9".into()],
            ..RunArgs::default()
        },
        ..args
    })
    .await;
    assert!(
        refused.is_err(),
        "store runs in process; a --url is refused"
    );
}

#[tokio::test]
async fn store_bench_runs_on_postgres_at_a_fixed_rate() {
    use natter::bench::{HttpArgs, WriteArgs, measure_store};
    let Some(shards) = common::pg::databases(2).await else {
        return;
    };
    let report = measure_store(&HttpArgs {
        write: WriteArgs {
            messages: 400,
            concurrency: 64,
            channels: 4,
            text_bytes: 20,
            mention: false,
            words: false,
            data_dir: None,
            rate: Some(400.0),
        },
        run: RunArgs {
            spawn: false,
            store: Some(shards.join(",")),
            ..run_args()
        },
    })
    .await
    .unwrap();
    assert_eq!(figure(&report, "messages acked"), Some(400.0));
    // 400 sends at 400/s take about a second: the schedule held them back.
    let elapsed = figure(&report, "elapsed").unwrap();
    assert!(elapsed >= 0.99, "{elapsed}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

/// `natter bench … --json | jq .figures`: stdout holds the report's JSON and nothing else.
/// The table goes to stderr, with the progress bars and the log (the bench's own, at
/// debug here, and the spawned server's, which it reads from the child's stderr).
#[test]
fn bench_json_leaves_stdout_to_the_report_alone() {
    let fanout = [
        "--channels",
        "1",
        "--members",
        "3",
        "--senders",
        "1",
        "--messages",
        "20",
    ];
    let store = ["--messages", "200", "--channels", "2", "--concurrency", "8"];
    for (scenario, flags, acked) in [("fanout", &fanout[..], 20.0), ("store", &store[..], 200.0)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_natter"))
            .args(["bench", scenario, "--json"])
            .args(flags)
            .env("NATTER_LOG", "debug")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{scenario}: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{scenario}: stdout is not one JSON value ({e}): {stdout}"));
        assert_eq!(json["scenario"], scenario);
        assert_eq!(json["passed"], true);
        let figures = json["figures"].as_array().expect("`.figures` is a list");
        assert!(
            figures
                .iter()
                .any(|f| f["name"] == "messages acked" && f["value"] == acked && f["unit"] == ""),
            "{scenario}: {stdout}"
        );
        assert!(
            stderr.contains(&format!("{scenario}: passed")),
            "{scenario}: the table goes to stderr: {stderr}"
        );
    }
}

/// A member that fails mid-phase fails the run at once, while its sender still sends:
/// here the member's sessions are ended from another login, so the server closes its
/// WebSocket with 4001, a close the receivers do not resume from. (A phase that failed
/// only at its end would run on through the ten million messages of its closed loop.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_fails_mid_phase_fails_the_run_at_once() {
    use std::time::{Duration, Instant};
    // SQLite whatever the suite runs on: the test reads the server's file.
    let server = common::TestServer::start_with(|c| c.store = None).await;
    let args = FanoutArgs {
        shape: ShapeArgs {
            channels: Some(1),
            members: Some(3),
            senders: Some(1),
            text_bytes: None,
        },
        messages: 10_000_000,
        rate: Rate::Max,
        duration: None,
        window: 8,
        lag: 64,
        run: RunArgs {
            url: vec![server.base()],
            quiet: true,
            ..RunArgs::default()
        },
    };
    let run = tokio::spawn(async move { measure(&args).await });
    // Once the first member is registered and a few hundred messages went out...
    let path = server.dir.path().join("natter.db");
    let begun = Instant::now();
    let member = loop {
        assert!(
            begun.elapsed() < Duration::from_secs(60),
            "the run never got going"
        );
        assert!(!run.is_finished(), "the run ended first");
        tokio::time::sleep(Duration::from_millis(20)).await;
        // (The server creates its file as it starts.)
        let Ok(db) = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        ) else {
            continue;
        };
        let Ok(member) = db.query_row(
            "SELECT username FROM users WHERE username LIKE 'bench-%-r0'",
            [],
            |r| r.get::<_, String>(0),
        ) else {
            continue;
        };
        let posts: i64 = db
            .query_row(
                "SELECT (SELECT count(*) FROM commit_log) + (SELECT count(*) FROM messages)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if posts > 300 {
            break member;
        }
    };
    // ...its other sessions end: its WebSocket is closed with 4001.
    let mut other = natter::client::Api::new(&server.base());
    other.login(&member, "bench-password").await.unwrap();
    let ended = reqwest::Client::new()
        .delete(format!("{}/v1/sessions/others", server.base()))
        .bearer_auth(other.token().unwrap())
        .send()
        .await
        .unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    let failed = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run failed at once, not at the end of its messages")
        .unwrap()
        .unwrap_err();
    let failed = format!("{failed:#}");
    assert!(
        failed.contains("a receiver failed") && failed.contains("closed with 4001"),
        "{failed}"
    );
}
