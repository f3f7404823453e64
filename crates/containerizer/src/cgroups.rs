//! Task cgroups on v1 (legacy / hybrid) and v2 (unified): discovery, limits, membership, kill,
//! OOM evidence and usage.
//!
//! v1 creation, joining and limits go through libcgroups 0.7 (`create_cgroup_manager`, `add_task`,
//! `apply`); it handles this host's separate `cpu` and `cpuacct` hierarchies (one path per
//! controller) and the hybrid layout (it uses v1 when `unified` holds no controllers). Two things
//! are written directly even on v1: reading OOM evidence and usage (libcgroups' `stats()` fails on
//! the first missing file and does not expose `memory.oom_control`'s `oom_kill` counter), and the
//! kill loop (its `remove()` sends one SIGKILL round and then retries rmdir, which races with a
//! task that forks).
//!
//! The v2 path is written directly (module [`v2`]) so that its file logic can be unit-tested
//! against a temporary directory imitating a v2 cgroup: real v2 cannot be exercised on a hybrid
//! host, and libcgroups' v2 manager insists on a real cgroup2 mount.

use crate::records::Usage;
use capstan_model::TaskId;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// CFS period used for every task (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// How the host mounts cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupMode {
    /// Only v1 hierarchies.
    Legacy,
    /// v1 hierarchies plus a v2 tree (`/sys/fs/cgroup/unified`) without controllers: v1 is used.
    Hybrid,
    /// Only the v2 tree.
    Unified,
}

/// The mounted cgroup hierarchies of this host.
#[derive(Clone, Debug)]
pub struct Hierarchies {
    pub mode: CgroupMode,
    /// v1: (controllers, mount point) of every hierarchy that carries a controller.
    pub v1: Vec<(Vec<String>, PathBuf)>,
    /// The cgroup2 mount point, if any.
    pub v2: Option<PathBuf>,
}

const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "blkio",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

impl Hierarchies {
    /// Reads `/proc/self/mountinfo` and asks libcgroups for the layout.
    pub fn discover() -> Result<Self, String> {
        let setup =
            libcgroups::common::get_cgroup_setup().map_err(|e| format!("cannot detect the cgroup layout: {e}"))?;
        let mode = match setup {
            libcgroups::common::CgroupSetup::Legacy => CgroupMode::Legacy,
            libcgroups::common::CgroupSetup::Hybrid => CgroupMode::Hybrid,
            libcgroups::common::CgroupSetup::Unified => CgroupMode::Unified,
        };
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let (v1, v2) = parse_mountinfo(&mountinfo);
        Ok(Hierarchies { mode, v1, v2 })
    }

    /// The cgroup of one task: `<root>/<task_id>` in every hierarchy that is used.
    pub fn task_cgroup(&self, cgroup_root: &str, task_id: TaskId) -> TaskCgroup {
        let rel = Path::new(cgroup_root).join(task_id.to_string());
        match self.mode {
            CgroupMode::Unified => TaskCgroup {
                mode: self.mode,
                rel: rel.clone(),
                v1: Vec::new(),
                v2: self.v2.as_ref().map(|m| (m.clone(), m.join(&rel))),
            },
            CgroupMode::Legacy | CgroupMode::Hybrid => TaskCgroup {
                mode: self.mode,
                rel: rel.clone(),
                v1: self.v1.iter().map(|(c, m)| (c.clone(), m.join(&rel))).collect(),
                v2: None,
            },
        }
    }
}

/// Returns the v1 hierarchies with controllers and the cgroup2 mount point.
fn parse_mountinfo(text: &str) -> (Vec<(Vec<String>, PathBuf)>, Option<PathBuf>) {
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(mount_point) = left.split_whitespace().nth(4) else { continue };
        let mut right = right.split_whitespace();
        let (fstype, _source, options) = (right.next(), right.next(), right.next().unwrap_or(""));
        match fstype {
            Some("cgroup2") if v2.is_none() => v2 = Some(PathBuf::from(mount_point)),
            Some("cgroup") => {
                let controllers: Vec<String> =
                    options.split(',').filter(|o| V1_CONTROLLERS.contains(o)).map(str::to_owned).collect();
                if !controllers.is_empty() {
                    v1.push((controllers, PathBuf::from(mount_point)));
                }
            }
            _ => {}
        }
    }
    (v1, v2)
}

