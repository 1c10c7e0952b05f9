//! Readings of a process from Linux's `/proc`: CPU time, resident memory, open files.
//! `/metrics` exports this process's; `natter bench` reads a server child's by pid.
//! Each is `None` where `/proc` is missing or unreadable (not Linux, or a gone process).

/// User plus system CPU time, in seconds.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(path(pid, "stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces):
    // state is field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// Resident set size, in bytes.
pub fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(path(pid, "status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Open file descriptors.
pub fn open_fds(pid: Option<u32>) -> Option<u64> {
    Some(std::fs::read_dir(path(pid, "fd")).ok()?.count() as u64)
}

/// Raises this process's open-files limit toward `wanted`, as far as the hard limit
/// allows, and returns the limit now in force (`None` if it cannot be read). A server
/// needs one descriptor per connection, and the usual default soft limit is 1024.
pub fn raise_open_files(wanted: u64) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur >= wanted {
        return Some(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max.min(wanted),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Some(lim.rlim_cur);
    }
    Some(raised.rlim_cur)
}

fn path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Prometheus text exposition of this process's readings.
pub fn render(out: &mut String) {
    use std::fmt::Write;
    let readings = [
        (
            "natter_process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the server process, in seconds.",
            cpu_seconds(None),
        ),
        (
            "natter_process_resident_memory_bytes",
            "gauge",
            "Resident memory of the server process.",
            rss_bytes(None).map(|b| b as f64),
        ),
        (
            "natter_process_open_fds",
            "gauge",
            "Open file descriptors of the server process.",
            open_fds(None).map(|n| n as f64),
        ),
        (
            "natter_process_max_fds",
            "gauge",
            "The server process's open-files limit.",
            max_fds().map(|n| n as f64),
        ),
    ];
    for (name, kind, help, value) in readings {
        if let Some(value) = value {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// This process's soft open-files limit.
pub fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// Bytes free to unprivileged users, and in all, on the file system holding `dir`.
pub fn disk_space(dir: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is all zeroes valid; the call writes into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| {
        let unit = st.f_frsize as u64;
        (st.f_bavail as u64 * unit, st.f_blocks as u64 * unit)
    })
}

/// Disk readings of the data directory: free and total bytes of its file system, and the
/// database's own size (with its search index and their write-ahead logs).
pub fn render_disk(out: &mut String, data_dir: &std::path::Path) {
    use crate::metrics::render_one;
    if let Some((free, total)) = disk_space(data_dir) {
        render_one(
            out,
            "natter_data_dir_free_bytes",
            "gauge",
            "Bytes free on the file system holding the data directory.",
            free,
        );
        render_one(
            out,
            "natter_data_dir_size_bytes",
            "gauge",
            "Size of the file system holding the data directory.",
            total,
        );
    }
    let db = crate::config::db_path(data_dir);
    let index = crate::store::sqlite::index_path(&db);
    let size = |file: &std::path::Path, suffix: &str| {
        let mut p = file.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(p).map_or(0, |m| m.len())
    };
    render_one(
        out,
        "natter_db_bytes",
        "gauge",
        "Size of the database and its search index, with their write-ahead logs.",
        size(&db, "") + size(&db, "-wal") + size(&index, "") + size(&index, "-wal"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        // Burn a little CPU so the reading is past zero ticks.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(None).unwrap() > 0.0);
        assert!(rss_bytes(None).unwrap() > 1024 * 1024);
        let own = open_fds(Some(std::process::id())).unwrap();
        assert!(own >= 3, "stdin, stdout, stderr");
        let mut text = String::new();
        render(&mut text);
        assert!(text.contains("natter_process_resident_memory_bytes "));
    }
}
