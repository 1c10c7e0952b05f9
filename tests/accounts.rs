//! Accounts people can trust (issue 18) over real sockets: two-factor login (TOTP with
//! single-use codes and recovery codes, its secret sealed in the store), its throttle,
//! and password changes that end every other session and its sockets.

mod common;

use std::time::Duration;

use common::ws::{raw, read_to_close, send_text};
use common::{Client, TestServer};
use natter::config::Config;
use natter::ratelimit::Rate;
use natter::totp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

on_both_backends!(
    two_factor_login_needs_a_fresh_code_or_an_unused_recovery_code,
    a_password_change_ends_every_other_session_and_its_sockets,
    a_deleted_account_leaves_history_readable_and_its_name_free_later,
);

/// Gives the server a secret key file of its own: on PostgreSQL none is made for it.
fn with_key(c: &mut Config) {
    let path = c.data_dir.join("given.key");
    std::fs::create_dir_all(&c.data_dir).unwrap();
    std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
    c.secret_key_file = Some(path);
}

/// The codes a test has used, so the next is never a replay: it takes the step after the
/// last one used, waiting (at most a step) until the server's clock accepts it.
struct Authenticator {
    secret: Vec<u8>,
    last_step: i64,
}

impl Authenticator {
    fn new(base32: &str) -> Self {
        Self {
            secret: totp::from_base32(base32).expect("the secret is base32"),
            last_step: 0,
        }
    }

    fn now_step() -> i64 {
        totp::step_at(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64,
        )
    }

    /// A code the server has not seen used: one step ahead of the clock at most.
    async fn next_code(&mut self) -> String {
        let step = (self.last_step + 1).max(Self::now_step());
        while step > Self::now_step() + 1 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.last_step = step;
        totp::code(&self.secret, step)
    }

    /// The code last handed out (a replay).
    fn last_code(&self) -> String {
        totp::code(&self.secret, self.last_step)
    }
}

async fn login(base: &str, name: &str, password: &str) -> (StatusCode, Value) {
    let a = Client::new(base)
        .post(
            "/v1/sessions",
            json!({"username": name, "password": password}),
        )
        .await;
    (a.status, a.body)
}

fn logged_in(base: &str, body: &Value) -> Client {
    let mut c = Client::new(base);
    c.token = Some(body["token"].as_str().expect("a token").to_owned());
    c.user_id = body["user"]["id"].as_str().unwrap().to_owned();
    c
}