/// Limits for one task's cgroup, derived from the launch spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    /// CFS quota per [`CPU_PERIOD_US`]; `None` = unlimited.
    pub cpu_quota_us: Option<u64>,
    /// v1 `cpu.shares` (1024 per CPU, at least 2).
    pub cpu_shares: u64,
    /// v2 `cpu.weight` (1..=10000), converted from the shares as runc does.
    pub cpu_weight: u64,
    /// `None` = unlimited.
    pub mem_bytes: Option<u64>,
    pub pids_max: Option<u64>,
}

impl CgroupLimits {
    pub fn new(cpus_milli: u32, mem_bytes: u64, pids_max: Option<u64>) -> Self {
        let cpus_milli = u64::from(cpus_milli);
        let cpu_shares = (cpus_milli * 1024 / 1000).clamp(2, 262_144);
        CgroupLimits {
            cpu_quota_us: (cpus_milli > 0).then(|| (cpus_milli * CPU_PERIOD_US / 1000).max(1000)),
            cpu_shares,
            cpu_weight: 1 + (cpu_shares - 2) * 9999 / 262_142,
            mem_bytes: (mem_bytes > 0).then_some(mem_bytes),
            pids_max,
        }
    }
}

/// What the cgroup says about the end of a task; read before the cgroup is removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvidence {
    /// Number of processes the kernel OOM killer ended in this cgroup.
    pub oom_kills: u64,
    pub usage: Usage,
}

/// One task's cgroup, across all hierarchies in use.
#[derive(Clone, Debug)]
pub struct TaskCgroup {
    pub mode: CgroupMode,
    /// `<root>/<task_id>`, relative to each hierarchy's root.
    pub rel: PathBuf,
    /// v1: (controllers, directory) per hierarchy.
    pub v1: Vec<(Vec<String>, PathBuf)>,
    /// v2: (mount point, directory).
    pub v2: Option<(PathBuf, PathBuf)>,
}

impl TaskCgroup {
    fn v1_dir(&self, controller: &str) -> Option<&Path> {
        self.v1.iter().find(|(c, _)| c.iter().any(|x| x == controller)).map(|(_, d)| d.as_path())
    }

