//! End-to-end tests of API v1 over real HTTP on 127.0.0.1.

mod common;

use common::{Client, TestServer, assert_gap_free};
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn register_login_logout_and_revoked_token() {
    let server = TestServer::start().await;
    let anon = server.client();
    let alice = anon.register("Alice").await;

    let me = alice.get("/v1/users/me").await;
    assert_eq!(
        (me.status, me.body["username"].as_str()),
        (StatusCode::OK, Some("alice")),
        "shown folded"
    );
    assert!(me.body["created_at"].as_str().unwrap().ends_with('Z'));

    let dup = anon
        .post(
            "/v1/users",
            json!({"username": "alice", "password": "password-x"}),
        )
        .await;
    assert_eq!(
        (dup.status, dup.code()),
        (StatusCode::CONFLICT, "username_taken")
    );

    let login = anon
        .post(
            "/v1/sessions",
            json!({"username": "ALICE", "password": "password-Alice"}),
        )
        .await;
    assert_eq!(login.status, StatusCode::OK, "{login:?}");
    assert_eq!(
        login.body["user"]["id"].as_str(),
        Some(alice.user_id.as_str())
    );
    let second_token = login.body["token"].as_str().unwrap().to_owned();
    assert_ne!(Some(second_token.clone()), alice.token);

    for (name, password) in [("alice", "wrong-password"), ("nobody", "password-Alice")] {
        let bad = anon
            .post(
                "/v1/sessions",
                json!({"username": name, "password": password}),
            )
            .await;
        assert_eq!(
            (bad.status, bad.code()),
            (StatusCode::UNAUTHORIZED, "invalid_credentials")
        );
    }

    let out = alice
        .call(Method::DELETE, "/v1/sessions/current", None)
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    let revoked = alice.get("/v1/users/me").await;
    assert_eq!(
        (revoked.status, revoked.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    // The other session is untouched.
    let mut other = alice.clone();
    other.token = Some(second_token);
    assert_eq!(other.get("/v1/users/me").await.status, StatusCode::OK);
    assert_eq!(anon.get("/v1/users/me").await.code(), "unauthorized");
    let mut forged = anon.clone();
    forged.token = Some("f".repeat(64));
    assert_eq!(forged.get("/v1/channels").await.code(), "unauthorized");
}

async fn user_lookup_by_id_and_name() {
    let server = TestServer::start().await;
    let anon = server.client();
    let a = anon.register("lookup_a").await;
    let b = anon.register("lookup.B").await;
    let by_id = a.get(&format!("/v1/users/{}", b.user_id)).await;
    assert_eq!(by_id.body["username"], "lookup.b");
    let by_name = a.get("/v1/users?username=LOOKUP.b").await;
    assert_eq!(by_name.body["id"].as_str(), Some(b.user_id.as_str()));
    assert_eq!(
        a.get("/v1/users?username=ghost").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(a.get("/v1/users/123").await.code(), "not_found");
    assert_eq!(a.get("/v1/users/not-a-number").await.code(), "not_found");
    let missing = a.get("/v1/users").await;
    assert_eq!(
        (missing.code(), missing.body["error"]["field"].as_str()),
        ("invalid_field", Some("username"))
    );
}

async fn input_rules_give_clear_errors() {
    let server = TestServer::start().await;
    let anon = server.client();
    for (body, field) in [
        (
            json!({"username": "ab", "password": "password1"}),
            "username",
        ),
        (
            json!({"username": "bad name", "password": "password1"}),
            "username",
        ),
        (
            json!({"username": "okname", "password": "short"}),
            "password",
        ),
        (
            json!({"username": "okname", "password": "x".repeat(1025)}),
            "password",
        ),
        (json!({"username": "okname"}), "password"),
        (json!({"username": 7, "password": "password1"}), "username"),
    ] {
        let a = anon.post("/v1/users", body.clone()).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::BAD_REQUEST, "invalid_field"),
            "{body}"
        );
        assert_eq!(a.body["error"]["field"].as_str(), Some(field), "{body}");
    }
    let broken = anon
        .raw(Method::POST, "/v1/users", Some(b"{\"username\":".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        (broken.status, broken.code()),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );

    let user = anon.register("limits").await;
    let ch = user.create_channel("limits", "group", &[]).await;
    let empty = user.send(&ch, " \n ", None).await;
    assert_eq!(
        (empty.status, empty.code()),
        (StatusCode::BAD_REQUEST, "text_empty")
    );
    let long = user.send(&ch, &"x".repeat(4001), None).await;
    assert_eq!(
        (long.status, long.code()),
        (StatusCode::BAD_REQUEST, "text_too_long")
    );
    assert_eq!(
        user.send(&ch, &"é".repeat(4000), None).await.status,
        StatusCode::CREATED
    );
    let cid = user.send(&ch, "hi", Some(&"c".repeat(65))).await;
    assert_eq!(
        (cid.code(), cid.body["error"]["field"].as_str()),
        ("invalid_field", Some("client_id"))
    );
    let huge = user
        .raw(
            Method::POST,
            &format!("/v1/channels/{ch}/messages"),
            Some(vec![b' '; 70 * 1024]),
        )
        .await
        .unwrap();
    assert_eq!(
        (huge.status, huge.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let limit = user
        .get(&format!("/v1/channels/{ch}/messages?limit=0"))
        .await;
    assert_eq!(
        (limit.code(), limit.body["error"]["field"].as_str()),
        ("invalid_field", Some("limit"))
    );
    let limit = user
        .get(&format!("/v1/channels/{ch}/messages?limit=201"))
        .await;
    assert_eq!(limit.code(), "invalid_field");
    let kind = user
        .post("/v1/channels", json!({"name": "x", "kind": "dm"}))
        .await;
    assert_eq!(kind.body["error"]["field"].as_str(), Some("kind"));
    let unknown_member = user
        .post(
            "/v1/channels",
            json!({"name": "x", "kind": "group", "members": ["12345"]}),
        )
        .await;
    assert_eq!(
        unknown_member.body["error"]["field"].as_str(),
        Some("members")
    );
    let typo = user
        .post(
            &format!("/v1/channels/{ch}/messages"),
            json!({"text": "x", "clientId": "a"}),
        )
        .await;
    assert_eq!(typo.code(), "invalid_field");

    let nowhere = user.get("/v1/no/such/route").await;
    assert_eq!(
        (nowhere.status, nowhere.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let wrong_method = user.call(Method::PUT, "/v1/users/me", None).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.code(), "method_not_allowed");
}

async fn group_channel_messages_edit_delete_and_idempotency() {
    let server = TestServer::start().await;
    let anon = server.client();
    let owner = anon.register("owner").await;
    let member = anon.register("member").await;
    let outsider = anon.register("outsider").await;
    let ch = owner.create_channel("general", "group", &[&member]).await;

    let sent = member.send(&ch, "hello <b>world</b>", Some("c-1")).await;
    assert_eq!(sent.status, StatusCode::CREATED, "{sent:?}");
    let m = &sent.body;
    assert_eq!(
        (
            m["text"].as_str(),
            m["client_id"].as_str(),
            m["deleted"].as_bool()
        ),
        (Some("hello <b>world</b>"), Some("c-1"), Some(false))
    );
    assert_eq!(m["author_id"].as_str(), Some(member.user_id.as_str()));
    assert_eq!(m["seq"], 3, "after two member.added events");

    let again = member.send(&ch, "a different text", Some("c-1")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, sent.body, "the original message, unchanged");
    assert_eq!(member.all_messages(&ch).await.len(), 1, "still one row");

    let id = m["id"].as_str().unwrap();
    let path = format!("/v1/channels/{ch}/messages/{id}");
    let not_author = owner
        .call(Method::PATCH, &path, Some(json!({"text": "hijack"})))
        .await;
    assert_eq!(
        (not_author.status, not_author.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let edited = member
        .call(Method::PATCH, &path, Some(json!({"text": "edited"})))
        .await;
    assert_eq!(
        (edited.status, edited.body["text"].as_str()),
        (StatusCode::OK, Some("edited"))
    );
    assert!(edited.body["edited_at"].is_string());

    assert_eq!(
        outsider.call(Method::DELETE, &path, None).await.status,
        StatusCode::NOT_FOUND
    );
    let other = owner.send(&ch, "owner's", None).await;
    let other_path = format!(
        "/v1/channels/{ch}/messages/{}",
        other.body["id"].as_str().unwrap()
    );
    assert_eq!(
        member.call(Method::DELETE, &other_path, None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        owner.call(Method::DELETE, &path, None).await.status,
        StatusCode::NO_CONTENT,
        "owner deletes any"
    );

    let history = member.all_messages(&ch).await;
    assert_eq!(history.len(), 2);
    assert_eq!(
        (history[0]["deleted"].as_bool(), history[0]["text"].as_str()),
        (Some(true), Some(""))
    );
    assert_eq!(
        history[0]["id"].as_str(),
        Some(id),
        "the tombstone keeps its id"
    );
    assert_eq!(history[0]["seq"], 3, "and its seq");

    let events = member.all_events(&ch).await;
    assert_eq!(assert_gap_free(&events), 6);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "member.added",
            "member.added",
            "message.created",
            "message.edited",
            "message.created",
            "message.deleted"
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e["channel_id"].as_str() == Some(ch.as_str()) && e["at"].is_string())
    );
    assert!(
        !serde_json::to_string(&events).unwrap().contains("hello"),
        "deleted text is redacted from the log"
    );

    let got = member.get(&format!("/v1/channels/{ch}")).await;
    assert_eq!(
        (got.body["kind"].as_str(), got.body["last_seq"].as_i64()),
        (Some("group"), Some(6))
    );
}

async fn non_members_see_nothing() {
    let server = TestServer::start().await;
    let anon = server.client();
    let owner = anon.register("privowner").await;
    let stranger = anon.register("stranger").await;
    let ch = owner.create_channel("private", "group", &[]).await;
    let sent = owner.send(&ch, "secret", None).await;
    let mid = sent.body["id"].as_str().unwrap();
    for a in [
        stranger.get(&format!("/v1/channels/{ch}")).await,
        stranger.get(&format!("/v1/channels/{ch}/messages")).await,
        stranger.get(&format!("/v1/channels/{ch}/events")).await,
        stranger.get(&format!("/v1/channels/{ch}/members")).await,
        stranger.send(&ch, "let me in", None).await,
        stranger
            .call(
                Method::PUT,
                &format!("/v1/channels/{ch}/read"),
                Some(json!({"seq": 1})),
            )
            .await,
        stranger
            .call(
                Method::PUT,
                &format!("/v1/channels/{ch}/members/{}", stranger.user_id),
                None,
            )
            .await,
        stranger
            .call(
                Method::PATCH,
                &format!("/v1/channels/{ch}/messages/{mid}"),
                Some(json!({"text": "x"})),
            )
            .await,
        stranger
            .call(
                Method::DELETE,
                &format!("/v1/channels/{ch}/messages/{mid}"),
                None,
            )
            .await,
        stranger.get("/v1/channels/999999/messages").await,
    ] {
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{a:?}"
        );
    }
    assert_eq!(
        stranger.get("/v1/channels").await.body["channels"],
        json!([])
    );
}

async fn broadcast_channels_let_only_owner_and_admins_post() {
    let server = TestServer::start().await;
    let anon = server.client();
    let owner = anon.register("caster").await;
    let reader = anon.register("listener").await;
    let ch = owner
        .create_channel("announcements", "broadcast", &[&reader])
        .await;
    let denied = reader.send(&ch, "me too", None).await;
    assert_eq!(
        (denied.status, denied.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(
        owner.send(&ch, "news", None).await.status,
        StatusCode::CREATED
    );
    let promote = owner
        .call(
            Method::PUT,
            &format!("/v1/channels/{ch}/members/{}", reader.user_id),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(promote.status, StatusCode::NO_CONTENT);
    assert_eq!(
        reader.send(&ch, "now I can", None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(reader.all_messages(&ch).await.len(), 2);
}

async fn members_are_added_promoted_and_removed() {
    let server = TestServer::start().await;
    let anon = server.client();
    let owner = anon.register("boss").await;
    let a = anon.register("alpha").await;
    let b = anon.register("bravo").await;
    let c = anon.register("charlie").await;
    let ch = owner.create_channel("team", "group", &[&a]).await;
    let member_path = |u: &Client| format!("/v1/channels/{ch}/members/{}", u.user_id);

    let by_member = a.call(Method::PUT, &member_path(&b), None).await;
    assert_eq!(
        (by_member.status, by_member.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(
        owner
            .call(
                Method::PUT,
                &member_path(&a),
                Some(json!({"role": "admin"}))
            )
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        a.call(Method::PUT, &member_path(&b), None).await.status,
        StatusCode::NO_CONTENT,
        "admins add members"
    );
    assert_eq!(
        owner
            .call(
                Method::PUT,
                &member_path(&c),
                Some(json!({"role": "member"}))
            )
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let bad_role = owner
        .call(
            Method::PUT,
            &member_path(&c),
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(bad_role.body["error"]["field"].as_str(), Some("role"));
    assert_eq!(
        owner
            .call(
                Method::PUT,
                &format!("/v1/channels/{ch}/members/424242"),
                None
            )
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let members = b.get(&format!("/v1/channels/{ch}/members")).await;
    let roles: Vec<(String, String)> = members.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"]["username"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut expected = [
        ("boss", "owner"),
        ("alpha", "admin"),
        ("bravo", "member"),
        ("charlie", "member"),
    ];
    expected.sort();
    let mut roles_sorted = roles.clone();
    roles_sorted.sort();
    assert_eq!(
        roles_sorted,
        expected
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );

    let listed = b.get("/v1/channels").await;
    let mine = &listed.body["channels"][0];
    assert_eq!(
        (mine["id"].as_str(), mine["role"].as_str()),
        (Some(ch.as_str()), Some("member"))
    );

    assert_eq!(
        b.call(Method::DELETE, &member_path(&c), None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        a.call(Method::DELETE, &member_path(&c), None).await.status,
        StatusCode::NO_CONTENT,
        "admin removes"
    );
    assert_eq!(
        b.call(Method::DELETE, &member_path(&b), None).await.status,
        StatusCode::NO_CONTENT,
        "member leaves"
    );
    assert_eq!(
        b.get(&format!("/v1/channels/{ch}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.send(&ch, "still here?", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        owner
            .call(Method::DELETE, &member_path(&owner), None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    let renamed = a
        .call(
            Method::PATCH,
            &format!("/v1/channels/{ch}"),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(renamed.body["name"].as_str(), Some("renamed"));
    let events = owner.all_events(&ch).await;
    assert_gap_free(&events);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "member.added",
            "member.added",
            "member.updated",
            "member.added",
            "member.added",
            "member.removed",
            "member.removed",
            "channel.updated"
        ]
    );
    assert_eq!(events[2]["role"].as_str(), Some("admin"));
    assert_eq!(events[5]["user_id"].as_str(), Some(c.user_id.as_str()));
}

async fn dms_are_one_per_pair() {
    let server = TestServer::start().await;
    let anon = server.client();
    let a = anon.register("dm_one").await;
    let b = anon.register("dm_two").await;
    let first = a.post("/v1/dms", json!({"user_id": b.user_id})).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        (first.body["kind"].as_str(), &first.body["name"]),
        (Some("dm"), &json!(null))
    );
    let again = b.post("/v1/dms", json!({"user_id": a.user_id})).await;
    assert_eq!(
        (again.status, &again.body["id"]),
        (StatusCode::OK, &first.body["id"])
    );
    let ch = first.body["id"].as_str().unwrap();
    assert_eq!(b.send(ch, "hi a", None).await.status, StatusCode::CREATED);
    assert_eq!(a.all_messages(ch).await[0]["text"], "hi a");
    let third = anon.register("dm_three").await;
    assert_eq!(
        a.call(
            Method::PUT,
            &format!("/v1/channels/{ch}/members/{}", third.user_id),
            None
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        a.post("/v1/dms", json!({"user_id": a.user_id}))
            .await
            .code(),
        "invalid_field"
    );
    assert_eq!(
        a.post("/v1/dms", json!({"user_id": "777"})).await.status,
        StatusCode::NOT_FOUND
    );
}

async fn read_markers_and_unread_counts() {
    let server = TestServer::start().await;
    let anon = server.client();
    let a = anon.register("reader_a").await;
    let b = anon.register("reader_b").await;
    let ch = a.create_channel("unread", "group", &[&b]).await;
    let unread = |c: Client| {
        let ch = ch.clone();
        async move {
            let l = c.get("/v1/channels").await;
            let v = l.body["channels"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["id"].as_str() == Some(&ch))
                .unwrap()
                .clone();
            (
                v["read_seq"].as_i64().unwrap(),
                v["unread"].as_i64().unwrap(),
            )
        }
    };
    let mut seqs = Vec::new();
    for i in 0..4 {
        seqs.push(
            a.send(&ch, &format!("m{i}"), None).await.body["seq"]
                .as_i64()
                .unwrap(),
        );
    }
    b.send(&ch, "mine", None).await;
    assert_eq!(unread(b.clone()).await.1, 4, "own messages never count");
    assert_eq!(unread(a.clone()).await.1, 1);
    let read_path = format!("/v1/channels/{ch}/read");
    let mark = |seq: i64| b.call(Method::PUT, &read_path, Some(json!({"seq": seq})));
    assert_eq!(mark(seqs[1]).await.status, StatusCode::NO_CONTENT);
    assert_eq!(unread(b.clone()).await, (seqs[1], 2));
    mark(seqs[0]).await;
    assert_eq!(
        unread(b.clone()).await,
        (seqs[1], 2),
        "the marker never moves back"
    );
    let del = a
        .call(
            Method::DELETE,
            &format!(
                "/v1/channels/{ch}/messages/{}",
                a.all_messages(&ch).await[3]["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(
        unread(b.clone()).await.1,
        1,
        "deleted messages are not unread"
    );
    mark(1_000_000).await;
    let last = b.get(&format!("/v1/channels/{ch}")).await.body["last_seq"]
        .as_i64()
        .unwrap();
    assert_eq!(unread(b.clone()).await, (last, 0));
    assert_eq!(mark(-1).await.code(), "invalid_field");
}

async fn events_endpoint_is_gap_free_across_pages() {
    let server = TestServer::start().await;
    let a = server.client().register("eventer").await;
    let ch = a.create_channel("log", "group", &[]).await;
    for i in 0..30 {
        a.send(&ch, &format!("{i}"), None).await;
    }
    let page = a
        .get(&format!("/v1/channels/{ch}/events?after_seq=10&limit=7"))
        .await;
    let seqs: Vec<i64> = page.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        (seqs, page.body["has_more"].as_bool()),
        ((11..=17).collect(), Some(true))
    );
    let events = a.all_events(&ch).await;
    assert_eq!(assert_gap_free(&events), 31);
    assert_eq!(events[30]["message"]["text"], "29");
    let default_page = a.get(&format!("/v1/channels/{ch}/events")).await;
    assert_eq!(default_page.body["events"].as_array().unwrap().len(), 31);
}

async fn send_rate_limit_answers_429_with_retry_after() {
    let server = TestServer::start_with(|c| {
        c.limits.send = natter::ratelimit::Rate {
            per_second: 0.5,
            burst: 3.0,
        }
    })
    .await;
    let a = server.client().register("chatty").await;
    let ch = a.create_channel("spam", "group", &[]).await;
    for _ in 0..3 {
        assert_eq!(a.send(&ch, "x", None).await.status, StatusCode::CREATED);
    }
    let limited = a.send(&ch, "x", None).await;
    assert_eq!(
        (limited.status, limited.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    let secs: u64 = limited.retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&secs), "{secs}");
    assert_eq!(
        a.all_messages(&ch).await.len(),
        3,
        "the refused send wrote nothing"
    );
}

async fn failed_logins_are_throttled_per_username_and_per_ip() {
    let server = TestServer::start_with(|c| {
        c.limits.login_failures_per_user.burst = 3.0;
        c.limits.login_failures_per_ip.burst = 5.0;
    })
    .await;
    let anon = server.client();
    anon.register("victim").await;
    for _ in 0..3 {
        let a = anon
            .post(
                "/v1/sessions",
                json!({"username": "victim", "password": "guess-guess"}),
            )
            .await;
        assert_eq!(a.code(), "invalid_credentials");
    }
    let limited = anon
        .post(
            "/v1/sessions",
            json!({"username": "VICTIM", "password": "password-victim"}),
        )
        .await;
    assert_eq!(
        (limited.status, limited.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert!(limited.retry_after.is_some());
    // Two more failures on other names exhaust this address's budget.
    for name in ["ghost1", "ghost2"] {
        assert_eq!(
            anon.post(
                "/v1/sessions",
                json!({"username": name, "password": "password"})
            )
            .await
            .code(),
            "invalid_credentials"
        );
    }
    let by_ip = anon
        .post(
            "/v1/sessions",
            json!({"username": "ghost3", "password": "password"}),
        )
        .await;
    assert_eq!(by_ip.code(), "rate_limited");
}

async fn a_full_write_queue_answers_503_overloaded() {
    let server = TestServer::start_with(|c| c.write_queue = 2).await;
    let a = server.client().register("flood").await;
    let ch = a.create_channel("flood", "group", &[]).await;
    // Hold the writes from outside, so the writer stalls and its queue fills.
    let hold = server.hold_writes(ch.parse().unwrap()).await;
    let sends: Vec<_> = (0..12)
        .map(|i| {
            let a = a.clone();
            let ch = ch.clone();
            tokio::spawn(async move {
                a.send(&ch, &format!("m{i}"), Some(&format!("flood-{i}")))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    hold.release().await;
    let mut created = Vec::new();
    let mut overloaded = 0;
    for s in sends {
        let a = s.await.unwrap();
        match a.status {
            StatusCode::CREATED => created.push(a.body["client_id"].as_str().unwrap().to_owned()),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(
                    (a.code(), a.retry_after.as_deref()),
                    ("overloaded", Some("1"))
                );
                overloaded += 1;
            }
            other => panic!("unexpected {other}: {a:?}"),
        }
    }
    assert!(overloaded >= 1, "some sends were refused");
    let mut stored: Vec<String> = a
        .all_messages(&ch)
        .await
        .iter()
        .map(|m| m["client_id"].as_str().unwrap().to_owned())
        .collect();
    stored.sort();
    created.sort();
    assert_eq!(stored, created, "exactly the acknowledged sends are stored");
}

async fn health_and_openapi() {
    let server = TestServer::start().await;
    let c = server.client();
    let health = c.get("/healthz").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (StatusCode::OK, Some("ok"))
    );
    assert_eq!(c.get("/readyz").await.status, StatusCode::OK);
    let spec = c.get("/v1/openapi.json").await;
    assert_eq!(spec.body["openapi"], "3.1.0");
    let paths = spec.body["paths"].as_object().unwrap();
    for p in [
        "/v1/users",
        "/v1/sessions",
        "/v1/channels/{id}/messages",
        "/v1/channels/{id}/events",
        "/v1/dms",
        "/readyz",
    ] {
        assert!(paths.contains_key(p), "{p} missing from the spec");
    }
    assert!(spec.body["paths"]["/v1/channels/{id}/messages"]["post"].is_object());
}

crate::on_both_backends!(
    register_login_logout_and_revoked_token,
    user_lookup_by_id_and_name,
    input_rules_give_clear_errors,
    group_channel_messages_edit_delete_and_idempotency,
    non_members_see_nothing,
    broadcast_channels_let_only_owner_and_admins_post,
    members_are_added_promoted_and_removed,
    dms_are_one_per_pair,
    read_markers_and_unread_counts,
    events_endpoint_is_gap_free_across_pages,
    send_rate_limit_answers_429_with_retry_after,
    failed_logins_are_throttled_per_username_and_per_ip,
    a_full_write_queue_answers_503_overloaded,
    health_and_openapi,
    reactions_are_idempotent_bounded_and_for_members_only,
    threads_reply_count_page_and_survive_their_root,
    mentions_are_counted_listed_and_cleared_by_reading,
    search_finds_only_the_callers_channels,
    search_errors_snippets_edits_and_deletes,
);

/// Every message's text, as search finds it for `c`, paging through all of it.
async fn search_all(c: &Client, q: &str, sort: &str) -> Vec<String> {
    let mut texts = Vec::new();
    let mut cursor = String::new();
    for _ in 0..100 {
        let page = c
            .get(&format!("/v1/search?q={q}&sort={sort}&limit=7{cursor}"))
            .await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        for hit in page.body["results"].as_array().unwrap() {
            texts.push(hit["message"]["text"].as_str().unwrap().to_owned());
        }
        match page.body["next"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return texts,
        }
    }
    panic!("search kept paging");
}

async fn search_finds_only_the_callers_channels() {
    let server = TestServer::start().await;
    let anon = server.client();
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(anon.register(&format!("finder{i}")).await);
    }
    // Twelve channels, each with its owner and a varying set of the others; every message
    // names its channel and has the common word.
    let mut channels = Vec::new();
    for c in 0..12usize {
        let owner = c % users.len();
        let members: Vec<&Client> = (0..users.len())
            .filter(|&u| u != owner && (u * 7 + c * 3) % 4 != 0)
            .map(|u| &users[u])
            .collect();
        let member_idx: Vec<usize> = std::iter::once(owner)
            .chain((0..users.len()).filter(|&u| u != owner && (u * 7 + c * 3) % 4 != 0))
            .collect();
        let ch = users[owner]
            .create_channel(&format!("room{c}"), "group", &members)
            .await;
        for n in 0..3 {
            let sent = users[owner]
                .send(&ch, &format!("common word room{c} number{n}"), None)
                .await;
            assert_eq!(sent.status, StatusCode::CREATED, "{sent:?}");
        }
        channels.push((ch, member_idx));
    }
    for (u, user) in users.iter().enumerate() {
        for sort in ["newest", "relevance"] {
            let mut got = search_all(user, "common", sort).await;
            let mut want: Vec<String> = channels
                .iter()
                .enumerate()
                .filter(|(_, (_, members))| members.contains(&u))
                .flat_map(|(c, _)| (0..3).map(move |n| format!("common word room{c} number{n}")))
                .collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "user {u}, {sort}");
        }
        // Naming a channel they are not in is a 404, as everywhere.
        for (ch, members) in &channels {
            let one = user
                .get(&format!("/v1/search?q=common&channel_id={ch}"))
                .await;
            if members.contains(&u) {
                assert_eq!(one.status, StatusCode::OK);
                assert_eq!(one.body["results"].as_array().unwrap().len(), 3);
            } else {
                assert_eq!(one.status, StatusCode::NOT_FOUND, "{one:?}");
            }
        }
    }
}

async fn search_errors_snippets_edits_and_deletes() {
    let server = TestServer::start().await;
    let anon = server.client();
    let alice = anon.register("seekalice").await;
    let bob = anon.register("seekbob").await;
    let ch = alice.create_channel("seek", "group", &[&bob]).await;
    let sent = alice
        .send(&ch, "Deploy the Café release on Friday", None)
        .await;
    let id = sent.body["id"].as_str().unwrap().to_owned();
    let found = bob.get("/v1/search?q=deploy%20friday").await;
    assert_eq!(found.status, StatusCode::OK, "{found:?}");
    let hit = &found.body["results"][0];
    assert_eq!(hit["message"]["id"], json!(id));
    assert_eq!(hit["message"]["channel_id"], json!(ch));
    assert_eq!(
        hit["snippet"],
        json!([
            {"text": "Deploy", "hit": true},
            {"text": " the Café release on "},
            {"text": "Friday", "hit": true},
        ])
    );
    // Bad queries and parameters are 400s that say what is wrong, never 500s.
    for (path, code, says) in [
        ("/v1/search?q=%22open", "invalid_query", "not closed"),
        ("/v1/search?q=-only", "invalid_query", "no word"),
        ("/v1/search?q=ab*", "invalid_query", "at least 3"),
        ("/v1/search?q=", "invalid_query", "no word"),
        ("/v1/search", "invalid_field", "required"),
        ("/v1/search?q=x&sort=oldest", "invalid_field", "sort"),
        ("/v1/search?q=x&cursor=abc", "invalid_field", "cursor"),
        (
            "/v1/search?q=x&sort=relevance&cursor=999999",
            "invalid_field",
            "cursor",
        ),
        ("/v1/search?q=x&limit=0", "invalid_field", "limit"),
        ("/v1/search?q=x&channel_id=nope", "invalid_field", "channel"),
    ] {
        let r = bob.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {r:?}");
        assert_eq!(r.code(), code, "{path}: {r:?}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
    }
    // FTS and tsquery operators in a query are words, not syntax.
    for q in [
        "NEAR(a%20b)",
        "a%20OR%20b",
        "%27x%27%20%26%20y",
        "x:*",
        "(((",
        "%5C",
    ] {
        let r = bob.get(&format!("/v1/search?q={q}")).await;
        assert!(
            r.status == StatusCode::OK || r.code() == "invalid_query",
            "{q}: {r:?}"
        );
    }
    assert_eq!(
        bob.get("/v1/search?q=x&channel_id=12345").await.status,
        StatusCode::NOT_FOUND
    );
    // An edit re-indexes; a delete takes it out.
    let edited = alice
        .call(
            Method::PATCH,
            &format!("/v1/channels/{ch}/messages/{id}"),
            Some(json!({"text": "Ship the Café release on Monday"})),
        )
        .await;
    assert_eq!(edited.status, StatusCode::OK, "{edited:?}");
    assert_eq!(
        search_all(&bob, "friday", "newest").await,
        Vec::<String>::new()
    );
    assert_eq!(
        search_all(&bob, "monday", "newest").await,
        ["Ship the Café release on Monday"]
    );
    let gone = alice
        .call(
            Method::DELETE,
            &format!("/v1/channels/{ch}/messages/{id}"),
            None,
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{gone:?}");
    assert!(search_all(&bob, "monday", "newest").await.is_empty());
    assert!(search_all(&bob, "release", "relevance").await.is_empty());
}

/// A search that would read past its budget is refused with a clear error, not left to
/// run (on SQLite: a budget of nothing interrupts the first index read).
#[tokio::test]
async fn a_search_past_its_budget_is_a_422() {
    let server = TestServer::start_with(|c| {
        c.limits.rules.search_budget = std::time::Duration::ZERO;
    })
    .await;
    let anon = server.client();
    let alice = anon.register("broadalice").await;
    let ch = alice.create_channel("broad", "group", &[]).await;
    for i in 0..300 {
        alice.send(&ch, &format!("everywhere {i}"), None).await;
    }
    let r = alice.get("/v1/search?q=everywhere&sort=relevance").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    assert_eq!(r.code(), "search_too_broad");
}

/// The Rust client library's calls of the conversation features, against a server.
#[tokio::test]
async fn the_client_library_replies_reacts_and_searches() {
    let server = TestServer::start().await;
    let mut alice = natter::client::Api::new(&server.base());
    alice
        .register("libalice", "correct horse battery")
        .await
        .unwrap();
    let ch = alice.create_channel("lib", "group", &[]).await.unwrap();
    let root = alice
        .send(ch, "Where is the release plan?", None)
        .await
        .unwrap();
    let reply = alice
        .reply(ch, root.id, "The plan is in the wiki", Some("r1"))
        .await
        .unwrap();
    assert_eq!(reply.thread_root_id, Some(root.id));
    alice.react(ch, root.id, "👍", true).await.unwrap();
    let found = alice.search("plan", None).await.unwrap();
    let ids: Vec<i64> = found.iter().map(|f| f.message.id).collect();
    assert_eq!(ids, [reply.id, root.id]);
    assert_eq!(found[0].marked(), "The [plan] is in the wiki");
    assert!(alice.search("wiki", Some(ch)).await.unwrap().len() == 1);
    let err = alice.search("\"unclosed", None).await.unwrap_err();
    assert!(err.to_string().contains("invalid_query"), "{err}");
}

/// Searches have a rate of their own per user.
#[tokio::test]
async fn searches_are_rate_limited_per_user() {
    let server = TestServer::start_with(|c| {
        c.limits.search = natter::ratelimit::Rate {
            per_second: 0.001,
            burst: 3.0,
        };
    })
    .await;
    let anon = server.client();
    let alice = anon.register("rapidalice").await;
    let bob = anon.register("rapidbob").await;
    for _ in 0..3 {
        assert_eq!(alice.get("/v1/search?q=x").await.status, StatusCode::OK);
    }
    let r = alice.get("/v1/search?q=x").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert_eq!(r.code(), "rate_limited");
    assert_eq!(bob.get("/v1/search?q=x").await.status, StatusCode::OK);
}

async fn reactions_are_idempotent_bounded_and_for_members_only() {
    let server = TestServer::start_with(|c| c.limits.rules.max_reactions_per_message = 3).await;
    let anon = server.client();
    let owner = anon.register("reactowner").await;
    let member = anon.register("reactmember").await;
    let stranger = anon.register("reactstranger").await;
    // A broadcast channel: a plain member may react though they may not post.
    let ch = owner.create_channel("news", "broadcast", &[&member]).await;
    let sent = owner.send(&ch, "react to this", None).await;
    let mid = sent.body["id"].as_str().unwrap().to_owned();
    let base = format!("/v1/channels/{ch}/messages/{mid}/reactions");
    let put = |c: &Client, emoji: &str| {
        let (c, path) = (c.clone(), format!("{base}/{emoji}"));
        async move { c.call(Method::PUT, &path, None).await }
    };

    // The same reaction twice is one, and one event.
    for _ in 0..2 {
        let a = put(&member, "👍").await;
        assert_eq!(a.status, StatusCode::NO_CONTENT, "{a:?}");
    }
    // An emoji without its variation selector is the same emoji, stored one way.
    assert_eq!(put(&owner, "❤").await.status, StatusCode::NO_CONTENT);
    assert_eq!(put(&owner, "❤️").await.status, StatusCode::NO_CONTENT);
    assert_eq!(put(&owner, "👍").await.status, StatusCode::NO_CONTENT);
    let list = member.get(&base).await;
    assert_eq!(list.status, StatusCode::OK, "{list:?}");
    assert_eq!(
        list.body["reactions"],
        json!([
            {"emoji": "👍", "count": 2, "me": true},
            {"emoji": "❤️", "count": 1, "me": false},
        ])
    );
    // The history shows them too, as the caller sees them.
    let history = owner.get(&format!("/v1/channels/{ch}/messages")).await;
    assert_eq!(
        history.body["messages"][0]["reactions"],
        json!([
            {"emoji": "👍", "count": 2, "me": true},
            {"emoji": "❤️", "count": 1, "me": true},
        ])
    );
    // Who reacted, in order, paged.
    let first = member.get(&format!("{base}/👍?limit=1")).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(
        first.body["users"][0]["user"]["id"].as_str(),
        Some(member.user_id.as_str())
    );
    let next = first.body["next"].as_str().unwrap();
    let rest = member.get(&format!("{base}/👍?limit=1&after={next}")).await;
    assert_eq!(
        rest.body["users"][0]["user"]["id"].as_str(),
        Some(owner.user_id.as_str())
    );
    assert!(rest.body.get("next").is_none(), "{rest:?}");

    // Bad input: not an emoji, two emoji, text; a bad cursor.
    for bad in ["x", "👍👍", ":thumbsup:", "a%20b"] {
        let a = put(&member, bad).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{bad}: {a:?}"
        );
        assert!(
            a.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("emoji"),
            "{a:?}"
        );
    }
    let a = member.get(&format!("{base}/👍?after=soon")).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");

    // The bound on different emoji per message.
    assert_eq!(put(&member, "🎉").await.status, StatusCode::NO_CONTENT);
    let over = put(&member, "🚀").await;
    assert_eq!(
        (over.status, over.code()),
        (StatusCode::CONFLICT, "too_many_reactions"),
        "{over:?}"
    );
    assert_eq!(put(&owner, "🎉").await.status, StatusCode::NO_CONTENT);

    // Taking back: twice succeeds, once changes.
    for _ in 0..2 {
        let a = member
            .call(Method::DELETE, &format!("{base}/👍"), None)
            .await;
        assert_eq!(a.status, StatusCode::NO_CONTENT, "{a:?}");
    }

    // Non-members see nothing and change nothing.
    for a in [
        put(&stranger, "👍").await,
        stranger
            .call(Method::DELETE, &format!("{base}/👍"), None)
            .await,
        stranger.get(&base).await,
        stranger.get(&format!("{base}/👍")).await,
    ] {
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{a:?}"
        );
    }
    // A message of another channel, or none, is not found.
    let other = stranger.create_channel("elsewhere", "group", &[]).await;
    let a = stranger
        .call(
            Method::PUT,
            &format!("/v1/channels/{other}/messages/{mid}/reactions/👍"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");

    // Each change is one event, in order; a deleted message keeps its reactions' events
    // but takes no more reactions.
    let kinds: Vec<(String, String)> = member
        .all_events(&ch)
        .await
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("reaction."))
        .map(|e| {
            assert_eq!(e["message_id"].as_str(), Some(mid.as_str()));
            (
                e["type"].as_str().unwrap().to_owned(),
                e["emoji"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |k: &str, e: &str| (k.to_owned(), e.to_owned());
    assert_eq!(
        kinds,
        [
            expect("reaction.added", "👍"),
            expect("reaction.added", "❤️"),
            expect("reaction.added", "👍"),
            expect("reaction.added", "🎉"),
            expect("reaction.added", "🎉"),
            expect("reaction.removed", "👍"),
        ]
    );
    let deleted = owner
        .call(
            Method::DELETE,
            &format!("/v1/channels/{ch}/messages/{mid}"),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(put(&member, "👍").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        member.get(&base).await.status,
        StatusCode::NOT_FOUND,
        "a deleted message has no reactions to list"
    );
    server.stop().await;
}

async fn threads_reply_count_page_and_survive_their_root() {
    let server = TestServer::start().await;
    let anon = server.client();
    let owner = anon.register("threadowner").await;
    let member = anon.register("threadmember").await;
    let stranger = anon.register("threadstranger").await;
    let ch = owner.create_channel("talk", "group", &[&member]).await;
    let root = owner.send(&ch, "a question", None).await.body;
    let root_id = root["id"].as_str().unwrap().to_owned();
    let reply = |c: &Client, text: &str, client_id: Option<&str>| {
        let (c, ch, root_id) = (c.clone(), ch.clone(), root_id.clone());
        let mut body = json!({"text": text, "thread_root_id": root_id});
        if let Some(cid) = client_id {
            body["client_id"] = json!(cid);
        }
        async move { c.post(&format!("/v1/channels/{ch}/messages"), body).await }
    };
    let first = reply(&member, "an answer", Some("r-1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(
        first.body["thread_root_id"].as_str(),
        Some(root_id.as_str())
    );
    let again = reply(&member, "an answer, resent", Some("r-1")).await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &first.body));
    for i in 0..4 {
        assert_eq!(reply(&owner, &format!("more {i}"), None).await.status, 201);
    }
    // The root carries the count and the newest reply's time; a plain message has neither.
    let got = owner
        .get(&format!("/v1/channels/{ch}/messages/{root_id}"))
        .await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body["reply_count"], 5);
    assert!(got.body["last_reply_at"].is_string());
    assert!(got.body.get("thread_root_id").is_none());
    // The thread, paged both ways.
    let path = format!("/v1/channels/{ch}/threads/{root_id}/messages");
    let newest = member.get(&format!("{path}?limit=2")).await;
    assert_eq!(newest.status, StatusCode::OK, "{newest:?}");
    assert_eq!(newest.body["root"]["id"].as_str(), Some(root_id.as_str()));
    let texts = |page: &serde_json::Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(texts(&newest.body), ["more 2", "more 3"]);
    assert_eq!(newest.body["has_more"], true);
    let oldest_seq = newest.body["messages"][0]["seq"].as_i64().unwrap();
    let older = member
        .get(&format!("{path}?limit=10&before_seq={oldest_seq}"))
        .await;
    assert_eq!(texts(&older.body), ["an answer", "more 0", "more 1"]);
    assert_eq!(older.body["has_more"], false);
    let forward = member.get(&format!("{path}?after_seq=0&limit=3")).await;
    assert_eq!(texts(&forward.body), ["an answer", "more 0", "more 1"]);
    assert_eq!(forward.body["has_more"], true);
    // Clients that ignore threads see replies in history and the log, marked.
    let history = member.all_messages(&ch).await;
    assert_eq!(history.len(), 6);
    assert!(
        history[1..]
            .iter()
            .all(|m| m["thread_root_id"] == json!(root_id))
    );
    // Refusals.
    let reply_id = first.body["id"].as_str().unwrap();
    let to_reply = member
        .post(
            &format!("/v1/channels/{ch}/messages"),
            json!({"text": "nested", "thread_root_id": reply_id}),
        )
        .await;
    assert_eq!(
        (to_reply.status, to_reply.code()),
        (StatusCode::BAD_REQUEST, "invalid_field"),
        "{to_reply:?}"
    );
    assert_eq!(
        member
            .get(&format!("/v1/channels/{ch}/threads/{reply_id}/messages"))
            .await
            .status,
        StatusCode::NOT_FOUND,
        "a reply is no root"
    );
    let bad = member
        .post(
            &format!("/v1/channels/{ch}/messages"),
            json!({"text": "x", "thread_root_id": "zero"}),
        )
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_field")
    );
    // A root that is not there is the body's fault: the channel in the path is there.
    let missing = member
        .post(
            &format!("/v1/channels/{ch}/messages"),
            json!({"text": "x", "thread_root_id": "12345"}),
        )
        .await;
    assert_eq!(
        (
            missing.status,
            missing.code(),
            missing.body["error"]["field"].as_str()
        ),
        (
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("thread_root_id")
        ),
        "{missing:?}"
    );
    for a in [
        reply(&stranger, "let me in", None).await,
        stranger.get(&path).await,
        stranger
            .get(&format!("/v1/channels/{ch}/messages/{root_id}"))
            .await,
    ] {
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{a:?}"
        );
    }
    // Deleting the root keeps its thread readable (and open).
    let deleted = owner
        .call(
            Method::DELETE,
            &format!("/v1/channels/{ch}/messages/{root_id}"),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let after = member.get(&path).await;
    assert_eq!(after.status, StatusCode::OK, "{after:?}");
    assert_eq!(
        (
            after.body["root"]["deleted"].as_bool(),
            after.body["root"]["text"].as_str()
        ),
        (Some(true), Some(""))
    );
    assert_eq!(after.body["messages"].as_array().unwrap().len(), 5);
    assert_eq!(reply(&member, "still talking", None).await.status, 201);
    server.stop().await;
}

/// In a cluster, reactions stay off until every node reads them (docs/api.md).
#[tokio::test]
async fn reactions_can_be_turned_off() {
    let server = TestServer::start_with(|c| {
        c.features = std::sync::Arc::new(
            natter::config::Features::parse(&["reactions=off".into()]).unwrap(),
        );
    })
    .await;
    let owner = server.client().register("flagowner").await;
    let ch = owner.create_channel("flags", "group", &[]).await;
    let mid = owner.send(&ch, "hi", None).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/channels/{ch}/messages/{mid}/reactions/👍");
    let a = owner.call(Method::PUT, &path, None).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{a:?}"
    );
    assert!(
        !owner
            .all_events(&ch)
            .await
            .iter()
            .any(|e| e["type"] == "reaction.added")
    );
    server.stop().await;
}

async fn mentions_are_counted_listed_and_cleared_by_reading() {
    let server = TestServer::start().await;
    let anon = server.client();
    let alice = anon.register("mentalice").await;
    let bob = anon.register("mentbob").await;
    let stranger = anon.register("mentstranger").await;
    let ch = alice.create_channel("hall", "group", &[&bob]).await;
    let sent = alice
        .send(&ch, "@MentBob have a look (and @mentstranger)", None)
        .await;
    assert_eq!(sent.status, StatusCode::CREATED, "{sent:?}");
    assert_eq!(sent.body["mentions"], json!([bob.user_id]));
    let view = |c: &Client| {
        let (c, ch) = (c.clone(), ch.clone());
        async move {
            let list = c.get("/v1/channels").await.body;
            let v = list["channels"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["id"] == json!(ch))
                .unwrap()
                .clone();
            (
                v["unread"].as_i64().unwrap(),
                v["mentions"].as_i64().unwrap(),
            )
        }
    };
    assert_eq!(view(&bob).await, (1, 1));
    assert_eq!(view(&alice).await, (0, 0));
    let list = bob.get("/v1/mentions").await;
    assert_eq!(list.status, StatusCode::OK, "{list:?}");
    assert_eq!(list.body["messages"][0]["id"], sent.body["id"]);
    assert!(list.body.get("next").is_none());
    assert_eq!(
        stranger.get("/v1/mentions").await.body["messages"],
        json!([])
    );
    // Paging: newest first.
    for i in 0..3 {
        alice.send(&ch, &format!("@mentbob {i}"), None).await;
    }
    let page = bob.get("/v1/mentions?limit=2").await.body;
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["@mentbob 2", "@mentbob 1"]);
    let next = page["next"].as_str().unwrap();
    let rest = bob.get(&format!("/v1/mentions?before={next}")).await.body;
    assert_eq!(rest["messages"].as_array().unwrap().len(), 2);
    let bad = bob.get("/v1/mentions?before=later").await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_field")
    );
    // Reading clears the count.
    let last = sent.body["seq"].as_i64().unwrap() + 3;
    let read = bob
        .call(
            Method::PUT,
            &format!("/v1/channels/{ch}/read"),
            Some(json!({"seq": last})),
        )
        .await;
    assert!(read.status.is_success(), "{read:?}");
    assert_eq!(view(&bob).await, (0, 0));
    server.stop().await;
}
