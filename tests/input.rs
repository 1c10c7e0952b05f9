//! Input rules against look-alike and terminal-hostile input (issue 12), over real HTTP and
//! WebSockets on 127.0.0.1: control characters, ANSI escapes and bidi overrides refused,
//! invisible-only text empty, confusable usernames colliding, and `natter tail` escaping
//! what it prints.

mod common;

use std::process::Command;

use common::ws::*;
use common::{Client, TestServer};
use natter::client::Frame;
use reqwest::{Method, StatusCode};
use serde_json::json;

const HOSTILE_TEXTS: &[&str] = &[
    "\u{1b}[2J\u{1b}[31mfake system notice",
    "nul\u{0}byte",
    "carriage\rreturn",
    "del\u{7f}",
    "c1 csi\u{9b}2J",
    "invoice_\u{202E}fdp.exe",
    "isolate \u{2066}x\u{2069}",
];

async fn register_raw(anon: &Client, name: &str) -> (StatusCode, String, Option<String>) {
    let a = anon
        .post(
            "/v1/users",
            json!({"username": name, "password": "password-long-enough"}),
        )
        .await;
    let field = a.body["error"]["field"].as_str().map(str::to_owned);
    (a.status, a.code().to_owned(), field)
}

#[tokio::test]
async fn control_characters_ansi_escapes_and_bidi_overrides_are_refused_in_messages_and_names() {
    let server = TestServer::start().await;
    let anon = server.client();
    let a = anon.register("alice").await;
    let ch = a.create_channel("room", "group", &[]).await;
    let sent = a.send(&ch, "ok", None).await;
    let msg = sent.body["id"].as_str().unwrap().to_owned();
    let mut rt = connect(&a).await;
    for (i, text) in HOSTILE_TEXTS.iter().enumerate() {
        // REST send and edit.
        let r = a.send(&ch, text, None).await;
        assert_eq!(
            (r.status, r.code(), r.body["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, "invalid_field", Some("text")),
            "send {text:?}: {r:?}"
        );
        let e = a
            .call(
                Method::PATCH,
                &format!("/v1/channels/{ch}/messages/{msg}"),
                Some(json!({ "text": text })),
            )
            .await;
        assert_eq!(e.code(), "invalid_field", "edit {text:?}: {e:?}");
        // The WebSocket send path.
        let cid = format!("hostile-{i}");
        rt.send(id(&ch), text, &cid).await.unwrap();
        let frames = until(&mut rt, |f| {
            matches!(f, Frame::Error { client_id: Some(c), .. } | Frame::Ack { client_id: c, .. } if *c == cid)
        })
        .await;
        assert!(
            matches!(frames.last(), Some(Frame::Error { code, .. }) if code == "invalid_field"),
            "ws send {text:?}: {frames:?}"
        );
    }
    // Newlines and tabs stay allowed in messages, and so do bidi marks.
    let fine = a.send(&ch, "line one\n\tline two \u{200F}", None).await;
    assert_eq!(fine.status, StatusCode::CREATED, "{fine:?}");
    // Names: channel names on create and rename, usernames.
    for name in [
        "\u{1b}[31mred",
        "two\nlines",
        "tab\there",
        "\u{202E}lanigiro",
        "mark\u{200F}ed",
    ] {
        let c = a
            .post(
                "/v1/channels",
                json!({"name": name, "kind": "group", "members": []}),
            )
            .await;
        assert_eq!(
            (c.status, c.body["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("name")),
            "create {name:?}: {c:?}"
        );
        let r = a
            .call(
                Method::PATCH,
                &format!("/v1/channels/{ch}"),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(r.code(), "invalid_field", "rename {name:?}: {r:?}");
    }
    for name in ["ali\u{202E}ce", "bob\u{1b}[0m", "carol\u{85}"] {
        assert_eq!(
            register_raw(&anon, name).await,
            (
                StatusCode::BAD_REQUEST,
                "invalid_field".into(),
                Some("username".into())
            ),
            "{name:?}"
        );
    }
    // Nothing refused was stored.
    let texts = a.all_texts(&ch).await;
    assert_eq!(texts, ["ok", "line one\n\tline two \u{200F}"]);
    rt.close().await;
    server.stop().await;
}

#[tokio::test]
async fn zero_width_only_messages_and_names_are_empty() {
    let server = TestServer::start().await;
    let anon = server.client();
    let a = anon.register("alice").await;
    let ch = a.create_channel("room", "group", &[]).await;
    let msg = a.send(&ch, "ok", None).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut rt = connect(&a).await;
    for (i, invisible) in [
        "\u{200B}",
        "\u{200B}\u{200C}\u{200D}",
        " \u{2060}\u{FEFF} ",
        "\u{180E}\u{FE0F}",
        "\u{3164}",
    ]
    .into_iter()
    .enumerate()
    {
        let r = a.send(&ch, invisible, None).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "text_empty"),
            "{invisible:?}"
        );
        let e = a
            .call(
                Method::PATCH,
                &format!("/v1/channels/{ch}/messages/{msg}"),
                Some(json!({ "text": invisible })),
            )
            .await;
        assert_eq!(e.code(), "text_empty", "edit {invisible:?}");
        let cid = format!("invisible-{i}");
        rt.send(id(&ch), invisible, &cid).await.unwrap();
        let frames = until(&mut rt, |f| {
            matches!(f, Frame::Error { client_id: Some(c), .. } | Frame::Ack { client_id: c, .. } if *c == cid)
        })
        .await;
        assert!(
            matches!(frames.last(), Some(Frame::Error { code, .. }) if code == "text_empty"),
            "ws send {invisible:?}: {frames:?}"
        );
        let c = a
            .post(
                "/v1/channels",
                json!({"name": invisible, "kind": "group", "members": []}),
            )
            .await;
        assert_eq!(
            (c.code(), c.body["error"]["field"].as_str()),
            ("invalid_field", Some("name")),
            "channel named {invisible:?}"
        );
        let (status, _, field) = register_raw(&anon, &format!("{invisible}ab{invisible}")).await;
        assert_eq!(
            (status, field.as_deref()),
            (StatusCode::BAD_REQUEST, Some("username")),
            "username with {invisible:?}"
        );
    }
    rt.close().await;
    server.stop().await;
}

#[tokio::test]
async fn confusable_usernames_collide_and_punctuation_only_names_are_refused() {
    let server = TestServer::start().await;
    let anon = server.client();
    let alice = anon.register("alice").await;
    for look_alike in ["aIice", "ALICE", "ａｌｉｃｅ", "a1ice", "al.ice", "AL1CE"] {
        assert_eq!(
            register_raw(&anon, look_alike).await,
            (
                StatusCode::CONFLICT,
                "username_taken".into(),
                Some("username".into())
            ),
            "{look_alike}"
        );
    }
    for bad in ["...", "___", "123", "-bob", "bob.", "b..ob", "émile"] {
        let (status, code, field) = register_raw(&anon, bad).await;
        assert_eq!(
            (status, code.as_str(), field.as_deref()),
            (StatusCode::BAD_REQUEST, "invalid_field", Some("username")),
            "{bad}"
        );
    }
    // A name in another letter case or a compatible form is stored and shown folded.
    let bob = anon.register("ＢＯＢ_2").await;
    let me = bob.get("/v1/users/me").await;
    assert_eq!(me.body["username"], "bob_2");
    // Log in and look up under any folded-equal form; the name shown is the folded one.
    for typed in ["ALICE", "Alice", "ａｌｉｃｅ"] {
        let login = anon
            .post(
                "/v1/sessions",
                json!({"username": typed, "password": "password-alice"}),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{typed}: {login:?}");
        assert_eq!(login.body["user"]["username"], "alice");
        let found = bob.get(&format!("/v1/users?username={typed}")).await;
        assert_eq!(
            found.body["id"].as_str(),
            Some(alice.user_id.as_str()),
            "{typed}"
        );
    }
    // A look-alike is not a way in.
    let wrong = anon
        .post(
            "/v1/sessions",
            json!({"username": "aIice", "password": "password-alice"}),
        )
        .await;
    assert_eq!(wrong.code(), "invalid_credentials");
    server.stop().await;
}

/// `natter tail` prints what is in the store, including text stored before the rules
/// above existed: put it there directly in SQLite, then tail the channel with the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natter_tail_escapes_control_characters_ansi_escapes_and_bidi_controls() {
    let server = TestServer::start().await;
    let a = server.client().register("alice").await;
    let ch = a.create_channel("room", "group", &[]).await;
    let placeholder = a.send(&ch, "placeholder", None).await;
    let msg: i64 = placeholder.body["id"].as_str().unwrap().parse().unwrap();
    let seq = placeholder.body["seq"].as_i64().unwrap();
    let server = server
        .restart_with(|dir| {
            let db = rusqlite::Connection::open(dir.join("natter.db")).unwrap();
            let hostile = "\u{1b}[2J\u{1b}[31mred\u{9b}0m\ttab\nnew \u{202E}txt.exe \\ \u{200B}";
            let n = db
                .execute(
                    "UPDATE messages SET text = ?1 WHERE id = ?2",
                    rusqlite::params![hostile, msg],
                )
                .unwrap();
            assert_eq!(n, 1);
        })
        .await;
    let out = tokio::task::spawn_blocking({
        let base = server.base();
        let token = a.token.clone().unwrap();
        let after = (seq - 1).to_string();
        move || {
            Command::new(env!("CARGO_BIN_EXE_natter"))
                .args(["tail", "--url", &base, "--token", &token, "--channel", &ch])
                .args(["--after", &after, "--count", "1"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        format!(
            "#{seq} message.created {}: \\u{{1b}}[2J\\u{{1b}}[31mred\\u{{9b}}0m\\ttab\\nnew \\u{{202e}}txt.exe \\\\ \\u{{200b}}\n",
            a.user_id
        )
    );
    server.stop().await;
}