    /// Every directory of this cgroup (one per v1 hierarchy, or the v2 one).
    pub fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = self.v1.iter().map(|(_, d)| d.as_path()).collect();
        dirs.extend(self.v2.as_ref().map(|(_, d)| d.as_path()));
        dirs
    }

    /// The cgroup directory of one controller (v1) or the v2 directory; for tests and diagnostics.
    pub fn controller_dir(&self, controller: &str) -> Option<PathBuf> {
        match &self.v2 {
            Some((_, dir)) => Some(dir.clone()),
            None => self.v1_dir(controller).map(Path::to_path_buf),
        }
    }

    /// Creates the cgroup, moves `pid` into it and applies the limits. The caller keeps `pid`
    /// from exec'ing until this returns, so the task never runs unconfined.
    pub fn setup(&self, pid: u32, limits: &CgroupLimits) -> Result<(), String> {
        match &self.v2 {
            Some((mount, dir)) => {
                v2::create(mount, dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                v2::write_limits(dir, limits).map_err(|e| format!("limits in {}: {e}", dir.display()))?;
                v2::join(dir, pid).map_err(|e| format!("joining {}: {e}", dir.display()))
            }
            None => self.setup_v1(pid, limits),
        }
    }

    fn setup_v1(&self, pid: u32, limits: &CgroupLimits) -> Result<(), String> {
        use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
        use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder};

        // An absolute path makes libcgroups place the group relative to each hierarchy's root
        // rather than below the supervisor's own cgroup.
        let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: Path::new("/").join(&self.rel),
            systemd_cgroup: false,
            container_name: String::new(),
        })
        .map_err(|e| format!("cgroup manager for {}: {e}", self.rel.display()))?;
        manager
            .add_task(nix029::unistd::Pid::from_raw(pid as i32))
            .map_err(|e| format!("moving pid {pid} into cgroup {}: {e}", self.rel.display()))?;

        let mut cpu = LinuxCpuBuilder::default().shares(limits.cpu_shares);
        if let Some(quota) = limits.cpu_quota_us {
            cpu = cpu.quota(quota as i64).period(CPU_PERIOD_US);
        }
        let mut resources = LinuxResourcesBuilder::default().cpu(cpu.build().map_err(|e| e.to_string())?);
        if let Some(mem) = limits.mem_bytes {
            let mut memory = LinuxMemoryBuilder::default().limit(mem as i64);
            // memsw exists only with swap accounting; where it does, memory+swap = memory: no swap.
            let memsw = self.v1_dir("memory").map(|d| d.join("memory.memsw.limit_in_bytes"));
            if memsw.is_some_and(|f| f.exists()) {
                memory = memory.swap(mem as i64);
            }
            resources = resources.memory(memory.build().map_err(|e| e.to_string())?);
        }
        if let Some(pids) = limits.pids_max {
            resources =
                resources.pids(LinuxPidsBuilder::default().limit(pids as i64).build().map_err(|e| e.to_string())?);
        }
        let resources = resources.build().map_err(|e| e.to_string())?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                freezer_state: None,
                oom_score_adj: None,
                disable_oom_killer: false,
            })
            .map_err(|e| format!("applying limits to cgroup {}: {e}", self.rel.display()))
    }

    /// Pids of every process in the cgroup (union over hierarchies; missing groups are empty).
    pub fn procs(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs()
            .into_iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs everything in the cgroup until it is empty or `timeout` passes, calling `reap`
    /// between rounds (the supervisor reaps its children there and keeps the main process's
    /// status). Returns true when the cgroup is empty.
    pub fn kill_all(&self, timeout: Duration, reap: &mut dyn FnMut()) -> bool {
        let deadline = Instant::now() + timeout;
        if let Some((_, dir)) = &self.v2 {
            let _ = v2::kill(dir);
        }
        loop {
            reap();
            let pids = self.procs();
            if pids.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
            // Dying processes leave cgroup.procs within microseconds to milliseconds.
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// OOM kills and usage; read this before [`TaskCgroup::remove`].
    pub fn evidence(&self) -> ExitEvidence {
        match &self.v2 {
            Some((_, dir)) => v2::evidence(dir),
            None => ExitEvidence { oom_kills: self.v1_oom_kills(), usage: self.usage() },
        }
    }

    fn v1_oom_kills(&self) -> u64 {
        self.v1_dir("memory")
            .and_then(|d| fs::read_to_string(d.join("memory.oom_control")).ok())
            .and_then(|s| keyed_value(&s, "oom_kill"))
            .unwrap_or(0)
    }

    /// Current usage of the task's cgroup (zeroes for what cannot be read).
    pub fn usage(&self) -> Usage {
        if let Some((_, dir)) = &self.v2 {
            return v2::usage(dir);
        }
        let read =
            |controller: &str, file: &str| self.v1_dir(controller).and_then(|d| fs::read_to_string(d.join(file)).ok());
        let number = |controller: &str, file: &str| read(controller, file).and_then(|s| s.trim().parse().ok());
        let cpu_stat = read("cpu", "cpu.stat").unwrap_or_default();
        // Current before peak: the peak read afterwards is never below the current read before.
        let mem_bytes = number("memory", "memory.usage_in_bytes").unwrap_or(0);
        Usage {
            cpu_usage_ns: number("cpuacct", "cpuacct.usage").unwrap_or(0),
            mem_peak_bytes: number("memory", "memory.max_usage_in_bytes").unwrap_or(0),
            // v1 counts throttled time in nanoseconds.
            throttled_ns: keyed_value(&cpu_stat, "throttled_time").unwrap_or(0),
            nr_throttled: keyed_value(&cpu_stat, "nr_throttled").unwrap_or(0),
            mem_bytes,
        }
    }

    /// Removes the cgroup directories (they must be empty); missing ones are fine.
    pub fn remove(&self) -> io::Result<()> {
        let mut result = Ok(());
        for dir in self.dirs() {
            let mut attempt = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // EBUSY while the last processes are still being released.
                    Err(_) if attempt < 50 => {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        result = Err(io::Error::new(e.kind(), format!("removing {}: {e}", dir.display())));
                        break;
                    }
                }
            }
        }
        result
    }
}

/// The value of `key` in a "key value" per line file (cpu.stat, memory.events, oom_control).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// cgroup v2 file logic, written directly (see the module header).
pub mod v2 {
    use super::*;

