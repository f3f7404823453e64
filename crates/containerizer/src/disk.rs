//! Disk limits of sandboxes: enforcement by the file system's project quotas where it offers
//! them ([`ProjectQuotas`]), and the measure of a sandbox's use ([`disk_usage_bytes`]) for the
//! agent's check-and-kill fallback and its usage reports.
//!
//! **Project quotas** (ext4 mounted with `prjquota` on a file system made with `-O quota,project`,
//! or xfs mounted with `prjquota`/`pquota`): a task's sandbox directory gets a project id of its
//! own and the inherit flag, so everything created below it later (the task's files, its private
//! `/tmp` inside the sandbox) belongs to that project, and the project's block hard limit is the
//! task's `disk`. The kernel then refuses writes past the limit (`EDQUOT`) as they happen,
//! instead of the agent killing the task after the fact. Needs Linux ≥ 5.14 (`quotactl_fd`).
//!
//! The glue is written by hand: no maintained crate wraps `FS_IOC_FSSETXATTR` or `quotactl` for
//! project quotas (nix has neither; the `quota`-style crates on crates.io are bindings to user
//! quotas by device path or unmaintained). Only the two structs and the constants the kernel
//! defines in `linux/fs.h` and `linux/quota.h` are copied here, with their layout.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Directories deeper than this below the sandbox are not entered (their own blocks count).
pub const DISK_USAGE_MAX_DEPTH: usize = 64;

/// Bytes allocated on disk under `dir` (itself included): the sum of `st_blocks × 512` over every
/// entry, like `du -s -x`. Symlinks are not followed (the link itself counts), other file
/// systems mounted below `dir` are not entered, a file with several hard links counts once, and
/// entries that vanish during the walk are skipped. A sparse file counts what it allocated, not
/// its length. Returns 0 when `dir` does not exist.
///
/// The walk is iterative and bounded in depth ([`DISK_USAGE_MAX_DEPTH`]), so a task cannot make
/// it recurse without end; it reads metadata only, never file contents.
pub fn disk_usage_bytes(dir: &Path) -> u64 {
    let Ok(root) = fs::symlink_metadata(dir) else { return 0 };
    let device = root.dev();
    let mut total = root.blocks() * 512;
    if !root.is_dir() {
        return total;
    }
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    let mut pending: Vec<(PathBuf, usize)> = vec![(dir.to_path_buf(), 0)];
    while let Some((path, depth)) = pending.pop() {
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            // Removed or replaced while we walked, or unreadable: nothing to count there.
            Err(_) => continue,
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            // Vanished since read_dir listed it: skip.
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            if meta.dev() != device {
                continue;
            }
            if !meta.is_dir() && meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() && depth + 1 < DISK_USAGE_MAX_DEPTH {
                pending.push((entry.path(), depth + 1));
            }
        }
    }
    total
}

/// Project ids the agent gives sandboxes: `PROJECT_ID_BASE + (task id mod PROJECT_ID_SPAN)`,
/// then the next free one (at most [`PROJECT_ID_PROBES_MAX`] tried). Project ids below the base
/// are left to the operator's own projects.
pub const PROJECT_ID_BASE: u32 = 0x4000_0000;
pub const PROJECT_ID_SPAN: u32 = 0x3fff_0000;
pub const PROJECT_ID_PROBES_MAX: u32 = 64;

/// `struct fsxattr` of `linux/fs.h` (28 bytes).
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `struct if_dqblk` of `linux/quota.h`: limits in 1 KiB blocks, space used in bytes.
#[repr(C)]
#[derive(Default)]
struct IfDqblk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

/// `struct if_dqinfo` of `linux/quota.h`.
#[repr(C)]
#[derive(Default)]
struct IfDqinfo {
    bgrace: u64,
    igrace: u64,
    flags: u32,
    valid: u32,
}

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f; // _IOR('X', 31, struct fsxattr)
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820; // _IOW('X', 32, struct fsxattr)
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
const PRJQUOTA: u32 = 2;
const Q_GETINFO: u32 = 0x80_0005;
const Q_GETQUOTA: u32 = 0x80_0007;
const Q_SETQUOTA: u32 = 0x80_0008;
const QIF_BLIMITS: u32 = 1;
const QIF_DQBLKSIZE_BYTES: u64 = 1024;

