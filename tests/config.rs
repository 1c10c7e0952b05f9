//! Configuration as an operator meets it: the `natter` binary with a TOML file,
//! environment variables and flags; refusals at start; `--help` and `--version`; feature
//! flags, also flipped by SIGHUP on a running server.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::TestServer;
use common::child::ServerProcess;
use common::ws::*;
use natter::client::{Frame, Incoming};
use serde_json::json;

/// Runs the binary with `args` and `env` (and no inherited `NATTER_*`).
fn natter(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("NATTER_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run natter")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `natter config`'s output as key → value text.
fn effective(args: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut all = vec!["config"];
    all.extend_from_slice(args);
    let out = natter(&all, env);
    assert!(out.status.success(), "{}", stderr(&out));
    let table: toml::Table = toml::from_str(&stdout(&out)).expect("natter config prints TOML");
    table.into_iter().map(|(k, v)| (k, v.to_string())).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn file_then_environment_then_flags_each_override_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "natter.toml",
        "write-queue = 100\nsend-rate = 5\ncache-mib = 7\nlog-format = \"json\"\n\
         features = [\"typing=off\"]\n",
    );
    let env = [
        ("NATTER_SEND_RATE", "6"),
        ("NATTER_CACHE_MIB", "8"),
        ("NATTER_READ_CONNECTIONS", "3"),
    ];
    let c = effective(&["--config", &file, "--cache-mib", "9"], &env);
    assert_eq!(c["write-queue"], "100", "file over default");
    assert_eq!(c["send-rate"], "6.0", "environment over file");
    assert_eq!(c["cache-mib"], "9", "flag over environment over file");
    assert_eq!(c["read-connections"], "3", "environment over default");
    assert_eq!(c["log-format"], "\"json\"", "file over default");
    assert_eq!(c["features"], "[\"typing=off\"]");
    assert_eq!(c["send-burst"], "40.0", "default when nobody sets it");
    // NATTER_CONFIG names the file too.
    let via_env = effective(&[], &[("NATTER_CONFIG", &file)]);
    assert_eq!(via_env["write-queue"], "100");
    // The printed config, given back as the file, is the same config.
    let out = natter(&["config", "--config", &file, "--cache-mib", "9"], &env);
    let printed = write(dir.path(), "printed.toml", &stdout(&out));
    assert_eq!(effective(&["--config", &printed], &[]), c);
}

#[test]
fn unknown_keys_and_bad_values_are_refused_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let cases = [
        ("write_queue = 5\n", "unknown key `write_queue`"),
        ("listen-on = \"0.0.0.0:1\"\n", "unknown key `listen-on`"),
        ("write-queue = \"many\"\n", "bad value for `write-queue`"),
        (
            "metrics-listen = \"nowhere\"\n",
            "bad value for `metrics-listen`",
        ),
        ("write-queue = 0\n", "invalid --write-queue"),
        ("send-rate = -1\n", "invalid --send-rate"),
        (
            "features = [\"teleport=on\"]\n",
            "invalid --features: unknown feature `teleport`",
        ),
        ("log = \"[[[\"\n", "invalid --log"),
        ("this is not toml", "config file"),
    ];
    for (i, (text, reason)) in cases.iter().enumerate() {
        let file = write(dir.path(), &format!("bad{i}.toml"), text);
        for command in ["config", "serve"] {
            let out = natter(
                &[
                    command,
                    "--config",
                    &file,
                    "--data-dir",
                    data,
                    "--listen",
                    "127.0.0.1:0",
                ],
                &[],
            );
            assert!(!out.status.success(), "{command} took {text:?}");
            let err = stderr(&out);
            assert!(err.contains(reason), "{command} {text:?}: {err}");
            assert!(
                err.contains(&file) || reason.starts_with("invalid"),
                "{err}"
            );
            assert!(!err.contains("Stack backtrace"), "{err}");
        }
    }
    // The server never started: no database was created.
    assert!(!dir.path().join("data").exists());
    // Bad flags and environment values are refused too.
    let out = natter(&["config", "--write-queue", "lots"], &[]);
    assert!(!out.status.success() && stderr(&out).contains("--write-queue"));
    let out = natter(&["config"], &[("NATTER_NODE_ID", "5000")]);
    assert!(!out.status.success() && stderr(&out).contains("--node-id"));
    let out = natter(&["config", "--no-such-flag"], &[]);
    assert!(!out.status.success());
    let huge = write(dir.path(), "huge.toml", &"# padding\n".repeat(200_000));
    let out = natter(&["config", "--config", &huge], &[]);
    assert!(!out.status.success() && stderr(&out).contains("at most 1048576"));
    let missing = natter(&["config", "--config", "/nonexistent/natter.toml"], &[]);
    assert!(!missing.status.success() && stderr(&missing).contains("/nonexistent/natter.toml"));
}

