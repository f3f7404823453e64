//! The sandbox on disk and who may enter it: its layout, the per-task group that alone lets a
//! task through, and the only ways root opens anything below it (through a directory descriptor,
//! refusing links, checking what it opened).
//!
//! ```text
//! SANDBOX/               root:G 0710  the task (group G) may pass through, nobody else may
//!   launch.json, …       root   0600  records shared by agent and supervisor (see crate::records)
//!   logs/                root   0700  stdout, stderr, stdout.1 …: written by the supervisor only
//!   work/                U:G    0700  the task's own: cwd, $HOME, $CAPSTAN_SANDBOX
//!     tmp/               U:G    1777  the task's /tmp and /var/tmp (bind-mounted in its own
//!                                     mount namespace, see crate::supervisor)
//! ```
//! `U` is the task's user; `G` a group id from [`SANDBOX_GID_FIRST`]..=[`SANDBOX_GID_LAST`]
//! (systemd's DynamicUser range) that no other live sandbox of this agent holds. The task runs
//! with `G` as its *primary* group (and its user's groups as supplementary ones): a task of
//! another job, even as the same user, lacks `G`, so it cannot enter `SANDBOX`, and — because
//! the kernel compares primary groups before it lets one process read another's `/proc/PID/cwd`,
//! `fd/`, `environ` or `mem`, or ptrace it — it cannot reach the task through `/proc` either.
//!
//! `G` is recorded in `launch.json` and in the sandbox directory's own group; when the task ends
//! the supervisor (or the agent, for a lost supervisor) gives the directory back to group root,
//! which frees `G`. The allocator ([`allocate_gid`]) counts as taken every group in the range
//! that a root-owned sandbox directory still has, so an allocation survives restarts and
//! `kill -9` of the agent without a file of its own.
//!
//! A sandbox of the previous layout (the directory itself owned by the task's user, logs in it)
//! is still read: [`LogDir::open`] falls back to it, and every reader opens through a directory
//! descriptor with `O_NOFOLLOW` and accepts only a regular file with one link owned by the
//! directory's owner.

use crate::records::LAUNCH_FILE;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Group, Uid};
use std::fs::File;
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The task's own directory in its sandbox: working directory, `$HOME`, `$CAPSTAN_SANDBOX`.
pub const WORK_DIR: &str = "work";
/// The task's output, written by its supervisor (root only).
pub const LOGS_DIR: &str = "logs";
/// In [`WORK_DIR`]: mounted on `/tmp` in the task's own mount namespace.
pub const TMP_DIR: &str = "tmp";
/// First group id handed to a sandbox (systemd's DynamicUser range starts here too).
pub const SANDBOX_GID_FIRST: u32 = 61184;
/// Last group id handed to a sandbox: at most 4,336 tasks run at once on one agent.
pub const SANDBOX_GID_LAST: u32 = 65519;
/// `SANDBOX`: root's, enterable by group `G` only.
const SANDBOX_MODE: u32 = 0o710;
/// `SANDBOX/logs`: root's alone.
const LOGS_MODE: u32 = 0o700;
/// `SANDBOX/work`: the task user's alone.
const WORK_MODE: u32 = 0o700;
/// `SANDBOX/work/tmp`: what `/tmp` usually is (sticky, everyone's) — reachable only through
/// `work/` or, inside the task's namespace, as `/tmp`.
const TMP_MODE: u32 = 0o1777;

/// The task's own directory of `sandbox`.
pub fn work_dir(sandbox: &Path) -> PathBuf {
    sandbox.join(WORK_DIR)
}

/// Where the supervisor writes the task's output.
pub fn logs_dir(sandbox: &Path) -> PathBuf {
    sandbox.join(LOGS_DIR)
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Opens the directory `path` itself, refusing a symbolic link as its last component.
pub(crate) fn open_dir_nofollow(path: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(errno)
}

/// Opens the directory `name` in `dir`, refusing a symbolic link.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    openat(dir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(errno)
}

/// Creates the directory `name` in `dir` (an existing one is kept), opens it without following a
/// link, and gives it `owner` and `mode`.
fn make_dir_at(dir: BorrowedFd<'_>, name: &str, owner: Option<(Uid, Gid)>, mode: u32) -> io::Result<OwnedFd> {
    match mkdirat(dir, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(errno(e)),
    }
    let fd = open_dir_at(dir, name)?;
    if let Some((uid, gid)) = owner {
        fchown(&fd, Some(uid), Some(gid)).map_err(errno)?;
    }
    fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(errno)?;
    Ok(fd)
}

