//! A `natter serve` child process on `127.0.0.1:0`, for tests that kill or signal it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every line the server has logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts `natter serve` on `data_dir` and waits until it listens.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_at(data_dir, "127.0.0.1:0").await
    }

    /// Starts `natter serve` on `data_dir` listening on `listen`.
    pub async fn start_at(data_dir: &Path, listen: &str) -> Self {
        Self::start_with(data_dir, listen, &[], &[]).await
    }

    /// Starts `natter serve` with extra flags and environment variables.
    pub async fn start_with(
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_natter"));
        command
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("NATTER_INSECURE_FAST_PASSWORD_HASH", "1")
            .env("NATTER_SEND_RATE", "1000000")
            .env("NATTER_SEND_BURST", "1000000")
            .env("NATTER_WRITE_RATE", "1000000")
            .env("NATTER_WRITE_BYTES_PER_SEC", "1000000000")
            .env("NATTER_CHANNEL_CREATES_PER_HOUR", "1000000000")
            .env("NATTER_MEMBERSHIP_CONSENT", "open")
            .env("NATTER_LOG", "info");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn natter serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&log);
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let addr = natter::server::listening_addr(&line);
                kept.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    return addr;
                }
            }
            panic!(
                "natter serve exited before listening: {:?}",
                kept.lock().unwrap()
            );
        })
        .await
        .expect("natter serve listens within 30 s");
        // Keep reading its log so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock().unwrap().push(line);
            }
        });
        Self { child, addr, log }
    }

    /// Sends `signal` (a `kill -s` name: TERM, INT, HUP).
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("a running child").to_string();
        let status = Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -s {signal}");
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("natter exits within {limit:?}"))
            .unwrap()
    }

    /// The log so far, one string.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(mut self) {
        let pid = self.child.id().expect("a running child").to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("natter exits within 30 s of SIGTERM")
            .unwrap();
        assert!(exit.success(), "natter exited with {exit}");
    }

    /// SIGKILL: no chance to flush or clean up.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}
