//! The shipped `ops/nginx.conf`, run by a real nginx in front of a real server: TLS
//! termination, the HTTP → HTTPS redirect, the WebSocket upgrade, request ids passed
//! through, client addresses forwarded to the rate limits, and `/metrics` kept private.
//! Needs Debian's nginx and curl (CI installs nginx); skipped loudly elsewhere.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped file with test addresses and paths, inside a minimal main config.
fn nginx_conf(dir: &Path, upstream: &str, http: u16, https: u16) -> String {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/nginx.conf"))
            .unwrap();
    let d = dir.display();
    let mut site = shipped;
    for (from, to) in [
        ("server 127.0.0.1:8080", format!("server {upstream}")),
        ("listen 80;", format!("listen 127.0.0.1:{http};")),
        (
            "listen 443 ssl http2;",
            format!("listen 127.0.0.1:{https} ssl http2;"),
        ),
        ("listen [::]:80;", String::new()),
        ("listen [::]:443 ssl http2;", String::new()),
        (
            "/etc/letsencrypt/live/chat.example.com/fullchain.pem",
            format!("{d}/cert.pem"),
        ),
        (
            "/etc/letsencrypt/live/chat.example.com/privkey.pem",
            format!("{d}/key.pem"),
        ),
    ] {
        assert!(site.contains(from), "ops/nginx.conf has `{from}`");
        site = site.replace(from, &to);
    }
    format!(
        "user root;\ndaemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n\
         access_log {d}/access.log;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
         {site}\n}}\n"
    )
}

/// curl's output (headers and body) for `args`.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-k", "-i", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_conf_proxies_tls_websockets_request_ids_and_client_addresses() {
    let present = Command::new("nginx").arg("-v").output().is_ok();
    if !common::available("nginx (apt-get install nginx)", present) {
        return;
    }
    let server = TestServer::start_with(common::behind_proxy_one_signup_each).await;
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let (http, https) = (free_port(), free_port());
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_conf(dir.path(), &server.addr.to_string(), http, https),
    )
    .unwrap();
    let check = Command::new("nginx")
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut nginx = tokio::process::Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", https))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nginx listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = format!("https://127.0.0.1:{https}");
    let checks = tokio::task::spawn_blocking(move || {
        // HTTPS to the server; the request id nginx made is the one Natter answers with.
        let ready = curl(&[&format!("{base}/readyz")]);
        assert!(ready.starts_with("HTTP/2 200"), "{ready}");
        let id = header(&ready, "x-request-id").expect("x-request-id");
        assert_eq!(id.len(), 32, "nginx's $request_id: {id}");
        // Plain HTTP is redirected.
        let plain = curl(&[&format!("http://127.0.0.1:{http}/readyz")]);
        assert!(plain.starts_with("HTTP/1.1 301"), "{plain}");
        assert_eq!(header(&plain, "location"), Some("https://127.0.0.1/readyz"));
        // The WebSocket upgrade goes through (HTTP/1.1, as browsers do).
        let upgrade = curl(&[
            "--http1.1",
            "-N",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "--max-time",
            "2",
            &format!("{base}/v1/ws"),
        ]);
        assert!(upgrade.starts_with("HTTP/1.1 101"), "{upgrade}");
        assert_eq!(
            header(&upgrade, "sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        // Sign-up limits apply per client address, as nginx forwards it.
        let signup = |name: &str, from: &str| {
            curl(&[
                "-H",
                "content-type: application/json",
                "-H",
                &format!("x-forwarded-for: {from}"),
                "-d",
                &format!(r#"{{"username":"{name}","password":"password-long-enough"}}"#),
                &format!("{base}/v1/users"),
            ])
        };
        assert!(signup("first", "198.51.100.7").starts_with("HTTP/2 201"));
        assert!(signup("second", "198.51.100.7").starts_with("HTTP/2 429"));
        assert!(signup("third", "203.0.113.9").starts_with("HTTP/2 201"));
        // /metrics stays private.
        assert!(curl(&[&format!("{base}/metrics")]).starts_with("HTTP/2 404"));
    });
    let result = checks.await;
    nginx.kill().await.unwrap();
    server.stop().await;
    result.unwrap();
}
