//! The shipped `ops/nginx.conf`, run by a real nginx in front of a real server: TLS
//! termination, HSTS, the HTTP → HTTPS redirect, the WebSocket upgrade, request ids passed
//! through, client addresses forwarded to the rate limits, and `/metrics` kept private;
//! and in front of a recorder of request heads, to check that the WebSocket location
//! forwards the same headers as every other (Natter does not act on all of them).
//! Needs Debian's nginx, openssl and curl (CI installs them); skipped loudly elsewhere.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use common::{TestServer, free_port};

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
        "user root;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n\
         log_format ids '$request_id $uri';\naccess_log {d}/access.log ids;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
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

fn nginx_present() -> bool {
    let present = Command::new("nginx").arg("-v").output().is_ok()
        && Command::new("openssl").arg("version").output().is_ok()
        && Command::new("curl").arg("--version").output().is_ok();
    common::available(
        "nginx, openssl or curl (apt-get install nginx openssl curl)",
        present,
    )
}

/// The shipped conf running in a real nginx in front of `upstream`.
struct Nginx {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    http: u16,
    https: u16,
}

impl Nginx {
    async fn start(upstream: &str) -> Self {
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
        std::fs::write(&conf, nginx_conf(dir.path(), upstream, http, https)).unwrap();
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
        let child = tokio::process::Command::new("nginx")
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
        Self {
            child,
            dir,
            http,
            https,
        }
    }

    fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.https)
    }

    /// The request ids nginx logged for `uri`, once it has logged `n` of them.
    async fn logged_ids(&self, uri: &str, n: usize) -> Vec<String> {
        let log = self.dir.path().join("access.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ids: Vec<String> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, u)| *u == uri)
                .map(|(id, _)| id.to_owned())
                .collect();
            if ids.len() >= n {
                return ids;
            }
            assert!(
                Instant::now() < deadline,
                "nginx logs {n} of {uri}: {ids:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// curl's answer to a WebSocket upgrade of `url` (HTTP/1.1, as browsers do).
fn upgrade(url: &str, extra: &[&str]) -> String {
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_conf_proxies_tls_hsts_websockets_request_ids_and_client_addresses() {
    if !nginx_present() {
        return;
    }
    let server = TestServer::start_with(common::behind_proxy_one_signup_each).await;
    let nginx = Nginx::start(&server.addr.to_string()).await;
    let (base, http) = (nginx.base(), nginx.http);
    let checks = tokio::task::spawn_blocking(move || {
        // HTTPS to the server; the request id nginx made is the one Natter answers with.
        let ready = curl(&[&format!("{base}/readyz")]);
        assert!(ready.starts_with("HTTP/2 200"), "{ready}");
        let is_nginx_id = |id: &str| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let id = header(&ready, "x-request-id").expect("x-request-id");
        assert!(is_nginx_id(id), "nginx's $request_id: {id}");
        // HSTS on every HTTPS answer, an error's too; not on plain HTTP.
        let hsts = Some("max-age=31536000; includeSubDomains");
        assert_eq!(header(&ready, "strict-transport-security"), hsts, "{ready}");
        // Plain HTTP is redirected.
        let plain = curl(&[&format!("http://127.0.0.1:{http}/readyz")]);
        assert!(plain.starts_with("HTTP/1.1 301"), "{plain}");
        assert_eq!(header(&plain, "location"), Some("https://127.0.0.1/readyz"));
        assert_eq!(header(&plain, "strict-transport-security"), None);
        // The WebSocket upgrade goes through, and Natter got nginx's request id for it.
        let upgraded = upgrade(&format!("{base}/v1/ws"), &[]);
        assert!(upgraded.starts_with("HTTP/1.1 101"), "{upgraded}");
        assert_eq!(
            header(&upgraded, "sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        let ws_id = header(&upgraded, "x-request-id").expect("x-request-id");
        assert!(is_nginx_id(ws_id), "nginx's $request_id on /v1/ws: {ws_id}");
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
        let metrics = curl(&[&format!("{base}/metrics")]);
        assert!(metrics.starts_with("HTTP/2 404"), "{metrics}");
        assert_eq!(header(&metrics, "strict-transport-security"), hsts);
    });
    let result = checks.await;
    nginx.stop().await;
    server.stop().await;
    result.unwrap();
}

/// Request heads an upstream received: (path, headers by lower-case name).
type Heads = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

/// An upstream on 127.0.0.1:0 that records every request head and answers it (101 to an
/// upgrade, else 200) and closes: what nginx forwards, read directly.
async fn recorder() -> (SocketAddr, Heads) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Heads::default();
    let kept = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                let mut line = String::new();
                socket.read_line(&mut line).await.unwrap();
                let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                let mut headers = BTreeMap::new();
                loop {
                    line.clear();
                    socket.read_line(&mut line).await.unwrap();
                    let Some((k, v)) = line.trim_end().split_once(':') else {
                        break;
                    };
                    headers.insert(k.to_ascii_lowercase(), v.trim().to_owned());
                }
                let answer = if headers.contains_key("upgrade") {
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                };
                kept.lock().unwrap().push((path, headers));
                let _ = socket.get_mut().write_all(answer.as_bytes()).await;
                let _ = socket.get_mut().shutdown().await;
            });
        }
    });
    (addr, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nginx_websocket_location_drops_no_forwarded_header() {
    if !nginx_present() {
        return;
    }
    let (upstream, heads) = recorder().await;
    let nginx = Nginx::start(&upstream.to_string()).await;
    let base = nginx.base();
    tokio::task::spawn_blocking(move || {
        let from = ["-H", "x-forwarded-for: 198.51.100.7"];
        let plain = curl(&[&from[..], &[&format!("{base}/readyz")]].concat());
        assert!(plain.starts_with("HTTP/2 200"), "{plain}");
        let upgraded = upgrade(&format!("{base}/v1/ws"), &from);
        assert!(upgraded.starts_with("HTTP/1.1 101"), "{upgraded}");
    })
    .await
    .unwrap();
    let ids = [
        nginx.logged_ids("/readyz", 1).await,
        nginx.logged_ids("/v1/ws", 1).await,
    ];
    let heads = heads.lock().unwrap().clone();
    nginx.stop().await;
    for (path, id) in [("/readyz", &ids[0][0]), ("/v1/ws", &ids[1][0])] {
        let (_, h) = heads
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("the upstream got {path}: {heads:?}"));
        let got = |name: &str| h.get(name).map(String::as_str);
        let expected = [
            ("x-request-id", Some(id.as_str())),
            ("host", Some("127.0.0.1")),
            ("x-forwarded-for", Some("198.51.100.7, 127.0.0.1")),
            ("x-forwarded-proto", Some("https")),
        ];
        for (name, value) in expected {
            assert_eq!(got(name), value, "{name} on {path}: {h:?}");
        }
    }
}