    /// Enables cpu, memory and pids for the children of every ancestor below the mount point,
    /// then creates `dir`. Controllers the kernel does not offer are skipped.
    pub fn create(mount: &Path, dir: &Path) -> io::Result<()> {
        let rel = dir.strip_prefix(mount).map_err(io::Error::other)?;
        let mut current = mount.to_path_buf();
        for component in rel.components() {
            let offered = fs::read_to_string(current.join("cgroup.controllers")).unwrap_or_default();
            for controller in ["cpu", "memory", "pids"] {
                if offered.split_whitespace().any(|c| c == controller) {
                    fs::write(current.join("cgroup.subtree_control"), format!("+{controller}"))?;
                }
            }
            current.push(component);
            match fs::create_dir(&current) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes cpu.max, cpu.weight, memory.max, memory.swap.max (when swap is accounted) and
    /// pids.max.
    pub fn write_limits(dir: &Path, limits: &CgroupLimits) -> io::Result<()> {
        let quota = limits.cpu_quota_us.map_or("max".to_owned(), |q| q.to_string());
        fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
        fs::write(dir.join("cpu.weight"), limits.cpu_weight.to_string())?;
        if let Some(mem) = limits.mem_bytes {
            fs::write(dir.join("memory.max"), mem.to_string())?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                fs::write(swap, "0")?;
            }
        }
        let pids = limits.pids_max.map_or("max".to_owned(), |p| p.to_string());
        fs::write(dir.join("pids.max"), pids)?;
        Ok(())
    }

    /// Moves `pid` into the cgroup.
    pub fn join(dir: &Path, pid: u32) -> io::Result<()> {
        fs::write(dir.join("cgroup.procs"), pid.to_string())
    }

    /// Kills every process in the cgroup at once (kernel ≥ 5.14); callers still check that it
    /// emptied, and fall back to a SIGKILL loop.
    pub fn kill(dir: &Path) -> io::Result<()> {
        let file = dir.join("cgroup.kill");
        if file.exists() {
            fs::write(file, "1")
        } else {
            Ok(())
        }
    }

    pub fn evidence(dir: &Path) -> ExitEvidence {
        let events = fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
        ExitEvidence { oom_kills: keyed_value(&events, "oom_kill").unwrap_or(0), usage: usage(dir) }
    }

    pub fn usage(dir: &Path) -> Usage {
        let number = |file: &str| fs::read_to_string(dir.join(file)).ok().and_then(|s| s.trim().parse().ok());
        let cpu_stat = fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
        // Current before peak (see the v1 reader). `memory.peak` needs kernel 5.19.
        let mem_bytes = number("memory.current").unwrap_or(0);
        Usage {
            cpu_usage_ns: keyed_value(&cpu_stat, "usage_usec").unwrap_or(0) * 1000,
            mem_peak_bytes: number("memory.peak").unwrap_or(0),
            // v2 counts throttled time in microseconds.
            throttled_ns: keyed_value(&cpu_stat, "throttled_usec").unwrap_or(0) * 1000,
            nr_throttled: keyed_value(&cpu_stat, "nr_throttled").unwrap_or(0),
            mem_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_cpu_and_memory_formulas() {
        let l = CgroupLimits::new(200, 64 << 20, Some(100));
        assert_eq!(l.cpu_quota_us, Some(20_000));
        assert_eq!(l.cpu_shares, 204);
        assert_eq!(l.cpu_weight, 1 + 202 * 9999 / 262_142);
        assert_eq!(l.mem_bytes, Some(64 << 20));
        let one = CgroupLimits::new(1000, 0, None);
        assert_eq!((one.cpu_quota_us, one.cpu_shares, one.mem_bytes), (Some(100_000), 1024, None));
        assert_eq!(CgroupLimits::new(0, 0, None).cpu_quota_us, None);
        assert_eq!(CgroupLimits::new(0, 0, None).cpu_shares, 2);
    }

    #[test]
    fn mountinfo_of_a_hybrid_host_with_separate_cpu_and_cpuacct() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n\
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let (v1, v2) = parse_mountinfo(text);
        let names: Vec<_> = v1.iter().map(|(c, _)| c.join(",")).collect();
        assert_eq!(names, ["cpu", "cpuacct", "memory"]);
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let h = Hierarchies { mode: CgroupMode::Hybrid, v1, v2 };
        let cg = h.task_cgroup("capstan", TaskId(0xab));
        assert_eq!(cg.controller_dir("cpuacct").unwrap(), Path::new("/sys/fs/cgroup/cpuacct/capstan/00000000000000ab"));
        assert!(cg.v2.is_none(), "hybrid hosts use v1 for every controller");
    }

    /// Imitates a v2 hierarchy in a temporary directory: the files the kernel would offer.
    fn fake_v2(root: &Path) -> TaskCgroup {
        fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let h = Hierarchies { mode: CgroupMode::Unified, v1: vec![], v2: Some(root.to_path_buf()) };
        let cg = h.task_cgroup("capstan", TaskId(7));
        let parent = root.join("capstan");
        fs::create_dir(&parent).unwrap();
        fs::write(parent.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        cg
    }

    #[test]
    fn v2_limits_are_written_to_the_unified_files() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = fake_v2(tmp.path());
        let (mount, dir) = cg.v2.clone().unwrap();
        v2::create(&mount, &dir).unwrap();
        assert_eq!(fs::read_to_string(tmp.path().join("cgroup.subtree_control")).unwrap(), "+pids");
        fs::write(dir.join("memory.swap.max"), "max\n").unwrap(); // the kernel offers it with swap accounting
        v2::write_limits(&dir, &CgroupLimits::new(200, 64 << 20, Some(50))).unwrap();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("cpu.max"), "20000 100000");
        assert_eq!(read("cpu.weight"), "8");
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "50");
        v2::write_limits(&dir, &CgroupLimits::new(0, 0, None)).unwrap();
        assert_eq!(read("cpu.max"), "max 100000");
        assert_eq!(read("pids.max"), "max");
        v2::join(&dir, 4242).unwrap();
        assert_eq!(read("cgroup.procs"), "4242");
    }

