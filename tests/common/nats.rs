//! A real `nats-server` (Debian's package) for tests, on a free loopback port, stopped
//! when dropped and killed with the test process even on a panic (parent-death signal).
//! [`Nats::stop`] and [`Nats::start_again`] take it away and bring it back on the same
//! port, for tests of the cluster bus without NATS.

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = "/usr/sbin/nats-server";

pub struct Nats {
    pub port: u16,
    child: Mutex<Option<Child>>,
}

/// Whether nats-server is installed; without it (and without `CI`) the caller skips.
pub fn installed() -> bool {
    super::available(
        "nats-server (apt-get install nats-server)",
        std::path::Path::new(BIN).exists(),
    )
}

impl Nats {
    /// A new server on a free port; `None` (skip) when nats-server is not installed.
    pub fn start() -> Option<Self> {
        if !installed() {
            return None;
        }
        let port = super::free_port();
        let nats = Self {
            port,
            child: Mutex::new(None),
        };
        nats.start_again();
        Some(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub fn start_again(&self) {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(BIN);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only an async-signal-safe call between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start nats-server");
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server listens within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL: gone at once, as a crash would be).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}