/// Enrols `c` in two-factor login: its authenticator and recovery codes.
async fn enrol(c: &Client, password: &str) -> (Authenticator, Vec<String>) {
    let begun = c
        .post("/v1/users/me/two-factor", json!({"password": password}))
        .await;
    assert_eq!(begun.status, StatusCode::CREATED, "{begun:?}");
    let mut app = Authenticator::new(begun.body["secret"].as_str().unwrap());
    let code = app.next_code().await;
    let confirmed = c
        .post("/v1/users/me/two-factor/confirm", json!({"code": code}))
        .await;
    assert_eq!(confirmed.status, StatusCode::OK, "{confirmed:?}");
    let codes = confirmed.body["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    (app, codes)
}

/// Enrolment shows the secret once (as base32, an otpauth URI and a QR code) and takes
/// effect on a right code; then a login's right password gets a challenge, not a
/// session; a code completes it once (a replay is refused), a recovery code once; and
/// turning it off asks for the password and a code.
async fn two_factor_login_needs_a_fresh_code_or_an_unused_recovery_code() {
    let server = TestServer::start_with(with_key).await;
    let base = server.base();
    let alice = server.client().register("alice").await;
    let password = "password-alice";
    let status = alice.get("/v1/users/me/two-factor").await;
    assert_eq!(
        status.body,
        json!({"enabled": false, "pending": false, "recovery_codes_left": 0})
    );
    // The password is asked again.
    let wrong = alice
        .post(
            "/v1/users/me/two-factor",
            json!({"password": "not-her-password"}),
        )
        .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::FORBIDDEN, "wrong_password")
    );
    let begun = alice
        .post("/v1/users/me/two-factor", json!({"password": password}))
        .await;
    assert_eq!(begun.status, StatusCode::CREATED, "{begun:?}");
    let secret = begun.body["secret"].as_str().unwrap().to_owned();
    let uri = begun.body["uri"].as_str().unwrap();
    assert!(
        uri.starts_with("otpauth://totp/Natter:alice?")
            && uri.contains(&format!("secret={secret}"))
            && uri.contains("digits=6")
            && uri.contains("period=30")
            && uri.contains("algorithm=SHA1"),
        "{uri}"
    );
    assert!(begun.body["qr_svg"].as_str().unwrap().contains("<svg"));
    // Not on until confirmed: a login needs no code yet.
    let (s, _) = login(&base, "alice", password).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        alice.get("/v1/users/me/two-factor").await.body["pending"],
        true
    );
    let mut app = Authenticator::new(&secret);
    let bad = alice
        .post("/v1/users/me/two-factor/confirm", json!({"code": "000000"}))
        .await;
    let bad = if totp::matching_step(&app.secret, "000000", Authenticator::now_step()).is_some() {
        // One in a few hundred thousand: "000000" is a right code now.
        alice
            .post("/v1/users/me/two-factor/confirm", json!({"code": "12345"}))
            .await
    } else {
        bad
    };
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::FORBIDDEN, "invalid_code")
    );
    let code = app.next_code().await;
    let confirmed = alice
        .post("/v1/users/me/two-factor/confirm", json!({"code": code}))
        .await;
    assert_eq!(confirmed.status, StatusCode::OK, "{confirmed:?}");
    let recovery: Vec<String> = confirmed.body["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(recovery.len(), 10);
    assert_eq!(
        alice.get("/v1/users/me/two-factor").await.body,
        json!({"enabled": true, "pending": false, "recovery_codes_left": 10})
    );
    let again = alice
        .post("/v1/users/me/two-factor", json!({"password": password}))
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "two_factor_enabled")
    );

    // A right password now gets a challenge and no session.
    let (s, body) = login(&base, "alice", password).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["two_factor_required"], true);
    assert!(body.get("token").is_none());
    let challenge = body["challenge"].as_str().unwrap().to_owned();
    let complete = |challenge: String, code: String| {
        let base = base.clone();
        async move {
            Client::new(&base)
                .post(
                    "/v1/sessions/two-factor",
                    json!({"challenge": challenge, "code": code}),
                )
                .await
        }
    };
    // The code that confirmed the enrolment is used.
    let replay = complete(challenge.clone(), app.last_code()).await;
    assert_eq!(
        (replay.status, replay.code()),
        (StatusCode::UNAUTHORIZED, "invalid_code")
    );
    let mut forged = challenge.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let forged = complete(forged, app.next_code().await).await;
    assert_eq!(
        (forged.status, forged.code()),
        (StatusCode::UNAUTHORIZED, "invalid_challenge")
    );
    let code = app.last_code();
    let done = complete(challenge.clone(), code.clone()).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let phone = logged_in(&base, &done.body);
    assert_eq!(phone.get("/v1/users/me").await.status, StatusCode::OK);
    // The same code again, even with the challenge it worked with: refused.
    let replay = complete(challenge.clone(), code).await;
    assert_eq!(
        (replay.status, replay.code()),
        (StatusCode::UNAUTHORIZED, "invalid_code")
    );
    // A recovery code works once, in any letter case.
    let used = recovery[0].to_uppercase();
    let done = complete(challenge.clone(), used.clone()).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let again = complete(challenge.clone(), used).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::UNAUTHORIZED, "invalid_code")
    );
    assert_eq!(
        alice.get("/v1/users/me/two-factor").await.body["recovery_codes_left"],
        9
    );
    // A wrong password still gets the plain answer, and no challenge.
    let (s, body) = login(&base, "alice", "wrong-password").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(body.get("challenge").is_none());

    // Turning it off: the password and a code.
    let no_code = alice
        .post(
            "/v1/users/me/two-factor/disable",
            json!({"password": password}),
        )
        .await;
    assert_eq!(
        (no_code.status, no_code.code()),
        (StatusCode::BAD_REQUEST, "invalid_field")
    );
    let wrong_code = alice
        .post(
            "/v1/users/me/two-factor/disable",
            json!({"password": password, "code": recovery[0]}),
        )
        .await;
    assert_eq!(
        (wrong_code.status, wrong_code.code()),
        (StatusCode::FORBIDDEN, "invalid_code")
    );
    let off = alice
        .post(
            "/v1/users/me/two-factor/disable",
            json!({"password": password, "code": recovery[1]}),
        )
        .await;
    assert_eq!(off.status, StatusCode::NO_CONTENT, "{off:?}");
    let (s, body) = login(&base, "alice", password).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // The old challenge no longer completes a login: two-factor login is off.
    let stale = complete(challenge, recovery[2].clone()).await;
    assert_eq!(stale.status, StatusCode::UNAUTHORIZED);

    // On SQLite the database file is at hand: the secret is not in it, in any form.
    if common::postgres_shards().is_none() {
        let (app, _) = enrol(&alice, password).await;
        let stored = alice.get("/v1/users/me/two-factor").await;
        assert_eq!(stored.body["enabled"], true);
        let encoded = totp::base32(&app.secret);
        let db = server.dir.path().join("natter.db");
        let mut bytes = std::fs::read(&db).unwrap();
        if let Ok(wal) = std::fs::read(db.with_extension("db-wal")) {
            bytes.extend(wal);
        }
        assert!(!bytes.windows(20).any(|w| w == app.secret.as_slice()));
        assert!(
            !bytes
                .windows(encoded.len())
                .any(|w| w == encoded.as_bytes())
        );
    }
    server.stop().await;
}

