//! A real PostgreSQL 15 (Debian's package) for tests: one shared instance per test binary,
//! a fresh database per test ([`databases`]), and private instances for tests that stop or
//! restart one ([`Postgres::start`]). PostgreSQL refuses to run as root, so as root the
//! server runs as the `postgres` user. Every instance gets SIGINT (fast shutdown) when the
//! test process ends, even on a panic: it is started from a thread that lives as long as
//! the process, with that as its parent-death signal; a private one is stopped when
//! dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::free_port;

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

/// Whether PostgreSQL 15 is installed; without it (and without `CI`) the caller skips.
pub fn installed() -> bool {
    super::available(
        "PostgreSQL 15 (apt-get install postgresql)",
        Path::new(BIN).join("postgres").exists(),
    )
}

/// The instance this test binary shares, started on first use; `None` (the test is
/// skipped) when PostgreSQL is not installed.
pub fn shared() -> Option<&'static Postgres> {
    SHARED
        .get_or_init(|| {
            let pg = installed().then(Postgres::start);
            if pg.is_some() {
                // SAFETY: registering a plain `extern "C" fn` with no arguments.
                unsafe { libc::atexit(stop_shared) };
            }
            pg
        })
        .as_ref()
}

static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();

/// At exit: stops the shared instance and removes its files (a static is never
/// dropped; the parent-death signal alone would leave the files).
extern "C" fn stop_shared() {
    if let Some(Some(pg)) = SHARED.get() {
        pg.stop();
        let _ = std::fs::remove_dir_all(pg.dir.path());
    }
}

/// `n` fresh databases on the shared instance, as `postgres://` URLs; `None` to skip.
pub async fn databases(n: usize) -> Option<Vec<String>> {
    let pg = shared()?;
    let mut urls = Vec::with_capacity(n);
    for _ in 0..n {
        urls.push(pg.database().await);
    }
    Some(urls)
}

fn as_postgres_user() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_ids() -> (u32, u32) {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    let uid = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out = Command::new("id")
        .args(["-g", "postgres"])
        .output()
        .unwrap();
    let gid = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (uid, gid)
}

/// A command run as the `postgres` user when we are root (what `runuser -u postgres`
/// does), with SIGINT as its parent-death signal when `die_with_parent`.
fn command(program: &str, die_with_parent: bool) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(Path::new(BIN).join(program));
    let ids = as_postgres_user().then(postgres_ids);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = ids
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // Set after the change of user, which clears it.
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

impl Postgres {
    /// Initialises a cluster in a temporary directory and starts it on a free port.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("natter-pg")
            .tempdir()
            .unwrap();
        if as_postgres_user() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let out = command("initdb", false)
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self {
            port: free_port(),
            dir,
            child: Mutex::new(None),
        };
        pg.run();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server process (from a thread that lives as long as the process, so the
    /// parent-death signal fires only when the test process ends) and waits until it
    /// takes connections.
    fn run(&self) {
        let data = self.data();
        let port = self.port;
        let sockets = self.dir.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let child = command("postgres", true)
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(&sockets)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "shared_buffers=64MB",
                    "-c",
                    "log_min_messages=fatal",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start postgres");
            tx.send(child).unwrap();
            loop {
                std::thread::park();
            }
        });
        *self.child.lock().unwrap() = Some(rx.recv().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Listening comes a moment before taking connections.
        loop {
            let ok = Command::new(Path::new(BIN).join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not take connections"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// A new, empty database; its URL.
    pub async fn database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "natter_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"))
            .await;
        self.url(&name)
    }

    /// Runs `sql` on database `db`.
    pub async fn sql(&self, db: &str, sql: &str) {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .expect("connect to the test PostgreSQL");
        let task = tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = task.await;
    }

    /// Stops the server (fast shutdown: clients are disconnected, everything committed
    /// stays) and waits for it to exit.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// A streaming replica of this server (`pg_basebackup -R`, WAL streamed), running on
    /// its own port and stopped when dropped or with the test process.
    pub fn replica(&self) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("natter-pg-replica")
            .tempdir()
            .unwrap();
        if as_postgres_user() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let out = command("pg_basebackup", false)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-R", "-X", "stream", "--checkpoint=fast"])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let replica = Self {
            port: free_port(),
            dir,
            child: Mutex::new(None),
        };
        replica.run();
        replica
    }

    /// Stops the server and starts it again on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.run();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
