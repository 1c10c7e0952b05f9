//! Attachments (issue 17) over real sockets and the real files directory: uploads
//! streamed with a size limit and a quota, images checked by decoding them within bounds
//! (a decompression bomb refused), files served with ranges and validators to the
//! uploader and the members of a channel carrying them only, never as a page of this
//! origin, collected once no message carries them past the grace period, whole across a
//! SIGKILL mid-upload, and in `natter backup`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::child::ServerProcess;
use common::{Client, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A PNG of `w`×`h` pixels in a gradient.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 128, 255]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG that announces `w`×`h` pixels but carries almost no data: what a decompression
/// bomb looks like to a decoder before it allocates.
fn bomb(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        out.extend_from_slice(&crc_input);
        out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA
    chunk(&mut out, b"IHDR", &ihdr);
    // A zlib stream of one empty stored block: far too little data, never reached.
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 1],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A raw HTTP answer: status, headers and body bytes.
struct Raw {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn request(
    c: &Client,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Raw {
    let mut req = reqwest::Client::new().request(method, format!("{}{}", c.base, path));
    if let Some(t) = &c.token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.unwrap();
    Raw {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.unwrap().to_vec(),
    }
}

async fn upload(c: &Client, name: &str, content_type: &str, bytes: Vec<u8>) -> Raw {
    request(
        c,
        Method::POST,
        &format!("/v1/uploads?name={name}"),
        &[("content-type", content_type)],
        Some(bytes),
    )
    .await
}

async fn uploaded(c: &Client, name: &str, bytes: Vec<u8>) -> Value {
    let a = upload(c, name, "application/octet-stream", bytes).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.json());
    a.json()
}

async fn fetch(c: &Client, path: &str, headers: &[(&str, &str)]) -> Raw {
    request(c, Method::GET, path, headers, None).await
}

/// The files kept in a files directory (part files and trash aside).
fn kept_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if d.file_name().len() == 2 {
            out.extend(
                std::fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .map(|f| f.path()),
            );
        }
    }
    out
}

/// The part files of uploads in progress (under each node's `tmp/node-N`), with sizes.
fn part_files_sized(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    for node in std::fs::read_dir(dir.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(node.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(f.metadata().map_or(0, |m| m.len()));
        }
    }
    out
}

fn part_files(dir: &Path) -> usize {
    part_files_sized(dir).len()
}