/// A password change asks for the current password (and a code with two-factor login
/// on), and ends every other session of the user at once, their sockets closed with
/// 4001; the session that made it stays.
async fn a_password_change_ends_every_other_session_and_its_sockets() {
    let server = TestServer::start_with(with_key).await;
    let base = server.base();
    let laptop = server.client().register("carol").await;
    let (_, body) = login(&base, "carol", "password-carol").await;
    let phone = logged_in(&base, &body);
    let bob = server.client().register("bob").await;
    let mut ws = raw(server.addr).await;
    let hello = json!({"op": "hello", "token": phone.token.as_deref().unwrap()});
    send_text(&mut ws, &hello.to_string()).await;
    let change =
        |current: &str, new: &str| json!({"current_password": current, "new_password": new});
    let wrong = laptop
        .post(
            "/v1/users/me/password",
            change("nope-nope", "brand-new-pass"),
        )
        .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::FORBIDDEN, "wrong_password")
    );
    let short = laptop
        .post("/v1/users/me/password", change("password-carol", "short"))
        .await;
    assert_eq!(
        (short.status, short.body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("new_password"))
    );
    assert_eq!(phone.get("/v1/users/me").await.status, StatusCode::OK);
    let changed = laptop
        .post(
            "/v1/users/me/password",
            change("password-carol", "brand-new-pass"),
        )
        .await;
    assert_eq!(changed.status, StatusCode::NO_CONTENT, "{changed:?}");
    let (_, code) = read_to_close(&mut ws).await;
    assert_eq!(code, Some(4001));
    assert_eq!(
        phone.get("/v1/users/me").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(laptop.get("/v1/users/me").await.status, StatusCode::OK);
    assert_eq!(
        bob.get("/v1/users/me").await.status,
        StatusCode::OK,
        "others keep theirs"
    );
    assert_eq!(
        laptop.get("/v1/sessions").await.body["sessions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (s, _) = login(&base, "carol", "password-carol").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = login(&base, "carol", "brand-new-pass").await;
    assert_eq!(s, StatusCode::OK);

    // With two-factor login on, a code is asked too.
    let (mut app, recovery) = enrol(&laptop, "brand-new-pass").await;
    let no_code = laptop
        .post(
            "/v1/users/me/password",
            change("brand-new-pass", "third-password"),
        )
        .await;
    assert_eq!(
        (no_code.status, no_code.body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("code"))
    );
    // A challenge won with the old password...
    let (s, won) = login(&base, "carol", "brand-new-pass").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let mut body = change("brand-new-pass", "third-password");
    body["code"] = json!(app.next_code().await);
    let changed = laptop.post("/v1/users/me/password", body).await;
    assert_eq!(changed.status, StatusCode::NO_CONTENT, "{changed:?}");
    // ...completes no login once the password changed.
    let stale = Client::new(&base)
        .post(
            "/v1/sessions/two-factor",
            json!({"challenge": won["challenge"], "code": recovery[0]}),
        )
        .await;
    assert_eq!(
        (stale.status, stale.code()),
        (StatusCode::UNAUTHORIZED, "invalid_challenge")
    );
    let (s, body) = login(&base, "carol", "third-password").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    server.stop().await;
}

/// Wrong codes are charged to the same limits as wrong passwords (and counted in the
/// same metric): a guesser holding the password is stopped after a few, and then even
/// the right code waits.
#[tokio::test]
async fn wrong_codes_are_throttled_like_wrong_passwords() {
    let server = TestServer::start_with(|c| {
        c.limits.login_failures_per_user = Rate {
            per_second: 0.0001,
            burst: 3.0,
        };
    })
    .await;
    let base = server.base();
    let dave = server.client().register("dave").await;
    let (mut app, _) = enrol(&dave, "password-dave").await;
    let (s, body) = login(&base, "dave", "password-dave").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let challenge = body["challenge"].as_str().unwrap().to_owned();
    let right = app.next_code().await;
    let wrong: Vec<String> = (0..1000)
        .map(|i| format!("{:06}", (i * 7919) % 1_000_000))
        .filter(|c| {
            totp::matching_step(&app.secret, c, Authenticator::now_step()).is_none() && *c != right
        })
        .take(4)
        .collect();
    let c = Client::new(&base);
    for code in &wrong[..3] {
        let a = c
            .post(
                "/v1/sessions/two-factor",
                json!({"challenge": challenge, "code": code}),
            )
            .await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNAUTHORIZED, "invalid_code")
        );
    }
    let throttled = c
        .post(
            "/v1/sessions/two-factor",
            json!({"challenge": challenge, "code": wrong[3]}),
        )
        .await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(throttled.retry_after.is_some());
    let right_but_late = c
        .post(
            "/v1/sessions/two-factor",
            json!({"challenge": challenge, "code": right}),
        )
        .await;
    assert_eq!(right_but_late.status, StatusCode::TOO_MANY_REQUESTS);
    let limited = common::scrape(&base).await;
    assert!(limited[r#"natter_rate_limited_total{limit="login"}"#] >= 2.0);
    // The same bucket as passwords: a password login from here waits too.
    let (s, _) = login(&base, "dave", "password-dave").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Sensitive changes from a session are charged alike.
    let a = dave
        .post(
            "/v1/users/me/two-factor/disable",
            json!({"password": "password-dave", "code": "123456"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    server.stop().await;
}

/// The server's key is what opens the secrets: without it (a cluster node started with
/// none) two-factor login is unavailable, clearly; with another key, the stored secrets
/// do not open, and recovery codes (stored as digests) still log in.
#[tokio::test]
async fn the_secret_key_is_needed_to_use_a_stored_secret() {
    let server = TestServer::start().await;
    let base = server.base();
    let erin = server.client().register("erin").await;
    assert!(
        server.dir.path().join("secret.key").exists(),
        "made at first start"
    );
    let (_, recovery) = enrol(&erin, "password-erin").await;
    // Another key: the challenge of the old one and the sealed secret are worthless.
    let (s, body) = login(&base, "erin", "password-erin").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let old_challenge = body["challenge"].as_str().unwrap().to_owned();
    let server = server
        .restart_tweaked(
            |dir| {
                std::fs::write(dir.join("secret.key"), "cd".repeat(32)).unwrap();
            },
            |_| {},
        )
        .await;
    let base = server.base();
    let c = Client::new(&base);
    let stale = c
        .post(
            "/v1/sessions/two-factor",
            json!({"challenge": old_challenge, "code": recovery[0]}),
        )
        .await;
    assert_eq!(stale.code(), "invalid_challenge");
    let (s, body) = login(&base, "erin", "password-erin").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let challenge = body["challenge"].as_str().unwrap().to_owned();
    let code = c
        .post(
            "/v1/sessions/two-factor",
            json!({"challenge": challenge, "code": "123456"}),
        )
        .await;
    assert_eq!(
        (code.status, code.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "two_factor_unavailable")
    );
    let by_recovery = c
        .post(
            "/v1/sessions/two-factor",
            json!({"challenge": challenge, "code": recovery[0]}),
        )
        .await;
    assert_eq!(by_recovery.status, StatusCode::OK, "{by_recovery:?}");
    server.stop().await;
}

/// The Rust client library speaks the same: it enrols, logs in with a code, changes the
/// password and turns two-factor login off.
#[tokio::test]
async fn the_client_library_enrols_and_logs_in_with_a_code() {
    use natter::client::{Api, ClientError};
    let server = TestServer::start().await;
    let base = server.base();
    let mut me = Api::new(&base);
    me.register("frank", "password-frank").await.unwrap();
    let enrolment = me.begin_two_factor("password-frank").await.unwrap();
    assert!(enrolment.uri.contains(&enrolment.secret));
    let mut app = Authenticator::new(&enrolment.secret);
    let recovery = me.confirm_two_factor(&app.next_code().await).await.unwrap();
    assert_eq!(recovery.len(), 10);
    let mut phone = Api::new(&base);
    match phone.login("frank", "password-frank").await {
        Err(ClientError::TwoFactorRequired { challenge }) => assert!(!challenge.is_empty()),
        other => panic!("expected a challenge, got {other:?}"),
    }
    let code = app.next_code().await;
    phone
        .login_with_code("frank", "password-frank", &code)
        .await
        .unwrap();
    me.change_password("password-frank", "password-frank-2", Some(&recovery[0]))
        .await
        .unwrap();
    let ended = phone.call(reqwest::Method::GET, "/v1/users/me", None).await;
    assert!(
        matches!(ended, Err(ClientError::Api { status: 401, .. })),
        "{ended:?}"
    );
    me.disable_two_factor("password-frank-2", &recovery[1])
        .await
        .unwrap();
    let mut again = Api::new(&base);
    again.login("frank", "password-frank-2").await.unwrap();
    again
        .call(
            reqwest::Method::POST,
            "/v1/channels",
            Some(json!({"name": "notes", "kind": "group", "members": []})),
        )
        .await
        .unwrap();
    let mut exported = Vec::new();
    let bytes = again.export(&mut exported).await.unwrap();
    assert_eq!(bytes as usize, exported.len());
    let lines: Vec<Value> = String::from_utf8(exported)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.first().unwrap()["type"], "export");
    assert_eq!(lines.last().unwrap()["type"], "end");
    again
        .delete_account("password-frank-2", None)
        .await
        .unwrap();
    let after = Api::new(&base).login("frank", "password-frank-2").await;
    assert!(
        matches!(after, Err(ClientError::Api { status: 401, .. })),
        "{after:?}"
    );
    server.stop().await;
}

/// The audit log: each account action is one line with who, what and from where, and
/// none carries a password, a code, a secret or a token.
#[tokio::test]
async fn account_actions_are_audited_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::child::ServerProcess::start(dir.path()).await;
    let base = server.base();
    let ivy = Client::new(&base).register("ivy").await;
    let (mut app, recovery) = enrol(&ivy, "password-ivy").await;
    let secret = totp::base32(&app.secret);
    let (s, body) = login(&base, "ivy", "password-ivy").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let challenge = body["challenge"].as_str().unwrap().to_owned();
    let code = app.next_code().await;
    let done = Client::new(&base)
        .post(
            "/v1/sessions/two-factor",
            json!({"challenge": challenge, "code": code}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK);
    let token = done.body["token"].as_str().unwrap().to_owned();
    let wrong = ivy
        .post(
            "/v1/users/me/password",
            json!({"current_password": "password-ivy", "new_password": "password-ivy-2", "code": "000000"}),
        )
        .await;
    assert_eq!(wrong.code(), "invalid_code");
    let changed = ivy
        .post(
            "/v1/users/me/password",
            json!({"current_password": "password-ivy", "new_password": "password-ivy-2", "code": recovery[0]}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::NO_CONTENT, "{changed:?}");
    let gone = ivy
        .call(
            Method::DELETE,
            "/v1/users/me",
            Some(json!({"password": "password-ivy-2", "code": recovery[1]})),
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{gone:?}");
    let log = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = server.log_text();
            if log.contains("account.deleted") || std::time::Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("natter::audit"))
        .collect();
    for action in [
        "two_factor.enrolment_begun",
        "two_factor.enabled",
        "login.password_ok_code_needed",
        "login.two_factor",
        "two_factor.wrong_code",
        "password.changed",
        "account.deleted",
    ] {
        let line = audit
            .iter()
            .find(|l| l.contains(action))
            .unwrap_or_else(|| panic!("no {action} in {audit:#?}"));
        assert!(
            line.contains("username=ivy") && line.contains("address=127.0.0.1"),
            "{line}"
        );
    }
    for secret_text in [
        "password-ivy",
        secret.as_str(),
        code.as_str(),
        recovery[0].as_str(),
        recovery[1].as_str(),
        token.as_str(),
        challenge.as_str(),
        ivy.token.as_deref().unwrap(),
    ] {
        assert!(!log.contains(secret_text), "the log shows {secret_text}");
    }
    server.terminate().await;
}

/// The server's peak resident memory (`VmHWM`) and current (`VmRSS`), in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// An export of 100,000 messages streams them all, in order, each once, with the
/// profile and memberships before and an `end` line after, while the server's peak
/// memory grows by a small fraction of what holding the history would take.
#[tokio::test]
async fn an_export_of_100k_messages_streams_in_bounded_memory() {
    use natter::store::{StoreLocation, StoreOptions};
    const MESSAGES: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    // The history is written through the store itself (far faster than 100,000 requests);
    // the export is read from a `natter serve` process.
    let store = natter::store::open(StoreOptions::new(StoreLocation::Sqlite(
        natter::config::db_path(dir.path()),
    )))
    .await
    .unwrap();
    let hash =
        natter::auth::hash_password("password-gina", natter::auth::HashCost::insecure_fast())
            .unwrap();
    let gina = store.create_user("gina", &hash, None).await.unwrap().id;
    let other = store.create_user("hal", &hash, None).await.unwrap().id;
    let mut channels = Vec::new();
    for name in ["one", "two", "three"] {
        let ch = store
            .create_channel(gina, natter::model::ChannelKind::Group, name, &[other])
            .await
            .unwrap();
        channels.push(ch.id);
    }
    // Long messages (500 characters), so the export (some 65 MB) dwarfs the page cache
    // of the server's one read connection (16 MiB), which reading it fills.
    let text = "a long message, as people write when they explain something. ".repeat(9);
    let text = &text[..500];
    for batch in 0..MESSAGES / 1000 {
        let sends = (0..1000).map(|i| {
            let ch = channels[(batch + i) % channels.len()];
            store.post_message(gina, ch, text, None)
        });
        for posted in futures_util::future::join_all(sends).await {
            posted.unwrap();
        }
        // Others' messages are not exported.
        store
            .post_message(other, channels[0], "not gina's", None)
            .await
            .unwrap();
    }
    store.close().await;
    drop(store);

    let server = common::child::ServerProcess::start_with(
        dir.path(),
        "127.0.0.1:0",
        &["--read-connections", "1"],
        &[],
    )
    .await;
    let base = server.base();
    let (s, body) = login(&base, "gina", "password-gina").await;
    assert_eq!(s, StatusCode::OK);
    let me = logged_in(&base, &body);
    let pid = server.child.id().unwrap();
    let (_, before) = memory_kib(pid);
    let mut res = reqwest::Client::new()
        .get(format!("{base}/v1/users/me/export"))
        .bearer_auth(me.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    // A second export waits for the first.
    let second = me.get("/v1/users/me/export").await;
    assert_eq!(
        (second.status, second.code()),
        (StatusCode::TOO_MANY_REQUESTS, "export_in_progress")
    );
    // A slow reader: the server waits for it rather than reading ahead.
    let first = res.chunk().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, while_waiting) = memory_kib(pid);
    let mut bytes = first.to_vec();
    while let Some(chunk) = res.chunk().await.unwrap() {
        bytes.extend_from_slice(&chunk);
    }
    let (peak, _) = memory_kib(pid);
    let text_out = String::from_utf8(bytes).unwrap();
    let lines: Vec<Value> = text_out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "export");
    assert_eq!(lines[1]["type"], "profile");
    assert_eq!(lines[1]["user"]["username"], "gina");
    let memberships = lines.iter().filter(|l| l["type"] == "membership").count();
    assert_eq!(memberships, 3);
    let ids: Vec<u64> = lines
        .iter()
        .filter(|l| l["type"] == "message")
        .map(|l| {
            assert_eq!(
                l["message"]["author_id"].as_str(),
                Some(me.user_id.as_str())
            );
            l["message"]["id"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(ids.len(), MESSAGES);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order, each once");
    let end = lines.last().unwrap();
    assert_eq!(
        (end["type"].as_str(), end["messages"].as_u64()),
        (Some("end"), Some(MESSAGES as u64))
    );
    // The server held a few pages of it at a time (and its read connection's page
    // cache): holding the export would have taken more than all of it.
    let size_kib = text_out.len() as u64 / 1024;
    let grew = peak.saturating_sub(before);
    eprintln!(
        "export: {size_kib} KiB sent; server RSS {before} KiB before, {while_waiting} KiB while the reader waited, peak {peak} KiB"
    );
    assert!(size_kib > 60_000, "{size_kib} KiB");
    assert!(
        grew < size_kib / 2,
        "the server's peak grew by {grew} KiB for a {size_kib} KiB export"
    );
    server.terminate().await;
}

/// The unread count of `channel` in `c`'s channel list.
async fn unread(c: &Client, channel: &str) -> i64 {
    let list = c.get("/v1/channels").await;
    list.body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"].as_str() == Some(channel))
        .unwrap_or_else(|| panic!("{channel} in {list:?}"))["unread"]
        .as_i64()
        .unwrap()
}

/// Deleting an account (password and code asked) ends its sessions, keys and sockets at
/// once; its messages stay in history under its id, now a deleted user; it leaves its
/// channels with `member.removed` (the one it owned passes to an admin) but stays in
/// its DM, which the other party still reads; unread counts do not move; its name is
/// taken until the hold passes, then free for a new account.
async fn a_deleted_account_leaves_history_readable_and_its_name_free_later() {
    let server = TestServer::start_with(|c| {
        with_key(c);
        c.limits.rules.username_hold = Duration::from_secs(3);
    })
    .await;
    let base = server.base();
    let alice = server.client().register("alice").await;
    let bob = server.client().register("bob").await;
    let carol = server.client().register("carol").await;
    let (_, body) = login(&base, "alice", "password-alice").await;
    let alice_phone = logged_in(&base, &body);
    // alice owns "g" (carol an admin there), bob owns "h"; alice and bob share a DM.
    let g = alice.create_channel("g", "group", &[&bob, &carol]).await;
    let made_admin = alice
        .call(
            Method::PUT,
            &format!("/v1/channels/{g}/members/{}", carol.user_id),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert!(made_admin.status.is_success(), "{made_admin:?}");
    let h = bob.create_channel("h", "group", &[&alice]).await;
    let dm = alice
        .post("/v1/dms", json!({"user_id": bob.user_id}))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (ch, text) in [(&g, "in g"), (&h, "in h"), (&dm, "in the dm")] {
        assert_eq!(alice.send(ch, text, None).await.status, StatusCode::CREATED);
    }
    bob.send(&dm, "bob in the dm", None).await;
    let bot = alice
        .post("/v1/bots", json!({"username": "alices_bot"}))
        .await;
    assert_eq!(bot.status, StatusCode::CREATED, "{bot:?}");
    let bot_id = bot.body["id"].as_str().unwrap().to_owned();
    let key = alice
        .post(
            "/v1/keys",
            json!({"name": "k", "scopes": ["users:read"], "user_id": bot_id}),
        )
        .await;
    assert_eq!(key.status, StatusCode::CREATED, "{key:?}");
    let mut bot_client = Client::new(&base);
    bot_client.token = Some(key.body["token"].as_str().unwrap().to_owned());
    assert_eq!(bot_client.get("/v1/users/me").await.status, StatusCode::OK);
    let unread_before = (unread(&bob, &g).await, unread(&bob, &dm).await);
    assert_eq!(unread_before, (1, 1));
    let mut ws = raw(server.addr).await;
    let hello = json!({"op": "hello", "token": alice_phone.token.as_deref().unwrap()});
    send_text(&mut ws, &hello.to_string()).await;
    let mut bob_live = common::ws::connect(&bob).await;

    let delete = |c: &Client, body: Value| {
        let c = c.clone();
        async move { c.call(Method::DELETE, "/v1/users/me", Some(body)).await }
    };
    let wrong = delete(&alice, json!({"password": "not-it-at-all"})).await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::FORBIDDEN, "wrong_password")
    );
    let gone = delete(&alice, json!({"password": "password-alice"})).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{gone:?}");

    // Bob sees it live: the account turns into a deleted one, and leaves "g".
    let alice_id: i64 = alice.user_id.parse().unwrap();
    let g_id: i64 = g.parse().unwrap();
    let seen = common::ws::until(&mut bob_live, |f| {
        matches!(f, natter::client::Frame::Event(e)
            if e.channel_id == g_id && e.kind == "member.removed" && e.user_id == Some(alice_id))
    })
    .await;
    assert!(
        seen.iter().any(|f| matches!(f,
            natter::client::Frame::UserUpdated { user_id, deleted: true, .. } if *user_id == alice_id)),
        "{seen:?}"
    );
    // Every token is dead at once: sessions, their sockets, the bot's key.
    let (_, code) = read_to_close(&mut ws).await;
    assert_eq!(code, Some(4001));
    for c in [&alice, &alice_phone, &bot_client] {
        assert_eq!(c.get("/v1/users/me").await.status, StatusCode::UNAUTHORIZED);
    }
    let (s, _) = login(&base, "alice", "password-alice").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // What stays is a deleted user, found by id, not by name.
    let shown = bob.get(&format!("/v1/users/{}", alice.user_id)).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert_eq!(
        (&shown.body["username"], &shown.body["deleted"]),
        (&json!("deleted"), &json!(true))
    );
    assert!(shown.body.get("display_name").is_none());
    assert_eq!(
        bob.get("/v1/users?username=alice").await.status,
        StatusCode::NOT_FOUND
    );
    let shown_bot = bob.get(&format!("/v1/users/{bot_id}")).await;
    assert_eq!(shown_bot.body["deleted"], true, "its bots go with it");
    let reserved = server
        .client()
        .post(
            "/v1/users",
            json!({"username": "Deleted", "password": "pretending-to-be-gone"}),
        )
        .await;
    assert_eq!(
        (reserved.status, reserved.body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("username")),
        "no one may pass as a deleted user"
    );

    // History keeps its messages, text and author id.
    let in_g = bob.all_messages(&g).await;
    assert_eq!(in_g.len(), 1);
    assert_eq!(
        (in_g[0]["text"].as_str(), in_g[0]["author_id"].as_str()),
        (Some("in g"), Some(alice.user_id.as_str()))
    );
    // It left "g" (carol, the admin, owns it now) and "h", with events saying so.
    let members = |c: &Client, ch: &str| {
        let (c, ch) = (c.clone(), ch.to_owned());
        async move {
            let a = c.get(&format!("/v1/channels/{ch}/members")).await;
            assert_eq!(a.status, StatusCode::OK, "{a:?}");
            a.body["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["user"]["id"].as_str().unwrap().to_owned(),
                        m["role"].as_str().unwrap().to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let in_g_now = members(&bob, &g).await;
    assert!(
        !in_g_now.iter().any(|(id, _)| *id == alice.user_id),
        "{in_g_now:?}"
    );
    assert!(
        in_g_now.contains(&(carol.user_id.clone(), "owner".to_owned())),
        "{in_g_now:?}"
    );
    assert!(
        !members(&bob, &h)
            .await
            .iter()
            .any(|(id, _)| *id == alice.user_id)
    );
    let events = bob.all_events(&g).await;
    common::assert_gap_free(&events);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        &kinds[kinds.len() - 2..],
        ["member.updated", "member.removed"],
        "{kinds:?}"
    );
    // The DM stays, both members in it, readable by bob.
    let in_dm = bob.all_messages(&dm).await;
    assert_eq!(in_dm.len(), 2);
    let dm_members = members(&bob, &dm).await;
    assert!(dm_members.iter().any(|(id, _)| *id == alice.user_id));
    // Unread counts did not move.
    assert_eq!(
        (unread(&bob, &g).await, unread(&bob, &dm).await),
        unread_before
    );
    // Nobody can add the deleted account anywhere, nor open a DM with it.
    let add = carol
        .call(
            Method::PUT,
            &format!("/v1/channels/{g}/members/{}", alice.user_id),
            Some(json!({})),
        )
        .await;
    assert_eq!(add.status, StatusCode::NOT_FOUND, "{add:?}");
    let dm2 = carol
        .post("/v1/dms", json!({"user_id": alice.user_id}))
        .await;
    assert_eq!(dm2.status, StatusCode::NOT_FOUND, "{dm2:?}");

    // The name is held, then free.
    let early = server
        .client()
        .post(
            "/v1/users",
            json!({"username": "alice", "password": "a-new-alice-pass"}),
        )
        .await;
    assert_eq!(
        (early.status, early.code()),
        (StatusCode::CONFLICT, "username_taken")
    );
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let later = server
        .client()
        .post(
            "/v1/users",
            json!({"username": "alice", "password": "a-new-alice-pass"}),
        )
        .await;
    assert_eq!(later.status, StatusCode::CREATED, "{later:?}");
    assert_ne!(later.body["user"]["id"], json!(alice.user_id));
    // The old messages still name the old account.
    let in_g = bob.all_messages(&g).await;
    assert_eq!(in_g[0]["author_id"].as_str(), Some(alice.user_id.as_str()));
    server.stop().await;
}

/// Codes are six digits: besides the login buckets, wrong codes have a tight budget of
/// their own per account, from every address together, which passwords do not touch.
#[tokio::test]
async fn wrong_codes_have_a_tight_budget_per_account_from_every_address() {
    let server = TestServer::start_with(|c| {
        common::behind_proxy_one_signup_each(c);
        c.limits.signups_per_ip = Rate {
            per_second: 1e9,
            burst: 1e9,
        };
        c.limits.code_failures_per_account = Rate {
            per_second: 0.0001,
            burst: 3.0,
        };
    })
    .await;
    let base = server.base();
    let jo = server.client().register("jody").await;
    let (mut app, _) = enrol(&jo, "password-jody").await;
    let from = |addr: &str, path: &str, body: Value| {
        let (base, addr, path) = (base.clone(), addr.to_owned(), path.to_owned());
        async move {
            let res = reqwest::Client::new()
                .post(format!("{base}{path}"))
                .header("x-forwarded-for", addr)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let creds = json!({"username": "jody", "password": "password-jody"});
    let (s, body) = from("192.0.2.1", "/v1/sessions", creds.clone()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let challenge = body["challenge"].as_str().unwrap().to_owned();
    let right = app.next_code().await;
    let wrong: Vec<String> = (0..1000)
        .map(|i| format!("{:06}", (i * 7919 + 13) % 1_000_000))
        .filter(|c| {
            totp::matching_step(&app.secret, c, Authenticator::now_step()).is_none() && *c != right
        })
        .take(4)
        .collect();
    for (n, code) in wrong[..3].iter().enumerate() {
        let (s, _) = from(
            &format!("198.51.100.{n}"),
            "/v1/sessions/two-factor",
            json!({"challenge": challenge, "code": code}),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    for code in [&wrong[3], &right] {
        let (s, _) = from(
            "203.0.113.9",
            "/v1/sessions/two-factor",
            json!({"challenge": challenge, "code": code}),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::TOO_MANY_REQUESTS,
            "a fourth address waits too"
        );
    }
    // The password's own buckets are untouched: a right password still gets a challenge.
    let (s, _) = from("203.0.113.10", "/v1/sessions", creds).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    server.stop().await;
}
