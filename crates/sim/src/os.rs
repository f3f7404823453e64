//! What the benchmarks need from the operating system: a higher open-file limit, and memory and
//! CPU figures of a process from `/proc` (Linux only).

use std::collections::BTreeMap;

/// The open-file limit after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to its hard limit (children inherit it).
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(NofileLimit { soft: lim.rlim_cur, hard: lim.rlim_max })
}

/// File descriptors a process needs to hold `agents` simulated agents' connections (one
/// long-poll each, plus status-update posts and registrations in flight, plus slack).
pub fn nofile_needed(agents: usize) -> u64 {
    agents as u64 + crate::fleet::POSTS_IN_FLIGHT_MAX as u64 + crate::fleet::REGISTRATIONS_IN_FLIGHT_MAX as u64 + 256
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// user + system CPU seconds from a `/proc/…/stat` line (fields 14 and 15, after the `(comm)`).
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so utime (14) is at 11 and stime (15) at 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_second())
}

/// CPU seconds (user + system) a process used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds per thread name (`capstan-writer`, `tokio-runtime-w`, …) of a process, summed over
/// threads of the same name.
pub fn cpu_seconds_by_thread(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for entry in dir.flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_string();
        if let Some(s) = std::fs::read_to_string(path.join("stat")).ok().and_then(|s| stat_cpu_seconds(&s)) {
            *out.entry(comm).or_insert(0.0) += s;
        }
    }
    out
}

/// Raises the open-file limit to the hard limit and says so when it is too low for `agents`.
pub fn check_nofile(agents: usize) -> anyhow::Result<u64> {
    let limit = raise_nofile_limit().map_err(|e| anyhow::anyhow!("cannot raise RLIMIT_NOFILE: {e}"))?;
    let needed = nofile_needed(agents);
    if limit.soft < needed {
        eprintln!(
            "warning: the open-file limit is {} (hard limit {}), but {agents} simulated agents need about {needed}; \
             raise the hard limit (ulimit -Hn, /etc/security/limits.conf or LimitNOFILE=) or expect connection errors",
            limit.soft, limit.hard
        );
    }
    Ok(limit.soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(status_bytes(pid, "VmRSS").unwrap() > 0);
        assert!(status_bytes(pid, "VmHWM").unwrap() >= status_bytes(pid, "VmRSS").unwrap() / 2);
        assert!(cpu_seconds(pid).is_some());
        assert!(!cpu_seconds_by_thread(pid).is_empty());
        let lim = raise_nofile_limit().unwrap();
        assert_eq!(lim.soft, lim.hard);
    }

    #[test]
    fn stat_with_spaces_in_comm() {
        let line = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 1 0";
        let ticks = clock_ticks_per_second();
        assert_eq!(stat_cpu_seconds(line), Some(400.0 / ticks));
    }
}