#[test]
fn serve_help_documents_every_option_with_its_environment_variable() {
    let help = stdout(&natter(&["serve", "--help"], &[]));
    let keys = effective(&[], &[]);
    for key in keys.keys().filter(|k| *k != "insecure-fast-password-hash") {
        assert!(help.contains(&format!("--{key} ")), "--{key} in {help}");
        let env = format!("NATTER_{}", key.to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "{env} in help");
    }
    for extra in ["--config", "--metrics-listen", "NATTER_CONFIG"] {
        assert!(help.contains(extra), "{extra}");
    }
}

#[test]
fn version_is_semver_and_the_changelog_has_it() {
    let out = stdout(&natter(&["--version"], &[]));
    let version = out
        .trim()
        .strip_prefix("natter ")
        .expect("natter <version>");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let parts: Vec<&str> = version.split(['.', '-', '+']).collect();
    assert!(parts.len() >= 3, "{version}");
    for p in &parts[..3] {
        assert!(
            p.parse::<u64>().is_ok() && (p == &"0" || !p.starts_with('0')),
            "{version}"
        );
    }
    let changelog =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("CHANGELOG.md"))
            .unwrap();
    assert!(
        changelog.contains(&format!("## [{version}]")),
        "CHANGELOG.md has a section for {version}"
    );
}

/// Polls `done` for up to 5 s.
async fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// Whether Bob sees Alice's typing before her next message arrives.
async fn typing_seen(a: &common::Client, b: &common::Client, ch: &str, n: u32) -> bool {
    let (mut ra, mut rb) = (connect(a).await, connect(b).await);
    ra.send_raw(&json!({"op": "typing", "channel_id": ch}).to_string())
        .await
        .unwrap();
    let text = format!("after typing {n}");
    assert!(a.send(ch, &text, None).await.status.is_success());
    let frames = until(
        &mut rb,
        |f| matches!(f, Frame::Event(e) if e.message.as_ref().is_some_and(|m| m.text == text)),
    )
    .await;
    if frames.iter().any(|f| matches!(f, Frame::Typing { .. })) {
        return true;
    }
    // A typing signal is not ordered with the channel's events (it comes over alice's
    // socket, the message over HTTP and the writer): on a loaded machine the message can
    // overtake it. Regression: this returned false then (a flaky failure).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(deadline, rb.next()).await {
            Ok(Ok(Incoming::Frame(Frame::Typing { .. }))) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn the_typing_flag_turns_typing_indicators_off() {
    let server = TestServer::start_with(|c| {
        c.features =
            std::sync::Arc::new(natter::config::Features::parse(&["typing=off".into()]).unwrap());
    })
    .await;
    let a = server.client().register("alice").await;
    let b = server.client().register("bob").await;
    let ch = a.create_channel("room", "group", &[&b]).await;
    assert!(!typing_seen(&a, &b, &ch, 1).await);
    server.stop().await;
    // Same steps, flag on (the default): the typing signal arrives first.
    let server = TestServer::start().await;
    let a = server.client().register("alice").await;
    let b = server.client().register("bob").await;
    let ch = a.create_channel("room", "group", &[&b]).await;
    assert!(typing_seen(&a, &b, &ch, 1).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_changed_feature_flags_to_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "natter.toml", "features = [\"typing=off\"]\n");
    let mut server = ServerProcess::start_with(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--config", &file],
        &[],
    )
    .await;
    let anon = common::Client::new(&server.base());
    let a = anon.register("alice").await;
    let b = anon.register("bob").await;
    let ch = a.create_channel("room", "group", &[&b]).await;
    let flag = r#"natter_feature_enabled{feature="typing"}"#;
    assert_eq!(metric(&a, flag).await, 0.0);
    assert!(!typing_seen(&a, &b, &ch, 1).await);
    write(dir.path(), "natter.toml", "features = [\"typing=on\"]\n");
    server.signal("HUP").await;
    let mut on = false;
    for _ in 0..100 {
        if metric(&a, flag).await == 1.0 {
            on = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(on, "the flag turned on: {}", server.log_text());
    assert!(typing_seen(&a, &b, &ch, 2).await);
    // A bad file on reload changes nothing, not even its valid part: the refusal is
    // logged (so the reload ran) and typing stays on.
    let refused = "SIGHUP: configuration refused";
    let refusals = || server.log_text().matches(refused).count();
    assert_eq!(refusals(), 0);
    write(
        dir.path(),
        "natter.toml",
        "features = [\"typing=off\", \"teleport=on\"]\n",
    );
    server.signal("HUP").await;
    assert!(
        wait_for(|| refusals() == 1).await,
        "the refusal is logged: {}",
        server.log_text()
    );
    assert!(
        server.log_text().contains("teleport"),
        "{}",
        server.log_text()
    );
    assert_eq!(metric(&a, flag).await, 1.0);
    assert!(typing_seen(&a, &b, &ch, 3).await);
    // And the next good file still applies.
    write(dir.path(), "natter.toml", "features = [\"typing=off\"]\n");
    server.signal("HUP").await;
    let mut off = false;
    for _ in 0..100 {
        if metric(&a, flag).await == 0.0 {
            off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(off, "the flag turned off again: {}", server.log_text());
    assert!(!typing_seen(&a, &b, &ch, 4).await);
    server.signal("TERM").await;
    assert!(server.wait(Duration::from_secs(30)).await.success());
}