    #[test]
    fn v2_oom_evidence_and_usage_are_read_from_events_peak_and_cpu_stat() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = fake_v2(tmp.path());
        let (mount, dir) = cg.v2.clone().unwrap();
        v2::create(&mount, &dir).unwrap();
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n").unwrap();
        fs::write(dir.join("memory.peak"), "67108864\n").unwrap();
        fs::write(dir.join("memory.current"), "33554432\n").unwrap();
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\nnr_throttled 4\nthrottled_usec 250\n",
        )
        .unwrap();
        fs::write(dir.join("cgroup.kill"), "").unwrap();
        let evidence = cg.evidence();
        assert_eq!(evidence.oom_kills, 1);
        assert_eq!(
            evidence.usage,
            Usage {
                cpu_usage_ns: 1_500_000,
                mem_peak_bytes: 64 << 20,
                throttled_ns: 250_000,
                nr_throttled: 4,
                mem_bytes: 32 << 20
            }
        );
        v2::kill(&dir).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.kill")).unwrap(), "1");
    }

    #[test]
    fn v1_usage_is_read_from_cpuacct_cpu_stat_and_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |c: &str| {
            let d = tmp.path().join(c).join("capstan/0000000000000007");
            fs::create_dir_all(&d).unwrap();
            d
        };
        let (cpu, cpuacct, memory) = (dir("cpu"), dir("cpuacct"), dir("memory"));
        fs::write(cpuacct.join("cpuacct.usage"), "123456789\n").unwrap();
        fs::write(cpu.join("cpu.stat"), "nr_periods 30\nnr_throttled 25\nthrottled_time 2400000000\n").unwrap();
        fs::write(memory.join("memory.usage_in_bytes"), "4096000\n").unwrap();
        fs::write(memory.join("memory.max_usage_in_bytes"), "8192000\n").unwrap();
        let cg = TaskCgroup {
            mode: CgroupMode::Legacy,
            rel: PathBuf::from("capstan/0000000000000007"),
            v1: vec![(vec!["cpu".into()], cpu), (vec!["cpuacct".into()], cpuacct), (vec!["memory".into()], memory)],
            v2: None,
        };
        assert_eq!(
            cg.usage(),
            Usage {
                cpu_usage_ns: 123_456_789,
                mem_peak_bytes: 8_192_000,
                throttled_ns: 2_400_000_000,
                nr_throttled: 25,
                mem_bytes: 4_096_000
            }
        );
    }

    #[test]
    fn v1_oom_control_counter_is_parsed() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(keyed_value(text, "oom_kill"), Some(2));
        assert_eq!(keyed_value(text, "oom_kill_disable"), Some(0));
    }
}
