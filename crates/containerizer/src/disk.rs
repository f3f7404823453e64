//! Disk use of a sandbox, for the agent's disk quotas.

use std::collections::HashSet;
use std::fs;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