fn qcmd(cmd: u32, kind: u32) -> libc::c_int {
    ((cmd << 8) | (kind & 0xff)) as libc::c_int
}

/// `quotactl_fd(fd, cmd, id, addr)` (Linux ≥ 5.14): quotas of the file system `fd` is on.
fn quotactl_fd(fd: &fs::File, cmd: u32, id: u32, addr: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: `addr` points to the struct `cmd` expects (or is null for commands without one),
    // and lives across the call; the descriptor is open.
    let rc =
        unsafe { libc::syscall(libc::SYS_quotactl_fd, fd.as_raw_fd(), qcmd(cmd, PRJQUOTA) as libc::c_uint, id, addr) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn get_xattr(dir: &fs::File) -> std::io::Result<FsXattr> {
    let mut attr = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills exactly one `struct fsxattr`.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut attr as *mut FsXattr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

/// Project quotas on the file system that holds the sandboxes, found usable by
/// [`ProjectQuotas::detect`].
#[derive(Debug)]
pub struct ProjectQuotas {
    /// The sandboxes directory, open: quota calls name the file system through it.
    root: fs::File,
}

impl ProjectQuotas {
    /// Whether the file system of `sandboxes` enforces project quotas that this process may set:
    /// `Ok` when project quota information can be read and project ids set on a directory there;
    /// `Err` says why not (for the agent's log line), e.g. "project quotas are not enabled on the
    /// file system of /var/lib/capstan/sandboxes (mount it with prjquota)".
    pub fn detect(sandboxes: &Path) -> Result<ProjectQuotas, String> {
        let root = fs::File::open(sandboxes).map_err(|e| format!("cannot open {}: {e}", sandboxes.display()))?;
        let mut info = IfDqinfo::default();
        if let Err(e) = quotactl_fd(&root, Q_GETINFO, 0, (&mut info as *mut IfDqinfo).cast()) {
            let why = match e.raw_os_error() {
                Some(libc::ENOSYS) => "this kernel has no quotactl_fd (Linux 5.14 or later is needed)".to_string(),
                Some(libc::ESRCH) | Some(libc::ENOENT) => format!(
                    "project quotas are not enabled on the file system of {} (make it with project quota \
                     support and mount it with prjquota)",
                    sandboxes.display()
                ),
                Some(libc::EPERM) => "setting quotas needs root (CAP_SYS_ADMIN)".to_string(),
                _ => format!("reading project quota information of {}: {e}", sandboxes.display()),
            };
            return Err(why);
        }
        get_xattr(&root).map_err(|e| format!("reading project attributes of {}: {e}", sandboxes.display()))?;
        Ok(ProjectQuotas { root })
    }

    /// Gives `dir` (a fresh sandbox, on the same file system) a project of its own, inherited by
    /// everything created below it, with a hard limit of `limit_bytes`. Returns the project id.
    /// The id is derived from `task_id` and is one no other directory uses now (a project with
    /// space or inodes charged is taken).
    pub fn limit(&self, dir: &Path, task_id: u64, limit_bytes: u64) -> Result<u32, String> {
        let what = |e: std::io::Error, doing: &str| format!("{doing} {}: {e}", dir.display());
        let handle = fs::File::open(dir).map_err(|e| what(e, "opening"))?;
        let mut attr = get_xattr(&handle).map_err(|e| what(e, "reading project attributes of"))?;
        if !fs::metadata(dir).map_err(|e| what(e, "reading"))?.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        let start = (task_id % u64::from(PROJECT_ID_SPAN)) as u32;
        let mut chosen = None;
        for probe in 0..PROJECT_ID_PROBES_MAX {
            let id = PROJECT_ID_BASE + (start + probe) % PROJECT_ID_SPAN;
            let mut q = IfDqblk::default();
            let used = match quotactl_fd(&self.root, Q_GETQUOTA, id, (&mut q as *mut IfDqblk).cast()) {
                Ok(()) => q.curspace > 0 || q.curinodes > 0,
                // No entry yet: nobody uses it.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => false,
                Err(e) => return Err(what(e, "reading the project quota for")),
            };
            if !used {
                chosen = Some(id);
                break;
            }
        }
        let id = chosen
            .ok_or_else(|| format!("no free project id for {} after {PROJECT_ID_PROBES_MAX} tries", dir.display()))?;
        let mut q = IfDqblk {
            bhardlimit: limit_bytes.div_ceil(QIF_DQBLKSIZE_BYTES),
            bsoftlimit: limit_bytes.div_ceil(QIF_DQBLKSIZE_BYTES),
            valid: QIF_BLIMITS,
            ..IfDqblk::default()
        };
        quotactl_fd(&self.root, Q_SETQUOTA, id, (&mut q as *mut IfDqblk).cast())
            .map_err(|e| what(e, "setting the project quota for"))?;
        set_project(&handle, &mut attr, id).map_err(|e| what(e, "setting the project id of"))?;
        Ok(id)
    }
}

/// Sets `dir`'s project id to `id` with the inherit flag (`FS_IOC_FSSETXATTR`), keeping its other
/// attributes. Works on a file system with project ids (ext4 with `-O project`, xfs) whether or
/// not quotas are on; used by [`ProjectQuotas::limit`].
pub fn set_project_id(dir: &Path, id: u32) -> std::io::Result<()> {
    let handle = fs::File::open(dir)?;
    let mut attr = get_xattr(&handle)?;
    set_project(&handle, &mut attr, id)
}

/// `dir`'s project id, and whether new entries below it inherit it (`FS_IOC_FSGETXATTR`).
pub fn project_id(dir: &Path) -> std::io::Result<(u32, bool)> {
    let attr = get_xattr(&fs::File::open(dir)?)?;
    Ok((attr.projid, attr.xflags & FS_XFLAG_PROJINHERIT != 0))
}

fn set_project(handle: &fs::File, attr: &mut FsXattr, id: u32) -> std::io::Result<()> {
    attr.projid = id;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: FS_IOC_FSSETXATTR reads exactly one `struct fsxattr`.
    if unsafe { libc::ioctl(handle.as_raw_fd(), FS_IOC_FSSETXATTR as _, attr as *const FsXattr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn kernel_structs_have_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<IfDqblk>(), 72);
        assert_eq!(std::mem::size_of::<IfDqinfo>(), 24);
        assert_eq!(qcmd(Q_SETQUOTA, PRJQUOTA), 0x8000_0802_u32 as i32);
    }

    #[test]
    fn a_file_system_without_project_quotas_is_detected_as_such() {
        let dir = tempfile::tempdir().unwrap();
        // A tmpfs or a file system mounted without prjquota: an explanation, never a panic.
        if let Err(why) = ProjectQuotas::detect(dir.path()) {
            assert!(!why.is_empty());
        }
        assert!(ProjectQuotas::detect(&dir.path().join("missing")).unwrap_err().contains("cannot open"));
    }

    fn write_file(path: &Path, len: usize) {
        let mut f = fs::File::create(path).unwrap();
        f.write_all(&vec![0x5a; len]).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn a_file_of_known_size_is_counted_once_and_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let empty = disk_usage_bytes(dir.path());
        write_file(&dir.path().join("data"), 1 << 20);
        let with_file = disk_usage_bytes(dir.path());
        let grown = with_file - empty;
        assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&grown), "1 MiB file added {grown} bytes");

        let outside = tempfile::tempdir().unwrap();
        write_file(&outside.path().join("big"), 4 << 20);
        std::os::unix::fs::symlink(outside.path().join("big"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("dirlink")).unwrap();
        fs::hard_link(dir.path().join("data"), dir.path().join("data2")).unwrap();
        let linked = disk_usage_bytes(dir.path());
        assert!(linked - with_file < 64 << 10, "links add little: {with_file} -> {linked}");
    }

    #[test]
    fn nested_directories_are_walked_and_a_missing_dir_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for i in 0..10 {
            deep.push(format!("d{i}"));
        }
        fs::create_dir_all(&deep).unwrap();
        write_file(&deep.join("data"), 256 << 10);
        assert!(disk_usage_bytes(dir.path()) >= 256 << 10);
        assert_eq!(disk_usage_bytes(&dir.path().join("missing")), 0);
        // A sparse file counts its allocated blocks, not its length.
        let sparse = fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        assert!(disk_usage_bytes(dir.path()) < 1 << 20);
    }

    #[test]
    fn depth_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..DISK_USAGE_MAX_DEPTH + 2 {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        write_file(&deep.join("hidden"), 1 << 20);
        assert!(disk_usage_bytes(dir.path()) < 1 << 20, "files below the depth bound are not counted");
    }
}