/// Lays out `sandbox` (see the module doc) for a task of `user` in group `gid`. Without root
/// (`gid` is `None`: the task can only run as the agent's own user) every directory is simply
/// the agent's, mode 0700. The sandbox's parent must exist.
pub(crate) fn prepare(sandbox: &Path, user: Option<(Uid, Gid)>, gid: Option<Gid>) -> io::Result<()> {
    match std::fs::create_dir(sandbox) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let dir = open_dir_nofollow(sandbox)?;
    let (root, task) = match (gid, user) {
        (Some(gid), Some((uid, _))) => (Some((Uid::from_raw(0), Gid::from_raw(0))), Some((uid, gid))),
        _ => (None, None),
    };
    // The directory first: from here on the task's user (if it owned it before) cannot change it.
    if let Some(gid) = gid {
        fchown(&dir, Some(Uid::from_raw(0)), Some(gid)).map_err(errno)?;
    }
    fchmod(&dir, Mode::from_bits_truncate(if gid.is_some() { SANDBOX_MODE } else { 0o700 })).map_err(errno)?;
    make_dir_at(dir.as_fd(), LOGS_DIR, root, LOGS_MODE)?;
    let work = make_dir_at(dir.as_fd(), WORK_DIR, task, WORK_MODE)?;
    make_dir_at(work.as_fd(), TMP_DIR, task, TMP_MODE)?;
    Ok(())
}

/// Gives an ended task's sandbox back to group root: nobody but root enters it any more, and its
/// group id is free for another task. No effect on a sandbox without a group of the range.
pub(crate) fn release_gid(sandbox: &Path) -> io::Result<()> {
    let dir = open_dir_nofollow(sandbox)?;
    let stat = fstat(&dir).map_err(errno)?;
    if stat.st_uid == 0 && (SANDBOX_GID_FIRST..=SANDBOX_GID_LAST).contains(&stat.st_gid) {
        fchown(&dir, None, Some(Gid::from_raw(0))).map_err(errno)?;
    }
    Ok(())
}

/// The group ids of `range` that sandboxes under `sandboxes` hold (root-owned directories whose
/// group lies in the range), `except` one of them.
fn held_gids(sandboxes: &Path, range: &RangeInclusive<u32>, except: &Path) -> io::Result<Vec<u32>> {
    let mut held = vec![];
    for entry in std::fs::read_dir(sandboxes)? {
        let entry = entry?;
        if entry.path() == except {
            continue;
        }
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if meta.is_dir() && meta.uid() == 0 && range.contains(&meta.gid()) {
            held.push(meta.gid());
        }
    }
    Ok(held)
}

/// Why no group id could be handed out.
#[derive(Debug, thiserror::Error)]
#[error(
    "no free sandbox group id: all {count} ids {first}–{last} are held by sandboxes of running tasks under {dir} \
     (or named in the group database); a task frees its id when it ends — stop some tasks on this agent or \
     run fewer at once"
)]
pub struct GidsExhausted {
    pub count: u32,
    pub first: u32,
    pub last: u32,
    pub dir: PathBuf,
}

/// The lowest group id of `range` that no sandbox under `sandbox`'s parent holds and the host's
/// group database does not name. The caller serialises allocations of one agent (see
/// `Containerizer::launch`) and gives the id to the sandbox directory before the next one.
pub(crate) fn allocate_gid(sandbox: &Path, range: &RangeInclusive<u32>) -> Result<u32, io::Error> {
    let parent = sandbox.parent().unwrap_or(Path::new("/"));
    let mut held = held_gids(parent, range, sandbox)?;
    held.sort_unstable();
    for gid in range.clone() {
        if held.binary_search(&gid).is_ok() {
            continue;
        }
        // A group the host uses for something else is not ours to hand out.
        if matches!(Group::from_gid(Gid::from_raw(gid)), Ok(Some(_))) {
            continue;
        }
        return Ok(gid);
    }
    Err(io::Error::other(GidsExhausted {
        count: range.end().saturating_sub(*range.start()) + 1,
        first: *range.start(),
        last: *range.end(),
        dir: parent.to_path_buf(),
    }))
}

