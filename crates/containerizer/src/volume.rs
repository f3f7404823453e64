//! Disk limits by a size-limited volume per task, for hosts whose kernel has no project quotas:
//! a sparse image file of the task's `disk` bytes (`VOLUMES/NAME.img`, root's, 0600, in a
//! directory of root's alone, 0700, outside every sandbox), an ext4 file system on it (no
//! journal, no blocks reserved for root), loop-mounted `nosuid,nodev` on the sandbox's `work/`
//! before the sandbox is laid out. Everything the task can write — its work directory and its
//! private `/tmp` (`work/tmp`, bind-mounted by the supervisor) — is then on the volume, and a
//! write past it fails with `ENOSPC` as it happens. The logs (`SANDBOX/logs`) stay outside.
//!
//! The mount lives in the host's mount namespace, so it outlives the agent (a restart or a
//! `kill -9` finds it in place); the image outlives a reboot. [`LoopVolumes::remove`] unmounts
//! and deletes it when the sandbox goes; [`LoopVolumes::sweep`] unmounts and deletes those of
//! tasks that no longer have a sandbox.
//!
//! Mounting goes through util-linux's `mount -o loop`: it picks a free loop device and binds the
//! image to it in one step that is safe against concurrent launches (it retries when another
//! process took the device first), and sets the loop device to detach itself once the last
//! mount of it goes (`LO_FLAGS_AUTOCLEAR`), so no loop device leaks when a task's own mount
//! namespace still held a copy at unmount. Doing this by hand means `LOOP_CTL_GET_FREE`,
//! `LOOP_CONFIGURE` and that retry loop; the command is on every host that has `mkfs.ext4`.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `VOLUMES/`: root's alone.
pub const VOLUMES_DIR_MODE: u32 = 0o700;
/// `VOLUMES/NAME.img`: root's alone.
pub const VOLUME_IMAGE_MODE: u32 = 0o600;
/// Smallest volume made: ext4 cannot lay itself out in less (a smaller `disk` gets this much).
pub const VOLUME_MIN_BYTES: u64 = 1 << 20;
/// What an image file's name ends with.
pub const VOLUME_IMAGE_SUFFIX: &str = ".img";
/// Options of every volume's mount.
pub const VOLUME_MOUNT_OPTIONS: &str = "loop,nosuid,nodev";
/// The file system made on each image.
pub const VOLUME_FS_TYPE: &str = "ext4";

