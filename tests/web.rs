//! The web client in a real browser: runs `tests/web/e2e.mjs` (playwright-core driving
//! Debian's chromium) against the `natter` binary cargo built. The script starts, stops
//! and restarts the server itself. Needs node, `npm ci` (playwright-core) and chromium;
//! `.ci/run` installs them. Elsewhere a missing piece skips the test, loudly, except
//! under CI, where it fails.

mod common;

use std::path::Path;
use std::process::Command;

fn missing() -> Option<&'static str> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node");
    }
    if !root.join("node_modules/playwright-core").is_dir() {
        return Some("node_modules/playwright-core (run `npm ci`)");
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some("chromium (apt-get install chromium)");
    }
    None
}

#[test]
fn two_people_chat_in_a_real_browser() {
    let missing = missing();
    if !common::available(missing.unwrap_or_default(), missing.is_none()) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    let out = Command::new("node")
        .arg("tests/web/e2e.mjs")
        .current_dir(root)
        .env("NATTER_BIN", env!("CARGO_BIN_EXE_natter"))
        .env("SCREENSHOT_DIR", &shots)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "e2e failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("ok: screenshots in"), "{stdout}");
    for shot in [
        "login.png",
        "chat.png",
        "general.png",
        "offline.png",
        "phone.png",
    ] {
        let len = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 1000, "{shot} was saved");
    }
    eprintln!("{stdout}");
}