/// True when `sandbox` has the current layout: the directory is the agent's own (root's, or the
/// agent's user when it is not root) and holds a `logs/` of the agent's too (a sandbox of the
/// previous layout belongs to the task's user and has no `logs/`).
pub fn has_current_layout(sandbox: &Path) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    let Ok(dir) = open_dir_nofollow(sandbox) else { return false };
    let Ok(stat) = fstat(&dir) else { return false };
    stat.st_uid == me
        && open_dir_at(dir.as_fd(), LOGS_DIR).ok().and_then(|logs| fstat(&logs).ok()).is_some_and(|s| s.st_uid == me)
}

/// The group id the task of `work` (a sandbox's [`WORK_DIR`]) runs with, if its sandbox has one:
/// what a process started for the task from outside (a command health check) needs as its group
/// to enter the task's directory.
pub fn task_gid_of_work_dir(work: &Path) -> Option<Gid> {
    let sandbox = work.parent()?;
    let stat = fstat(open_dir_nofollow(sandbox).ok()?).ok()?;
    (stat.st_uid == 0 && (SANDBOX_GID_FIRST..=SANDBOX_GID_LAST).contains(&stat.st_gid))
        .then(|| Gid::from_raw(stat.st_gid))
}

/// A sandbox's log directory, held open, for reading the task's output as root without trusting
/// any name in it.
#[derive(Debug)]
pub struct LogDir {
    fd: OwnedFd,
    /// The directory's owner: every log file must be this user's (root in the current layout).
    owner: u32,
}

/// `(device, inode, length)` of a file, to notice a rotation.
pub type FileId = (u64, u64, u64);

fn file_id(stat: &FileStat) -> FileId {
    (stat.st_dev, stat.st_ino, stat.st_size as u64)
}

impl LogDir {
    /// `SANDBOX/logs/`, or — for a sandbox of the previous layout — `SANDBOX/` itself. Neither
    /// is followed if it is a link. `NotFound` when there is no such sandbox. The current layout
    /// is the one whose directories are the reader's own (root's, as the agent runs).
    pub fn open(sandbox: &Path) -> io::Result<LogDir> {
        let me = nix::unistd::geteuid().as_raw();
        let dir = open_dir_nofollow(sandbox)?;
        let dir_stat = fstat(&dir).map_err(errno)?;
        if dir_stat.st_uid == me {
            match open_dir_at(dir.as_fd(), LOGS_DIR) {
                Ok(logs) => {
                    let stat = fstat(&logs).map_err(errno)?;
                    if stat.st_uid == me {
                        return Ok(LogDir { fd: logs, owner: me });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // Previous layout: the sandbox itself, whose files are its owner's.
        if dir_stat.st_uid != me && std::fs::metadata(sandbox.join(LAUNCH_FILE)).is_err() {
            // Not a sandbox the agent launched: nothing to read.
            return Err(io::Error::new(io::ErrorKind::NotFound, "no launch in this sandbox"));
        }
        Ok(LogDir { fd: dir, owner: dir_stat.st_uid })
    }

    /// Opens `name` for reading: refused unless it is a regular file with one link, owned by the
    /// directory's owner, and not a link itself. `NotFound` when it does not exist.
    pub fn open_file(&self, name: &str) -> io::Result<File> {
        check_name(name)?;
        let fd = openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            nix::Error::ELOOP => refused(name, "it is a symbolic link"),
            e => errno(e),
        })?;
        let stat = fstat(&fd).map_err(errno)?;
        if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Err(refused(name, "it is not a regular file"));
        }
        if stat.st_uid != self.owner || stat.st_nlink != 1 {
            return Err(refused(name, "it is not the sandbox's own file (owner or link count)"));
        }
        // Back to blocking reads (O_NONBLOCK only kept a FIFO from blocking the open).
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(errno)?;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) & !OFlag::O_NONBLOCK))
            .map_err(errno)?;
        Ok(File::from(fd))
    }

    /// What `name` names now (not following a link): `None` when nothing.
    pub fn id_of(&self, name: &str) -> Option<FileId> {
        check_name(name).ok()?;
        fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).ok().map(|s| file_id(&s))
    }
}

fn refused(name: &str, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("refusing to read the log file `{name}`: {why}"))
}

/// A log name is one plain component.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}` is not a log file name")));
    }
    Ok(())
}