/// The per-task volumes of one agent, their images in one directory.
#[derive(Clone, Debug)]
pub struct LoopVolumes {
    dir: PathBuf,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl LoopVolumes {
    /// Volumes whose images live in `dir` (created, and given mode 0700). Fails, saying what is
    /// missing, when this host cannot make them: not root, or no `mkfs.ext4`/`mount`.
    pub fn open(dir: &Path) -> Result<LoopVolumes, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("loop volumes need root (the agent mounts file systems)".into());
        }
        for tool in ["mkfs.ext4", "mount"] {
            run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                .map_err(|_| format!("`{tool}` is not on the PATH; install e2fsprogs and util-linux"))?;
        }
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(VOLUMES_DIR_MODE))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
        Ok(LoopVolumes { dir: dir.to_path_buf() })
    }

    /// The volumes whose images are (or would be) in `dir`, without checking or creating
    /// anything: enough to remove them.
    pub fn at(dir: &Path) -> LoopVolumes {
        LoopVolumes { dir: dir.to_path_buf() }
    }

    /// The image of volume `name`.
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{VOLUME_IMAGE_SUFFIX}"))
    }

    /// Makes volume `name` of `bytes` (at least [`VOLUME_MIN_BYTES`]) and mounts it on
    /// `mount_point` (created if missing). A volume of that name already there (of an earlier
    /// launch that never ran) is unmounted and made anew. The error says which step failed.
    pub fn create(&self, name: &str, mount_point: &Path, bytes: u64) -> Result<(), String> {
        let image = self.image(name);
        unmount(mount_point)?;
        fs::create_dir_all(mount_point).map_err(|e| format!("cannot create {}: {e}", mount_point.display()))?;
        let made = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(VOLUME_IMAGE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&image)
            .and_then(|f| {
                f.set_permissions(fs::Permissions::from_mode(VOLUME_IMAGE_MODE))?;
                f.set_len(bytes.max(VOLUME_MIN_BYTES))
            });
        made.map_err(|e| format!("cannot create the image {}: {e}", image.display()))?;
        let result = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "nodiscard", "-t", VOLUME_FS_TYPE])
            .arg(&image))
        .and_then(|()| {
            run(Command::new("mount")
                .args(["-t", VOLUME_FS_TYPE, "-o", VOLUME_MOUNT_OPTIONS])
                .arg(&image)
                .arg(mount_point))
        });
        if let Err(e) = result {
            let _ = fs::remove_file(&image);
            return Err(e);
        }
        // mkfs's lost+found would only sit in the task's home; e2fsck makes it again if needed.
        let _ = fs::remove_dir(mount_point.join("lost+found"));
        Ok(())
    }

    /// Mounts the existing image of volume `name` on `mount_point` again (after a reboot); false
    /// when there is no image. Does nothing when something is mounted there already.
    pub fn remount(&self, name: &str, mount_point: &Path) -> Result<bool, String> {
        let image = self.image(name);
        if !image.exists() {
            return Ok(false);
        }
        if is_mount_point(mount_point) {
            return Ok(true);
        }
        run(Command::new("mount")
            .args(["-t", VOLUME_FS_TYPE, "-o", VOLUME_MOUNT_OPTIONS])
            .arg(&image)
            .arg(mount_point))?;
        Ok(true)
    }

    /// Unmounts volume `name` from `mount_point` (if mounted there) and deletes its image (if
    /// any). Idempotent.
    pub fn remove(&self, name: &str, mount_point: &Path) -> Result<(), String> {
        unmount(mount_point)?;
        match fs::remove_file(self.image(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot delete the image {}: {e}", self.image(name).display())),
        }
    }

    /// The names of the volumes whose images are here.
    pub fn names(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return vec![] };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(VOLUME_IMAGE_SUFFIX).map(str::to_owned))
            .collect()
    }

    /// Unmounts every volume of ours mounted below `under` on a path that `keep` does not
    /// accept, and deletes every image whose name `keep_name` does not accept. Returns what was
    /// removed, for the log.
    pub fn sweep(&self, under: &Path, keep: impl Fn(&Path) -> bool, keep_name: impl Fn(&str) -> bool) -> Vec<String> {
        let mut removed = vec![];
        for m in mount_points_below(under, VOLUME_FS_TYPE) {
            if !keep(&m) && m.file_name().is_some_and(|n| n == crate::sandbox::WORK_DIR) {
                match unmount(&m) {
                    Ok(()) => removed.push(format!("mount {}", m.display())),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        for name in self.names() {
            if !keep_name(&name) {
                match fs::remove_file(self.image(&name)) {
                    Ok(()) => removed.push(format!("image {}", self.image(&name).display())),
                    Err(e) => tracing::warn!("cannot delete the image {}: {e}", self.image(&name).display()),
                }
            }
        }
        removed
    }
}

/// Detaches whatever is mounted on `path` itself (a symbolic link there is not followed: the path
/// must appear as is in the mount table, and the unmount refuses a link; lazily: a process of the host still inside it keeps
/// its view until it leaves; the loop device goes once nothing holds it). No mount: nothing.
pub fn unmount(path: &Path) -> Result<(), String> {
    if !is_mount_point(path) {
        return Ok(());
    }
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW)
        .map_err(|e| format!("cannot unmount {}: {e}", path.display()))
}

/// Whether something is mounted on `path` (in this process's mount namespace).
pub fn is_mount_point(path: &Path) -> bool {
    mounts().iter().any(|(p, _)| p == path)
}

/// Mount points of file systems of type `fs_type` strictly below `dir`.
pub fn mount_points_below(dir: &Path, fs_type: &str) -> Vec<PathBuf> {
    mounts().into_iter().filter(|(p, t)| t == fs_type && p != dir && p.starts_with(dir)).map(|(p, _)| p).collect()
}

/// (mount point, file system type) of every mount in `/proc/self/mountinfo`.
fn mounts() -> Vec<(PathBuf, String)> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else { return vec![] };
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// `36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw` → (`/mnt/parent`,
/// `ext3`). Octal escapes (`\040` for a space) in the mount point are decoded.
fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    let mut fields = line.split(' ');
    let mount_point = fields.nth(4)?;
    let fs_type = fields.skip_while(|f| *f != "-").nth(1)?;
    Some((PathBuf::from(unescape(mount_point)), fs_type.to_owned()))
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.len() >= i + 4 {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(out).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_the_mount_point_and_type() {
        let line = "36 35 98:0 / /data/sand\\040boxes/1/work rw,nosuid,nodev,relatime shared:1 - ext4 /dev/loop3 rw";
        assert_eq!(parse_mountinfo_line(line), Some((PathBuf::from("/data/sand boxes/1/work"), "ext4".into())));
        // Optional fields may be absent.
        let line = "22 1 0:21 / /proc rw - proc proc rw";
        assert_eq!(parse_mountinfo_line(line), Some((PathBuf::from("/proc"), "proc".into())));
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }
}
