//! A `natter serve` child process on `127.0.0.1:0`, for tests that kill or signal it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `natter serve` on `data_dir` and waits until it listens.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_at(data_dir, "127.0.0.1:0").await
    }

    /// Starts `natter serve` on `data_dir` listening on `listen`.
    pub async fn start_at(data_dir: &Path, listen: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_natter"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .env("NATTER_INSECURE_FAST_PASSWORD_HASH", "1")
            .env("NATTER_SEND_RATE", "1000000")
            .env("NATTER_SEND_BURST", "1000000")
            .env("NATTER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn natter serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(addr) = natter::server::listening_addr(&line) {
                    return addr;
                }
            }
            panic!("natter serve exited before listening");
        })
        .await
        .expect("natter serve listens within 30 s");
        // Keep draining its log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
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
