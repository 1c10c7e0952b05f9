//! Bots and API keys (issue 17) over real sockets: bots marked and unable to log in,
//! scopes enforced on every route and on the WebSocket, revocation at once, and keys
//! kept out of the server's log.

mod common;

use common::child::ServerProcess;
use common::ws::*;
use common::{Client, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Makes a key for `acts_as` (a bot of `holder`'s, or `holder`) with `scopes`; the
/// client that uses it, and the key's id.
async fn key(holder: &Client, acts_as: Option<&str>, scopes: &[&str]) -> (Client, String) {
    let mut body = json!({"name": format!("test key: {}", scopes.join(" ")), "scopes": scopes});
    if let Some(id) = acts_as {
        body["user_id"] = json!(id);
    }
    let a = holder.post("/v1/keys", body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let token = a.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("ntk_"), "{token}");
    let mut c = holder.clone();
    c.token = Some(token);
    c.user_id = a.body["key"]["user_id"].as_str().unwrap().to_owned();
    (c, a.body["key"]["id"].as_str().unwrap().to_owned())
}

async fn create_bot(owner: &Client, name: &str) -> Value {
    let a = owner
        .post(
            "/v1/bots",
            json!({"username": name, "display_name": "Build status"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    a.body
}

async fn bots_act_through_scoped_keys_and_revoking_a_key_ends_it_at_once() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    let bob = server.client().register("bob").await;
    let bot = create_bot(&alice, "CI-Bot").await;
    let bot_id = bot["id"].as_str().unwrap().to_owned();
    assert_eq!(bot["username"], "ci-bot");
    assert_eq!(bot["bot"], true);
    assert_eq!(bot["bot_owner_id"], alice.user_id.as_str());
    assert_eq!(bot["display_name"], "Build status");
    let listed = alice.get("/v1/bots").await;
    assert_eq!(
        listed.body["bots"].as_array().unwrap().len(),
        1,
        "{listed:?}"
    );
    assert_eq!(bob.get("/v1/bots").await.body["bots"], json!([]));
    let me = alice.get("/v1/users/me").await;
    assert_eq!(me.body["bot"], false);
    assert!(me.body.get("bot_owner_id").is_none());
    // A bot has no password: no login finds it.
    let login = server
        .client()
        .post(
            "/v1/sessions",
            json!({"username": "ci-bot", "password": ""}),
        )
        .await;
    assert_eq!(login.status, StatusCode::UNAUTHORIZED, "{login:?}");

    // Its owner puts it in a channel; it posts through a key; members see it as a bot.
    let channel = alice.create_channel("builds", "group", &[&bob]).await;
    let added = alice
        .call(
            Method::PUT,
            &format!("/v1/channels/{channel}/members/{bot_id}"),
            None,
        )
        .await;
    assert!(added.status.is_success(), "{added:?}");
    let (writer, writer_key) = key(
        &alice,
        Some(&bot_id),
        &["messages:read", "messages:write", "channels:read"],
    )
    .await;
    assert_eq!(writer.user_id, bot_id);
    let sent = writer.send(&channel, "build 41 passed", None).await;
    assert_eq!(sent.status, StatusCode::CREATED, "{sent:?}");
    assert_eq!(sent.body["author_id"], bot_id.as_str());
    let members = bob.get(&format!("/v1/channels/{channel}/members")).await;
    let as_member = members.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"]["id"] == bot_id.as_str())
        .expect("the bot is a member")
        .clone();
    assert_eq!(as_member["user"]["bot"], true);

    // A key without `messages:write` cannot send, over REST or the WebSocket.
    let (reader, _) = key(&alice, Some(&bot_id), &["messages:read"]).await;
    let refused = reader.send(&channel, "not allowed", None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    assert_eq!(refused.code(), "insufficient_scope");
    let history = reader
        .get(&format!("/v1/channels/{channel}/messages"))
        .await;
    assert_eq!(history.status, StatusCode::OK, "reading is in its scope");
    let mut ws = raw(server.addr).await;
    let hello = json!({"op": "hello", "token": reader.token.as_deref().unwrap()});
    send_text(&mut ws, &hello.to_string()).await;
    let send =
        json!({"op": "send", "channel_id": channel, "text": "nor this", "client_id": "ws-1"});
    send_text(&mut ws, &send.to_string()).await;
    let answer = text_until(&mut ws, "ws-1").await;
    assert!(answer.contains("insufficient_scope"), "{answer}");
    drop(ws);
    assert_eq!(
        bob.all_messages(&channel).await.len(),
        1,
        "nothing was written"
    );
    // Without `messages:read` the real-time stream is refused (4004).
    let (sender_only, _) = key(&alice, Some(&bot_id), &["messages:write"]).await;
    let mut ws = raw(server.addr).await;
    let hello = json!({"op": "hello", "token": sender_only.token.as_deref().unwrap()});
    send_text(&mut ws, &hello.to_string()).await;
    let (texts, code) = read_to_close(&mut ws).await;
    assert_eq!(code, Some(4004), "{texts:?}");
    assert!(
        texts.iter().any(|t| t.contains("insufficient_scope")),
        "{texts:?}"
    );
    // Accounts are managed from a login, never with a key.
    for (method, path) in [
        (Method::GET, "/v1/keys"),
        (Method::POST, "/v1/bots"),
        (Method::GET, "/v1/sessions"),
        (Method::DELETE, "/v1/sessions/others"),
    ] {
        let a = writer.call(method.clone(), path, Some(json!({}))).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {path}: {a:?}");
        assert_eq!(a.code(), "session_required", "{method} {path}");
    }
    // Nobody else holds, deletes or mints keys for alice's bot.
    let stolen = bob
        .post(
            "/v1/keys",
            json!({"name": "x", "scopes": ["messages:write"], "user_id": bot_id}),
        )
        .await;
    assert_eq!(stolen.status, StatusCode::NOT_FOUND, "{stolen:?}");
    let gone = bob
        .call(Method::DELETE, &format!("/v1/keys/{writer_key}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let keys = alice.get("/v1/keys").await;
    let listed = keys.body["keys"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{keys:?}");
    assert!(
        !keys.body.to_string().contains("ntk_"),
        "no token is shown again"
    );
    let used = listed
        .iter()
        .find(|k| k["id"] == writer_key.as_str())
        .unwrap();
    assert!(used["last_used_at"].is_string(), "{used:?}");
    assert_eq!(
        used["scopes"],
        json!(["channels:read", "messages:read", "messages:write"])
    );

    // Revoking the key closes its socket with 4001 and its next request is refused.
    let mut ws = raw(server.addr).await;
    let hello = json!({"op": "hello", "token": writer.token.as_deref().unwrap()});
    send_text(&mut ws, &hello.to_string()).await;
    let revoked = alice
        .call(Method::DELETE, &format!("/v1/keys/{writer_key}"), None)
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let (_, code) = read_to_close(&mut ws).await;
    assert_eq!(code, Some(4001));
    let after = writer.send(&channel, "after revocation", None).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED, "{after:?}");
    server.stop().await;
}

/// Under the consent rule only people who share a channel with a user may add them; a
/// bot's owner may add it anywhere they are, and a stranger may not.
async fn only_a_bots_owner_or_someone_who_shares_a_channel_adds_it() {
    let server = TestServer::start_with(|c| {
        c.limits.rules.consent = natter::store::Consent::SharedChannel;
    })
    .await;
    let alice = server.client().register("alice").await;
    let mallory = server.client().register("mallory").await;
    let bot = create_bot(&alice, "helper").await;
    let bot_id = bot["id"].as_str().unwrap();
    let mine = alice.create_channel("mine", "group", &[]).await;
    let added = alice
        .call(
            Method::PUT,
            &format!("/v1/channels/{mine}/members/{bot_id}"),
            None,
        )
        .await;
    assert!(added.status.is_success(), "{added:?}");
    let theirs = mallory.create_channel("theirs", "group", &[]).await;
    let refused = mallory
        .call(
            Method::PUT,
            &format!("/v1/channels/{theirs}/members/{bot_id}"),
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    // A bot cannot make bots, even through a key with every scope.
    let (as_bot, _) = key(&alice, Some(bot_id), &EVERY_SCOPE).await;
    let a = as_bot
        .post("/v1/bots", json!({"username": "bot-bot"}))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    server.stop().await;
}

/// An incoming webhook: made by a channel admin, its secret path posts as its bot
/// (idempotent by `client_id`), it is listed without its secret, and deleting it ends
/// the path at once.
async fn incoming_webhooks_post_as_their_bot_until_deleted() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    let bob = server.client().register("bob").await;
    let carol = server.client().register("carol").await;
    let channel = alice.create_channel("deploys", "group", &[&bob]).await;
    let hooks = format!("/v1/channels/{channel}/webhooks");
    // Only the channel's owner and admins manage its webhooks.
    let by_member = bob.post(&hooks, json!({"name": "x"})).await;
    assert_eq!(by_member.status, StatusCode::FORBIDDEN, "{by_member:?}");
    assert_eq!(bob.get(&hooks).await.status, StatusCode::FORBIDDEN);
    let by_stranger = carol.post(&hooks, json!({"name": "x"})).await;
    assert_eq!(by_stranger.status, StatusCode::NOT_FOUND);
    let made = alice.post(&hooks, json!({"name": "Deploy notices"})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{made:?}");
    let path = made.body["path"].as_str().unwrap().to_owned();
    assert!(path.starts_with(&format!("/v1/hooks/{channel}/")), "{path}");
    let hook_id = made.body["webhook"]["id"].as_str().unwrap().to_owned();
    let bot_id = made.body["webhook"]["bot_id"].as_str().unwrap().to_owned();
    let bot = alice.get(&format!("/v1/users/{bot_id}")).await.body;
    assert_eq!(bot["bot"], true);
    assert_eq!(bot["display_name"], "Deploy notices");
    assert_eq!(bot["bot_owner_id"], alice.user_id.as_str());

    // Anyone holding the path posts, with no token; a retry is the same message.
    let anonymous = server.client();
    let posted = anonymous
        .post(
            &path,
            json!({"text": "v1.2 is live", "client_id": "deploy-12"}),
        )
        .await;
    assert_eq!(posted.status, StatusCode::CREATED, "{posted:?}");
    assert_eq!(posted.body["author_id"], bot_id.as_str());
    let again = anonymous
        .post(
            &path,
            json!({"text": "v1.2 is live", "client_id": "deploy-12"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["id"], posted.body["id"]);
    let seen = bob.all_messages(&channel).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["text"], "v1.2 is live");
    // A wrong secret, or the right one on another channel, names nothing.
    let secret = path.rsplit('/').next().unwrap();
    let other = alice.create_channel("other", "group", &[]).await;
    for wrong in [
        format!("/v1/hooks/{channel}/{}", "0".repeat(64)),
        format!("/v1/hooks/{other}/{secret}"),
    ] {
        let a = anonymous.post(&wrong, json!({"text": "x"})).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{wrong}: {a:?}");
    }
    // Bad input gets the send's errors.
    let empty = anonymous.post(&path, json!({"text": ""})).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);

    // Listed without the secret; one of the caller's own bots may be named instead,
    // another's may not.
    let listed = alice.get(&hooks).await;
    assert_eq!(listed.body["webhooks"].as_array().unwrap().len(), 1);
    assert!(!listed.body.to_string().contains(secret));
    let own_bot = create_bot(&alice, "alerts").await;
    let with_bot = alice
        .post(&hooks, json!({"name": "alerts", "bot_id": own_bot["id"]}))
        .await;
    assert_eq!(with_bot.status, StatusCode::CREATED, "{with_bot:?}");
    assert_eq!(with_bot.body["webhook"]["bot_id"], own_bot["id"]);
    let bobs_bot = create_bot(&bob, "bobs-bot").await;
    let not_mine = alice
        .post(&hooks, json!({"name": "x", "bot_id": bobs_bot["id"]}))
        .await;
    assert_eq!(not_mine.status, StatusCode::NOT_FOUND, "{not_mine:?}");

    // Deleted: the path stops working at once; the bot and its message stay.
    let deleted = alice
        .call(Method::DELETE, &format!("{hooks}/{hook_id}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let after = anonymous.post(&path, json!({"text": "too late"})).await;
    assert_eq!(after.status, StatusCode::NOT_FOUND, "{after:?}");
    let again = alice
        .call(Method::DELETE, &format!("{hooks}/{hook_id}"), None)
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(bob.all_messages(&channel).await.len(), 1);
    // No webhooks in DMs.
    let dm = alice.post("/v1/dms", json!({"user_id": bob.user_id})).await;
    let dm_id = dm.body["id"].as_str().unwrap();
    let in_dm = alice
        .post(
            &format!("/v1/channels/{dm_id}/webhooks"),
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(in_dm.status, StatusCode::FORBIDDEN, "{in_dm:?}");
    server.stop().await;
}

crate::on_both_backends!(
    bots_act_through_scoped_keys_and_revoking_a_key_ends_it_at_once,
    only_a_bots_owner_or_someone_who_shares_a_channel_adds_it,
    incoming_webhooks_post_as_their_bot_until_deleted,
);

/// An incoming webhook has a send limit of its own: a flood through its path is refused
/// with 429 and writes nothing more.
#[tokio::test]
async fn an_incoming_webhook_is_rate_limited() {
    let server = TestServer::start_with(|c| {
        c.limits.send = natter::ratelimit::Rate {
            per_second: 0.0001,
            burst: 3.0,
        };
    })
    .await;
    let alice = server.client().register("alice").await;
    let channel = alice.create_channel("c", "group", &[]).await;
    let made = alice
        .post(
            &format!("/v1/channels/{channel}/webhooks"),
            json!({"name": "n"}),
        )
        .await;
    let path = made.body["path"].as_str().unwrap().to_owned();
    let anonymous = server.client();
    let mut statuses = Vec::new();
    for i in 0..5 {
        let a = anonymous
            .post(&path, json!({"text": format!("m{i}")}))
            .await;
        statuses.push(a.status.as_u16());
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(a.retry_after.is_some(), "{a:?}");
        }
    }
    assert_eq!(statuses, [201, 201, 201, 429, 429]);
    assert_eq!(alice.all_messages(&channel).await.len(), 3);
    server.stop().await;
}

const EVERY_SCOPE: [&str; 6] = [
    "users:read",
    "users:write",
    "channels:read",
    "channels:write",
    "messages:read",
    "messages:write",
];

/// A user with a channel and a message in it, and every route of the served OpenAPI
/// document that takes a token (`(method, path template)`), for the scope tests.
struct ScopeFixture {
    alice: Client,
    channel: String,
    message: String,
    routes: Vec<(String, String)>,
}

impl ScopeFixture {
    async fn new(server: &TestServer) -> Self {
        let alice = server.client().register("alice").await;
        let channel = alice.create_channel("c", "group", &[]).await;
        let sent = alice.send(&channel, "hello", None).await;
        let message = sent.body["id"].as_str().unwrap().to_owned();
        let spec = server.client().get("/v1/openapi.json").await.body;
        let mut routes = Vec::new();
        for (path, item) in spec["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if op.get("security").is_some() && path != "/v1/ws" {
                    routes.push((method.clone(), path.clone()));
                }
            }
        }
        assert!(routes.len() >= 30, "{routes:?}");
        Self {
            alice,
            channel,
            message,
            routes,
        }
    }

    /// The route's path with its parameters filled in.
    fn concrete(&self, path: &str) -> String {
        path.replace("{id}", &self.channel)
            .replace("{user_id}", &self.alice.user_id)
            .replace("{message_id}", &self.message)
            .replace("{root_id}", &self.message)
            .replace("{emoji}", "%F0%9F%91%8D")
    }

    async fn call(&self, c: &Client, method: &str, path: &str) -> common::Answer {
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        c.call(m, &self.concrete(path), Some(json!({}))).await
    }
}

/// The scope the test's own table says a route needs: `Some(None)` for a route that is
/// not in it (a login session only).
fn scope_of(method: &str, path: &str) -> Option<&'static str> {
    ROUTE_SCOPES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .and_then(|(_, _, s)| *s)
}

/// Every route of the OpenAPI document that takes a token checks a key's scopes: a
/// `users:read` key is refused everything but the user routes, and a key with every
/// scope is refused nothing but account management.
#[tokio::test]
async fn every_route_checks_an_api_keys_scopes() {
    let server = TestServer::start().await;
    let f = ScopeFixture::new(&server).await;
    let (narrow, _) = key(&f.alice, None, &["users:read"]).await;
    let (wide, _) = key(&f.alice, None, &EVERY_SCOPE).await;
    let mut routes = f.routes.clone();
    for (method, path) in &routes {
        let a = f.call(&narrow, method, path).await;
        if scope_of(method, path) == Some("users:read") {
            assert_ne!(a.status, StatusCode::FORBIDDEN, "{method} {path}: {a:?}");
        } else {
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {path}: {a:?}");
            assert!(
                ["insufficient_scope", "session_required"].contains(&a.code()),
                "{method} {path}: {a:?}"
            );
        }
    }
    // Reads first, then writes, so the writes' effects (alice leaving) do not hide a
    // refusal behind a 404.
    routes.sort_by_key(|(m, _)| m != "get");
    for (method, path) in &routes {
        let a = f.call(&wide, method, path).await;
        if scope_of(method, path).is_none() {
            assert_eq!(a.code(), "session_required", "{method} {path}: {a:?}");
        } else {
            assert_ne!(a.code(), "insufficient_scope", "{method} {path}: {a:?}");
            assert_ne!(a.code(), "session_required", "{method} {path}: {a:?}");
        }
    }
    server.stop().await;
}

/// The scope each route needs, as this test states it (independently of the server's
/// table); `None`: a login session only.
const ROUTE_SCOPES: &[(&str, &str, Option<&str>)] = &[
    ("get", "/v1/users", Some("users:read")),
    ("get", "/v1/users/me", Some("users:read")),
    ("patch", "/v1/users/me", Some("users:write")),
    ("get", "/v1/users/{id}", Some("users:read")),
    ("get", "/v1/channels", Some("channels:read")),
    ("post", "/v1/channels", Some("channels:write")),
    ("get", "/v1/channels/{id}", Some("channels:read")),
    ("patch", "/v1/channels/{id}", Some("channels:write")),
    ("get", "/v1/channels/{id}/members", Some("channels:read")),
    (
        "put",
        "/v1/channels/{id}/members/{user_id}",
        Some("channels:write"),
    ),
    (
        "delete",
        "/v1/channels/{id}/members/{user_id}",
        Some("channels:write"),
    ),
    ("post", "/v1/dms", Some("channels:write")),
    ("get", "/v1/channels/{id}/presence", Some("users:read")),
    ("get", "/v1/channels/{id}/events", Some("messages:read")),
    ("get", "/v1/channels/{id}/messages", Some("messages:read")),
    ("post", "/v1/channels/{id}/messages", Some("messages:write")),
    (
        "get",
        "/v1/channels/{id}/messages/{message_id}",
        Some("messages:read"),
    ),
    (
        "patch",
        "/v1/channels/{id}/messages/{message_id}",
        Some("messages:write"),
    ),
    (
        "delete",
        "/v1/channels/{id}/messages/{message_id}",
        Some("messages:write"),
    ),
    (
        "get",
        "/v1/channels/{id}/messages/{message_id}/reactions",
        Some("messages:read"),
    ),
    (
        "get",
        "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}",
        Some("messages:read"),
    ),
    (
        "put",
        "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}",
        Some("messages:write"),
    ),
    (
        "delete",
        "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}",
        Some("messages:write"),
    ),
    (
        "get",
        "/v1/channels/{id}/threads/{root_id}/messages",
        Some("messages:read"),
    ),
    ("put", "/v1/channels/{id}/read", Some("messages:read")),
    ("get", "/v1/mentions", Some("messages:read")),
    ("get", "/v1/search", Some("messages:read")),
    ("get", "/v1/files/{id}", Some("messages:read")),
    ("get", "/v1/files/{id}/thumbnail", Some("messages:read")),
    ("post", "/v1/uploads", Some("messages:write")),
];

/// Each scope guards exactly its routes: a key with every scope but one is refused
/// those routes (`insufficient_scope`) and no others; routes not in the test's list are
/// account management (`session_required`). Over the WebSocket, `typing` needs
/// `messages:write` and `presence.set` needs `users:write`.
#[tokio::test]
async fn each_scope_guards_exactly_its_routes() {
    let server = TestServer::start().await;
    let f = ScopeFixture::new(&server).await;
    for missing in EVERY_SCOPE {
        let others: Vec<&str> = EVERY_SCOPE.into_iter().filter(|s| *s != missing).collect();
        let (k, _) = key(&f.alice, None, &others).await;
        for (method, path) in &f.routes {
            let a = f.call(&k, method, path).await;
            match scope_of(method, path) {
                Some(s) if s == missing => assert_eq!(
                    a.code(),
                    "insufficient_scope",
                    "{method} {path} without {s}: {a:?}"
                ),
                Some(_) => assert!(
                    !["insufficient_scope", "session_required"].contains(&a.code()),
                    "{method} {path} without {missing}: {a:?}"
                ),
                None => assert_eq!(a.code(), "session_required", "{method} {path}: {a:?}"),
            }
        }
    }
    // The WebSocket's ops, with a key that may read messages only.
    let (reader, _) = key(&f.alice, None, &["messages:read"]).await;
    let mut ws = raw(server.addr).await;
    let hello = json!({"op": "hello", "token": reader.token.as_deref().unwrap()});
    send_text(&mut ws, &hello.to_string()).await;
    for op in [
        json!({"op": "typing", "channel_id": f.channel}),
        json!({"op": "presence.set", "status": "idle"}),
    ] {
        send_text(&mut ws, &op.to_string()).await;
        let answer = text_until(&mut ws, "insufficient_scope").await;
        let scope = if op["op"] == "typing" {
            "messages:write"
        } else {
            "users:write"
        };
        assert!(answer.contains(scope), "{op}: {answer}");
    }
    server.stop().await;
}

/// Keys are checked before they are stored: names, scopes and expiry.
#[tokio::test]
async fn bad_key_requests_get_clear_errors() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    for (body, field) in [
        (json!({"name": "", "scopes": ["messages:read"]}), "name"),
        (json!({"name": "k", "scopes": []}), "scopes"),
        (
            json!({"name": "k", "scopes": ["messages:delete"]}),
            "scopes",
        ),
        (
            json!({"name": "k", "scopes": ["users:read"], "expires_in_days": 0}),
            "expires_in_days",
        ),
        (
            json!({"name": "k\u{202e}", "scopes": ["users:read"]}),
            "name",
        ),
    ] {
        let a = alice.post("/v1/keys", body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {a:?}");
        assert_eq!(a.body["error"]["field"], field, "{body}: {a:?}");
    }
    let expiring = alice
        .post(
            "/v1/keys",
            json!({"name": "k", "scopes": ["users:read"], "expires_in_days": 30.0}),
        )
        .await;
    assert_eq!(expiring.status, StatusCode::CREATED);
    assert!(expiring.body["key"]["expires_at"].is_string());
    let never = alice
        .post("/v1/keys", json!({"name": "k2", "scopes": ["users:read"]}))
        .await;
    assert!(never.body["key"].get("expires_at").is_none(), "{never:?}");
    // A token that looks like a key but is none.
    let mut fake = alice.clone();
    fake.token = Some(format!("ntk_{}", "0".repeat(64)));
    assert_eq!(
        fake.get("/v1/users/me").await.status,
        StatusCode::UNAUTHORIZED
    );
    server.stop().await;
}

/// An API key's token never reaches the log, at the most verbose level: not when it is
/// made, used over REST and the WebSocket, refused for its scope, or used once revoked.
#[tokio::test]
async fn api_keys_never_appear_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start_with(dir.path(), "127.0.0.1:0", &[], &[("NATTER_LOG", "trace")]).await;
    let base = server.base();
    let alice = Client::new(&base).register("alice").await;
    let channel = alice.create_channel("c", "group", &[]).await;
    let (k, key_id) = key(&alice, None, &["messages:read", "messages:write"]).await;
    let token = k.token.clone().unwrap();
    assert_eq!(
        k.send(&channel, "hi", None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(k.get("/v1/keys").await.status, StatusCode::FORBIDDEN);
    let mut ws = raw(server.addr).await;
    send_text(&mut ws, &json!({"op": "hello", "token": token}).to_string()).await;
    let deleted = alice
        .call(Method::DELETE, &format!("/v1/keys/{key_id}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let (_, code) = read_to_close(&mut ws).await;
    assert_eq!(code, Some(4001));
    assert_eq!(k.get("/v1/users/me").await.status, StatusCode::UNAUTHORIZED);
    // An incoming webhook's secret path neither.
    let made = alice
        .post(
            &format!("/v1/channels/{channel}/webhooks"),
            json!({"name": "n"}),
        )
        .await;
    let path = made.body["path"].as_str().unwrap().to_owned();
    let hook_secret = path.rsplit('/').next().unwrap().to_owned();
    let posted = Client::new(&base)
        .post(&path, json!({"text": "via hook"}))
        .await;
    assert_eq!(posted.status, StatusCode::CREATED);
    let lines = std::sync::Arc::clone(&server.log);
    server.terminate().await;
    let log = lines.lock().unwrap().join("\n");
    assert!(
        log.contains("API key revoked") && log.lines().count() > 20,
        "the log was written at trace level:\n{log}"
    );
    let secret = token.trim_start_matches("ntk_");
    assert!(!log.contains(secret), "the key's token is in the log");
    assert!(
        !log.contains(&hook_secret),
        "a webhook's secret is in the log"
    );
}

/// Reads text frames until one contains `needle`; that frame.
async fn text_until(ws: &mut RawWs, needle: &str) -> String {
    use futures_util::StreamExt;
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket is open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = frame
            && t.contains(needle)
        {
            return t.to_string();
        }
    }
}
