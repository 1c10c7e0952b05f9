//! Smoke runs of `natter bench` scenarios at small scale: their correctness checks hold
//! and their JSON and HTML reports are produced and parse. Speed is never asserted.

use natter::bench::RunArgs;
use natter::bench::fanout::{FanoutArgs, Rate, measure};

fn args(rate: Rate) -> FanoutArgs {
    FanoutArgs {
        channels: 2,
        members: 3,
        senders: 2,
        messages: 40,
        rate,
        duration: None,
        window: 8,
        text_bytes: 64,
        run: RunArgs::default(),
    }
}

#[tokio::test]
async fn fanout_delivers_every_message_once_in_order_and_reports_it() {
    for rate in [Rate::Max, Rate::Fixed(400.0)] {
        let report = measure(&args(rate)).await.unwrap();
        assert!(report.passed, "{}", report.to_text());
        assert_eq!(report.checks.total(), 0);
        let figure = |name: &str| {
            report
                .figures
                .iter()
                .find(|f| f.name == name)
                .unwrap()
                .value
        };
        assert_eq!(figure("messages acked"), 40.0);
        // 20 messages per channel, 3 receivers each, 2 channels.
        assert_eq!(figure("deliveries"), 120.0);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["scenario"], "fanout");
        assert_eq!(json["latencies"][1]["count"], 120);
        let html = report.to_html();
        assert!(html.starts_with("<!doctype html>") && html.matches("<svg").count() >= 4);
        assert!(!html.contains("<script") && !html.contains("src="));
    }
}

#[tokio::test]
async fn history_readers_see_every_message_once_and_report_it() {
    use natter::bench::history::{HistoryArgs, measure};
    let report = measure(&HistoryArgs {
        messages: 120,
        readers: 3,
        page: 7,
        duration: 0.3,
        run: RunArgs::default(),
    })
    .await
    .unwrap();
    assert!(report.passed, "{}", report.to_text());
    let passes = report
        .figures
        .iter()
        .find(|f| f.name == "full passes")
        .unwrap()
        .value;
    assert!(passes >= 3.0, "each reader finished at least one pass");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["scenario"], "history");
    assert!(report.to_html().contains("<svg"));
}

#[tokio::test]
async fn connections_open_idle_sockets_from_several_sources_and_report_memory() {
    use natter::bench::connections::{ConnectionsArgs, measure};
    let report = measure(&ConnectionsArgs {
        connections: 30,
        concurrency: 8,
        per_source: 10,
        hold: 0.0,
        server_pid: None,
        server_bin: Some(env!("CARGO_BIN_EXE_natter").into()),
        run: RunArgs::default(),
    })
    .await
    .unwrap();
    assert!(report.passed, "{}", report.to_text());
    let figure = |name: &str| {
        report
            .figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    };
    assert_eq!(figure("opened"), Some(30.0));
    assert!(
        figure("server memory per connection").is_some(),
        "read from the child's /proc"
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["scenario"], "connections");
    assert!(report.to_html().contains("<svg"));
}