async fn attachments_reach_members_only_with_ranges_and_validators() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    let bob = server.client().register("bob").await;
    let carol = server.client().register("carol").await;
    let channel = alice.create_channel("photos", "group", &[&bob]).await;

    let bytes = png(64, 48);
    let up = uploaded(&alice, "cat.png", bytes.clone()).await;
    let id = up["id"].as_str().unwrap().to_owned();
    assert_eq!(up["content_type"], "image/png");
    assert_eq!(
        (up["width"].as_i64(), up["height"].as_i64()),
        (Some(64), Some(48))
    );
    assert_eq!(up["size"], bytes.len());
    assert_eq!(up["thumbnail"], true);
    assert_eq!(up["name"], "cat.png");
    let sha: String = sha2_hex(&bytes);
    assert_eq!(up["sha256"], sha.as_str());

    // A message of the file alone; bob sees it in history with the file described.
    let sent = alice
        .post(
            &format!("/v1/channels/{channel}/messages"),
            json!({"attachments": [id], "client_id": "photo-1"}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::CREATED, "{sent:?}");
    assert_eq!(sent.body["text"], "");
    let history = bob.all_messages(&channel).await;
    let shown = &history.last().unwrap()["attachments"][0];
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["name"], "cat.png");
    assert_eq!(shown["content_type"], "image/png");
    assert_eq!(shown["thumbnail"], true);
    assert_eq!(shown["width"], 64);
    let events = bob.all_events(&channel).await;
    assert_eq!(
        events.last().unwrap()["message"]["attachments"][0]["id"],
        id.as_str()
    );

    // Bob, a member, downloads it whole, by range, and revalidates it.
    let path = format!("/v1/files/{id}");
    let got = fetch(&bob, &path, &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, bytes);
    assert_eq!(got.header("content-length"), bytes.len().to_string());
    assert_eq!(got.header("content-type"), "image/png");
    assert_eq!(got.header("etag"), format!("\"{sha}\""));
    assert_eq!(got.header("accept-ranges"), "bytes");
    assert_eq!(got.header("x-content-type-options"), "nosniff");
    assert!(
        got.header("cache-control").contains("private"),
        "{}",
        got.header("cache-control")
    );
    assert!(got.header("content-disposition").starts_with("inline;"));
    let part = fetch(&bob, &path, &[("range", "bytes=10-19")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, bytes[10..20]);
    assert_eq!(
        part.header("content-range"),
        format!("bytes 10-19/{}", bytes.len())
    );
    assert_eq!(part.header("content-length"), "10");
    let tail = fetch(&bob, &path, &[("range", "bytes=-7")]).await;
    assert_eq!(tail.body, bytes[bytes.len() - 7..]);
    let past = fetch(
        &bob,
        &path,
        &[("range", &format!("bytes={}-", bytes.len()))],
    )
    .await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    let held = fetch(&bob, &path, &[("if-none-match", &format!("\"{sha}\""))]).await;
    assert_eq!(held.status, StatusCode::NOT_MODIFIED);
    assert!(held.body.is_empty());
    let thumb = fetch(&bob, &format!("{path}/thumbnail"), &[]).await;
    assert_eq!(thumb.status, StatusCode::OK);
    assert_eq!(thumb.header("content-type"), "image/png");
    let small = image::load_from_memory(&thumb.body).unwrap();
    assert!(small.width() <= 320 && small.height() <= 320);

    // Carol, no member, and an anonymous caller see nothing, as for a missing file.
    assert_eq!(
        fetch(&carol, &path, &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        fetch(&carol, &format!("{path}/thumbnail"), &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let anonymous = server.client();
    assert_eq!(
        fetch(&anonymous, &path, &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        fetch(&bob, "/v1/files/999999", &[]).await.status,
        StatusCode::NOT_FOUND
    );

    // An upload is attached by its uploader only, at most 10 to a message, each once.
    let bobs = uploaded(&bob, "b.bin", b"bob's bytes".to_vec()).await;
    let bobs_id = bobs["id"].as_str().unwrap();
    assert_eq!(bobs["content_type"], "application/octet-stream");
    assert_eq!(bobs["thumbnail"], false);
    let send = |atts: Value| {
        let alice = alice.clone();
        let channel = channel.clone();
        async move {
            alice
                .post(
                    &format!("/v1/channels/{channel}/messages"),
                    json!({"text": "x", "attachments": atts}),
                )
                .await
        }
    };
    for refused in [
        json!([bobs_id]),
        json!([id, id]),
        json!(["123456"]),
        json!(vec![id.clone(); 11]),
    ] {
        let a = send(refused.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{refused}: {a:?}");
        assert_eq!(a.body["error"]["field"], "attachments");
    }
    // Bob's own upload is his to read before it is attached, and no one else's.
    assert_eq!(
        fetch(&bob, &format!("/v1/files/{bobs_id}"), &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        fetch(&alice, &format!("/v1/files/{bobs_id}"), &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // Deleted, the message carries the file no more: bob loses it; alice keeps hers.
    let message_id = sent.body["id"].as_str().unwrap();
    let deleted = alice
        .call(
            Method::DELETE,
            &format!("/v1/channels/{channel}/messages/{message_id}"),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(fetch(&bob, &path, &[]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(fetch(&alice, &path, &[]).await.status, StatusCode::OK);
    let history = bob.all_messages(&channel).await;
    assert!(history.last().unwrap().get("attachments").is_none());
    server.stop().await;
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unreferenced uploads stay through the grace period and are collected after it, their
/// bytes with them; a file a message carries stays; bytes shared with a kept upload stay.
async fn unreferenced_uploads_are_collected_after_the_grace_period_only() {
    let grace = Duration::from_secs(4);
    let server = TestServer::start_with(|c| {
        c.files.grace = grace;
        c.files.collect_every = Duration::from_millis(200);
    })
    .await;
    let files_dir = server.dir.path().join("files");
    let alice = server.client().register("alice").await;
    let channel = alice.create_channel("gc", "group", &[]).await;
    let started = Instant::now();
    let loose = uploaded(&alice, "loose.bin", b"nobody attaches this".to_vec()).await;
    let kept = uploaded(&alice, "kept.bin", b"a message carries this".to_vec()).await;
    // The same bytes as the kept one, uploaded again and never attached.
    let twin = uploaded(&alice, "twin.bin", b"a message carries this".to_vec()).await;
    let sent = alice
        .post(
            &format!("/v1/channels/{channel}/messages"),
            json!({"text": "keep", "attachments": [kept["id"]]}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::CREATED, "{sent:?}");
    assert_eq!(kept_files(&files_dir).len(), 2);
    let file = |v: &Value| format!("/v1/files/{}", v["id"].as_str().unwrap());

    // Several collection passes within the grace period leave everything.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(started.elapsed() < grace);
    assert_eq!(
        fetch(&alice, &file(&loose), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        fetch(&alice, &file(&twin), &[]).await.status,
        StatusCode::OK
    );

    // Past it, the loose upload and its bytes go; the twin goes but its bytes stay.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch(&alice, &file(&loose), &[]).await.status == StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the loose upload was never collected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= grace,
        "collected before its grace period"
    );
    while fetch(&alice, &file(&twin), &[]).await.status == StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the twin upload was never collected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = kept_files(&files_dir);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with(kept["sha256"].as_str().unwrap()));
    let got = fetch(&alice, &file(&kept), &[]).await;
    assert_eq!(got.body, b"a message carries this");
    server.stop().await;
}

/// What a crash mid-collection leaves is settled: a file in this node's trash that an
/// upload still uses is put back at start, and a file no upload names is swept once older
/// than the grace period.
#[tokio::test]
async fn files_a_crash_left_behind_are_settled() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    let kept = uploaded(&alice, "kept.bin", b"still used".to_vec()).await;
    let channel = alice.create_channel("c", "group", &[]).await;
    let sent = alice
        .post(
            &format!("/v1/channels/{channel}/messages"),
            json!({"attachments": [kept["id"]]}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::CREATED);
    let sha = kept["sha256"].as_str().unwrap().to_owned();
    let orphan = "0".repeat(64);
    let grace = Duration::from_secs(3);
    let server = server
        .restart_tweaked(
            |dir| {
                let files = dir.join("files");
                // Moved to the trash by a collection that stopped before asking again.
                std::fs::rename(
                    files.join(&sha[..2]).join(&sha),
                    files.join("trash/node-0").join(format!("{sha}.0a0b")),
                )
                .unwrap();
                // Its record deleted, its removal never done.
                std::fs::create_dir_all(files.join("00")).unwrap();
                std::fs::write(files.join("00").join(&orphan), b"orphan").unwrap();
            },
            |c| {
                c.files.grace = grace;
                c.files.collect_every = Duration::from_millis(200);
            },
        )
        .await;
    let started = Instant::now();
    let files_dir = server.dir.path().join("files");
    let alice = alice.with_base(&server.base());
    let path = format!("/v1/files/{}", kept["id"].as_str().unwrap());
    assert_eq!(fetch(&alice, &path, &[]).await.body, b"still used");
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_dir.join("00").join(&orphan).exists() {
        assert!(Instant::now() < deadline, "the orphan was never swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= grace);
    assert_eq!(fetch(&alice, &path, &[]).await.body, b"still used");
    server.stop().await;
}

crate::on_both_backends!(
    attachments_reach_members_only_with_ranges_and_validators,
    unreferenced_uploads_are_collected_after_the_grace_period_only,
);

/// Past the size limit an upload is 413 and nothing is kept (declared or streamed); past
/// the quota, 413 `upload_quota`; an upload too old to attach is refused.
#[tokio::test]
async fn uploads_past_their_limits_are_refused_and_keep_nothing() {
    let server = TestServer::start_with(|c| {
        c.files.max_upload_bytes = 1000;
        c.files.quota_bytes = 2500;
    })
    .await;
    let files_dir = server.dir.path().join("files");
    let alice = server.client().register("alice").await;
    let big = upload(&alice, "big.bin", "application/octet-stream", vec![7; 1001]).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(big.json()["error"]["code"], "payload_too_large");
    // Streamed without a length: cut off at the limit all the same.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![1u8; 100])).collect();
    let streamed = reqwest::Client::new()
        .post(format!("{}/v1/uploads", alice.base))
        .bearer_auth(alice.token.as_deref().unwrap())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(kept_files(&files_dir).is_empty());
    assert_eq!(part_files(&files_dir), 0);

    uploaded(&alice, "a.bin", vec![1; 1000]).await;
    uploaded(&alice, "b.bin", vec![2; 1000]).await;
    let over = upload(&alice, "c.bin", "application/octet-stream", vec![3; 600]).await;
    assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(over.json()["error"]["code"], "upload_quota");
    assert_eq!(kept_files(&files_dir).len(), 2);
    let named = upload(&alice, "a%2Fb", "application/octet-stream", vec![1]).await;
    assert_eq!(named.status, StatusCode::BAD_REQUEST, "{:?}", named.json());
    let empty = upload(&alice, "empty.txt", "text/plain", Vec::new()).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST, "{:?}", empty.json());
    assert_eq!(empty.json()["error"]["field"], "body");
    server.stop().await;
}

/// An HTML body named and typed as an image is no image: it is served as a download of
/// octet-stream, never as HTML, and sandboxed; no thumbnail.
#[tokio::test]
async fn a_page_disguised_as_an_image_is_served_as_a_download() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    let page = b"<html><body><script>alert(document.cookie)</script></body></html>".to_vec();
    let up = upload(&alice, "cat.png", "image/png", page.clone()).await;
    assert_eq!(up.status, StatusCode::CREATED);
    let up = up.json();
    assert_eq!(up["content_type"], "application/octet-stream");
    assert_eq!(up["thumbnail"], false);
    let path = format!("/v1/files/{}", up["id"].as_str().unwrap());
    let got = fetch(&alice, &path, &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, page);
    assert_eq!(got.header("content-type"), "application/octet-stream");
    assert!(got.header("content-disposition").starts_with("attachment;"));
    assert!(
        got.header("content-disposition")
            .contains("filename=\"cat.png\"")
    );
    assert_eq!(got.header("x-content-type-options"), "nosniff");
    assert!(got.header("content-security-policy").contains("sandbox"));
    let thumb = fetch(&alice, &format!("{path}/thumbnail"), &[]).await;
    assert_eq!(thumb.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

/// A PNG announcing far more pixels than it carries is refused before its pixels are
/// allocated, whether past the edge bound or just past the decode memory bound; the
/// server's peak memory stays far below what decoding it would take.
#[tokio::test]
async fn a_decompression_bomb_is_refused_without_exhausting_memory() {
    let server = TestServer::start().await;
    let files_dir = server.dir.path().join("files");
    let alice = server.client().register("alice").await;
    // 100,000² RGBA would be 40 GB; 15,000² (within the edge bound) 900 MB.
    for (w, h) in [(100_000, 100_000), (15_000, 15_000)] {
        let a = upload(&alice, "bomb.png", "image/png", bomb(w, h)).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{w}×{h}: {:?}",
            a.json()
        );
        assert_eq!(a.json()["error"]["code"], "image_too_large");
    }
    assert!(kept_files(&files_dir).is_empty());
    assert_eq!(part_files(&files_dir), 0);
    let peak_kib: u64 = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 600 * 1024, "peak memory {peak_kib} KiB");
    // An ordinary image still goes through.
    uploaded(&alice, "ok.png", png(10, 10)).await;
    server.stop().await;
}

/// SIGKILL mid-upload: the part file is dropped at the next start, no upload is
/// recorded, no file is kept, and uploading again works.
#[tokio::test]
async fn a_crash_mid_upload_leaves_no_half_file() {
    let dir = tempfile::tempdir().unwrap();
    let files_dir = dir.path().join("files");
    let server = ServerProcess::start(dir.path()).await;
    let alice = Client::new(&server.base()).register("alice").await;
    // A body that sends half and then waits forever.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tx.send(Ok(vec![9u8; 64 * 1024])).await.unwrap();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let req = reqwest::Client::new()
        .post(format!("{}/v1/uploads?name=half.bin", alice.base))
        .bearer_auth(alice.token.as_deref().unwrap())
        .header("content-length", (128 * 1024).to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let pending = tokio::spawn(req);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let written = part_files_sized(&files_dir).iter().any(|&n| n >= 64 * 1024);
        if written {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upload's first half never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().await;
    let _ = pending.await;
    drop(tx);
    assert_eq!(
        part_files(&files_dir),
        1,
        "the half file is there after the crash"
    );

    let server = ServerProcess::start(dir.path()).await;
    assert_eq!(part_files(&files_dir), 0, "dropped at start");
    assert!(kept_files(&files_dir).is_empty());
    let alice = alice.with_base(&server.base());
    let again = uploaded(&alice, "whole.bin", vec![9u8; 128 * 1024]).await;
    assert_eq!(
        fetch(
            &alice,
            &format!("/v1/files/{}", again["id"].as_str().unwrap()),
            &[]
        )
        .await
        .body
        .len(),
        128 * 1024
    );
    server.terminate().await;
    let db = rusqlite::Connection::open(dir.path().join("natter.db")).unwrap();
    let uploads: i64 = db
        .query_row("SELECT count(*) FROM uploads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(uploads, 1, "only the whole upload is recorded");
}

/// `natter backup` copies the files the database records beside it, and a server started
/// on the backup serves them.
#[tokio::test]
async fn a_backup_carries_the_files() {
    let server = TestServer::start().await;
    let alice = server.client().register("alice").await;
    let channel = alice.create_channel("b", "group", &[]).await;
    let bytes = png(30, 20);
    let up = uploaded(&alice, "pic.png", bytes.clone()).await;
    let sent = alice
        .post(
            &format!("/v1/channels/{channel}/messages"),
            json!({"text": "pic", "attachments": [up["id"]]}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::CREATED);
    let to = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natter"))
        .arg("backup")
        .arg("--data-dir")
        .arg(server.dir.path())
        .arg(to.path().join("copy"))
        .env_remove("NATTER_DATA_DIR")
        .env_remove("NATTER_FILES_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("and 2 uploaded files"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    server.stop().await;
    let restored = ServerProcess::start(&to.path().join("copy")).await;
    let mut alice = alice.with_base(&restored.base());
    let login = Client::new(&restored.base())
        .post(
            "/v1/sessions",
            json!({"username": "alice", "password": "password-alice"}),
        )
        .await;
    assert!(login.status.is_success(), "{login:?}");
    alice.token = login.body["token"].as_str().map(str::to_owned);
    let path = format!("/v1/files/{}", up["id"].as_str().unwrap());
    assert_eq!(fetch(&alice, &path, &[]).await.body, bytes);
    assert_eq!(
        fetch(&alice, &format!("{path}/thumbnail"), &[])
            .await
            .status,
        StatusCode::OK
    );
    restored.terminate().await;
}