impl AsRawFd for LogDir {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandbox in `dir`: of the current layout (root's, `logs/`) or the previous one (the task
    /// user's, files in it). Returns the sandbox and its log directory.
    fn fake_sandbox(dir: &Path, current: bool) -> (PathBuf, PathBuf) {
        let sandbox = dir.join(if current { "current" } else { "previous" });
        std::fs::create_dir(&sandbox).unwrap();
        std::fs::write(sandbox.join(LAUNCH_FILE), "{}").unwrap();
        let logs = if current { sandbox.join(LOGS_DIR) } else { sandbox.clone() };
        if current {
            std::fs::create_dir(&logs).unwrap();
        }
        std::fs::write(logs.join("stdout"), "out\n").unwrap();
        if !current && nix::unistd::geteuid().is_root() {
            // The previous layout: everything the task user's.
            for p in [&sandbox, &logs.join("stdout")] {
                nix::unistd::chown(p.as_path(), Some(Uid::from_raw(65534)), Some(Gid::from_raw(65534))).unwrap();
            }
        }
        (sandbox, logs)
    }

    #[test]
    fn a_log_reader_refuses_links_and_strangers_in_either_layout() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "secret").unwrap();
        let root = nix::unistd::geteuid().is_root();
        // Without root the sandbox of the previous layout is the reader's own, so it reads as
        // one of the current layout without `logs/`: the same files, the same checks.
        for current in [true, false] {
            let (sandbox, logs) = fake_sandbox(dir.path(), current);
            std::os::unix::fs::symlink(&secret, logs.join("stderr")).unwrap();
            std::fs::hard_link(&secret, logs.join("stdout.1")).unwrap();
            nix::unistd::mkfifo(&logs.join("stdout.2"), Mode::from_bits_truncate(0o600)).unwrap();
            let reader = LogDir::open(&sandbox).unwrap();
            assert_eq!(io::read_to_string(reader.open_file("stdout").unwrap()).unwrap(), "out\n");
            for name in ["stderr", "stdout.1", "stdout.2"] {
                let e = reader.open_file(name).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "current layout {current}, {name}: {e}");
            }
            assert_eq!(reader.open_file("stdout.3").unwrap_err().kind(), io::ErrorKind::NotFound);
            assert_eq!(reader.open_file("../secret").unwrap_err().kind(), io::ErrorKind::InvalidInput);
            assert!(reader.id_of("stdout").is_some() && reader.id_of("stdout.3").is_none());
        }
        if root {
            // A file of root's in a sandbox of the previous layout is not the task's own.
            let (sandbox, logs) = (dir.path().join("previous"), dir.path().join("previous"));
            std::fs::write(logs.join("stderr.1"), "root's").unwrap();
            let e = LogDir::open(&sandbox).unwrap().open_file("stderr.1").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        }
        // A link in place of the sandbox itself is not followed.
        std::os::unix::fs::symlink(dir.path().join("previous"), dir.path().join("link")).unwrap();
        assert!(LogDir::open(&dir.path().join("link")).is_err());
    }

    #[test]
    fn gids_held_by_sandboxes_are_not_handed_out() {
        if !nix::unistd::geteuid().is_root() {
            return; // chown needs root; the supervisor tests cover the rest
        }
        let dir = tempfile::tempdir().unwrap();
        let range = 64000..=64002;
        let a = dir.path().join("a");
        assert_eq!(allocate_gid(&a, &range).unwrap(), 64000);
        std::fs::create_dir(&a).unwrap();
        nix::unistd::chown(&a, Some(Uid::from_raw(0)), Some(Gid::from_raw(64000))).unwrap();
        let b = dir.path().join("b");
        assert_eq!(allocate_gid(&b, &range).unwrap(), 64001);
        std::fs::create_dir(&b).unwrap();
        nix::unistd::chown(&b, Some(Uid::from_raw(0)), Some(Gid::from_raw(64002))).unwrap();
        assert_eq!(allocate_gid(&b, &range).unwrap(), 64001, "its own group does not count against it");
        let c = dir.path().join("c");
        assert_eq!(allocate_gid(&c, &range).unwrap(), 64001);
        std::fs::create_dir(&c).unwrap();
        nix::unistd::chown(&c, Some(Uid::from_raw(0)), Some(Gid::from_raw(64001))).unwrap();
        let e = allocate_gid(&dir.path().join("d"), &range).unwrap_err();
        assert!(e.to_string().contains("no free sandbox group id: all 3 ids 64000–64002"), "{e}");
        release_gid(&b).unwrap();
        assert_eq!(allocate_gid(&dir.path().join("d"), &range).unwrap(), 64002, "an ended task frees its id");
    }
}
