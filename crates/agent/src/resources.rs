//! What this host offers, detected: cpus, memory, disk under the data directory, hostname.

use capstan_model::{Capacity, PortRange};
use std::path::Path;

pub const DEFAULT_PORTS: PortRange = PortRange { first: 31000, last: 32000 };

pub fn detect(data_dir: &Path) -> Capacity {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let mem_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    // fsblkcnt_t and c_ulong are u64 here but not on every target.
    #[allow(clippy::unnecessary_cast)]
    let disk_bytes = nix::sys::statvfs::statvfs(data_dir)
        .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64)
        .unwrap_or(0);
    Capacity { cpus_milli: cpus * 1000, mem_bytes, disk_bytes, ports: vec![DEFAULT_PORTS] }
}

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}
