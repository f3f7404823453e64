//! The task's output files: the supervisor appends what it reads from the task's pipes and
//! rotates each file by size.
//!
//! `stdout` grows until the next write would take it past `max_bytes`; then the files shift by
//! one (`stdout.N-1` → `stdout.N`, …, `stdout` → `stdout.1`, the oldest falls off the end) and a
//! new, empty `stdout` is opened. So `stdout.1` is the newest rotated part and at most `keep`
//! rotated parts exist. A cut goes after the last complete line that fits, so lines stay whole
//! unless a single line is longer than `max_bytes`.
//!
//! Readers: a rotation is a rename chain, then a new file under the old name. A reader that
//! *follows* a log (`tail -F`, the agent's `follow=true`) must notice that the path now names
//! another inode (compare `fstat` of its open file with `stat` of the path, `(dev, ino)`) and
//! reopen the path from offset 0 — after first reading what is left of its old file, which is now
//! `stdout.1`. A reader that keeps its descriptor would otherwise read a file that no longer grows.
//!
//! Where: the files live in the sandbox's root-only `logs/` directory (see [`crate::sandbox`]),
//! which the supervisor holds open; every create, open, rename and unlink is relative to that
//! descriptor with `O_NOFOLLOW` (a rename never follows a link), files are created mode 0600 and
//! nothing is ever chowned. The task never has the files, only the write ends of its pipes.
//!
//! Architecture invariant: a live log file never exceeds `max_bytes` (a full disk drops output,
//! it never blocks the task forever: the supervisor keeps reading the pipe).

use nix::fcntl::{fcntl, openat, renameat, FcntlArg, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Mode of a log file: root's alone (the task reads its output through the agent's API).
const LOG_FILE_MODE: u32 = 0o600;

/// One output stream's file, with its rotated predecessors next to it.
#[derive(Debug)]
pub(crate) struct RotatingLog {
    /// The directory of the files, held open.
    dir: Arc<OwnedFd>,
    /// The live file's name in `dir` (`stdout`).
    name: String,
    /// For messages only: where `dir` was when it was opened.
    shown: PathBuf,
    file: File,
    size_bytes: u64,
    max_bytes: u64,
    keep: u32,
    /// Output lost to write errors since the last successful write (reported when it resumes).
    dropped_bytes: u64,
}

/// The `n`th rotated part of a log: `SANDBOX/logs/stdout` → `SANDBOX/logs/stdout.N` (1 is the
/// newest).
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The `n`th rotated part's name: `stdout` → `stdout.N`.
pub fn rotated_name(name: &str, n: u32) -> String {
    format!("{name}.{n}")
}

/// Opens (creating) `name` in `dir` for appending: never through a link, and only a regular file.
fn open_append(dir: BorrowedFd<'_>, name: &str) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(LOG_FILE_MODE),
    )?;
    let stat = fstat(&fd)?;
    if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{name} is not a regular file")));
    }
    let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK))?;
    Ok(File::from(fd))
}

fn ignore_missing(result: nix::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl RotatingLog {
    /// Opens (creating) `name` in `dir` for appending; `max_bytes` is at least 1. `shown` is the
    /// directory's path, for messages.
    pub fn open(dir: Arc<OwnedFd>, shown: &Path, name: &str, max_bytes: u64, keep: u32) -> io::Result<Self> {
        assert!(max_bytes > 0, "a log of at most 0 bytes cannot hold anything");
        let file = open_append(dir.as_fd(), name)?;
        let size_bytes = file.metadata()?.len();
        Ok(RotatingLog {
            dir,
            name: name.to_owned(),
            shown: shown.join(name),
            file,
            size_bytes,
            max_bytes,
            keep,
            dropped_bytes: 0,
        })
    }

    /// Appends `data`, rotating as often as needed. Never fails: what cannot be written is
    /// dropped and reported on the supervisor's stderr (`supervisor.log`).
    pub fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = self.max_bytes.saturating_sub(self.size_bytes);
            if data.len() as u64 <= room {
                self.append(data);
                return;
            }
            let room = room as usize; // < data.len()
            match data[..room].iter().rposition(|&b| b == b'\n') {
                Some(newline) => {
                    self.append(&data[..=newline]);
                    data = &data[newline + 1..];
                }
                // A line longer than the whole file: cut it where the file is full.
                None if self.size_bytes == 0 => {
                    self.append(&data[..room]);
                    data = &data[room..];
                }
                None => {}
            }
            self.rotate();
        }
    }

    fn append(&mut self, chunk: &[u8]) {
        match self.file.write_all(chunk) {
            Ok(()) => {
                self.size_bytes += chunk.len() as u64;
                if self.dropped_bytes > 0 {
                    eprintln!(
                        "capstan supervisor: {}: writing again after dropping {} bytes",
                        self.shown.display(),
                        self.dropped_bytes
                    );
                    self.dropped_bytes = 0;
                }
            }
            Err(e) => {
                if self.dropped_bytes == 0 {
                    eprintln!("capstan supervisor: {}: {e}; dropping output", self.shown.display());
                }
                self.dropped_bytes += chunk.len() as u64;
                // A partial write may have grown the file; stay within the bound.
                self.size_bytes = self.file.metadata().map_or(self.max_bytes, |m| m.len());
            }
        }
    }

    /// Shifts the files by one and opens a new, empty one. If that fails, the current file is
    /// emptied instead: losing old output beats growing without bound.
    fn rotate(&mut self) {
        match self.shift_and_reopen() {
            Ok(file) => self.file = file,
            Err(e) => {
                eprintln!("capstan supervisor: rotating {}: {e}; truncating it instead", self.shown.display());
                if let Err(e) = self.file.set_len(0) {
                    eprintln!("capstan supervisor: truncating {}: {e}", self.shown.display());
                }
            }
        }
        self.size_bytes = 0;
    }

    fn shift_and_reopen(&self) -> io::Result<File> {
        let dir = self.dir.as_fd();
        if self.keep == 0 {
            ignore_missing(unlinkat(dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir))?;
        } else {
            for n in (1..self.keep).rev() {
                let (from, to) = (rotated_name(&self.name, n), rotated_name(&self.name, n + 1));
                ignore_missing(renameat(dir, from.as_str(), dir, to.as_str()))?;
            }
            renameat(dir, self.name.as_str(), dir, rotated_name(&self.name, 1).as_str())?;
        }
        open_append(dir, &self.name)
    }

    /// Flushes the current file to disk (before `exit.json` is written).
    pub fn sync(&self) {
        if let Err(e) = self.file.sync_data() {
            eprintln!("capstan supervisor: syncing {}: {e}", self.shown.display());
        }
    }
}

/// A pipe from the task and the log its bytes go to. The supervisor polls [`LogPump::fd`] and
/// calls [`LogPump::pump`] when it is readable.
#[derive(Debug)]
pub(crate) struct LogPump {
    /// The read end, non-blocking; `None` once the pipe reached EOF (every writer is gone).
    pipe: Option<File>,
    log: RotatingLog,
}

impl LogPump {
    pub fn new(pipe: OwnedFd, log: RotatingLog) -> io::Result<Self> {
        let flags = OFlag::from_bits_retain(fcntl(&pipe, FcntlArg::F_GETFL)?);
        fcntl(&pipe, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(LogPump { pipe: Some(File::from(pipe)), log })
    }

    /// The pipe to poll, while it is open.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.pipe.as_ref().map(AsFd::as_fd)
    }

    pub fn is_open(&self) -> bool {
        self.pipe.is_some()
    }

    /// Moves what the pipe holds now into the log: at most `max_reads` reads of `buf.len()`
    /// bytes, so that one busy stream cannot starve the other or the signals. Notices EOF.
    pub fn pump(&mut self, buf: &mut [u8], max_reads: usize) {
        let Some(pipe) = &mut self.pipe else { return };
        for _ in 0..max_reads {
            match pipe.read(buf) {
                Ok(0) => {
                    self.pipe = None;
                    return;
                }
                Ok(n) => self.log.write(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("capstan supervisor: reading the task's output for {}: {e}", self.log.shown.display());
                    self.pipe = None;
                    return;
                }
            }
        }
    }

    /// See [`RotatingLog::sync`].
    pub fn sync(&self) {
        self.log.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| format!("<{e}>"))
    }

    fn open(path: &Path, max_bytes: u64, keep: u32) -> RotatingLog {
        let dir = Arc::new(crate::sandbox::open_dir_nofollow(path.parent().unwrap()).unwrap());
        let name = path.file_name().unwrap().to_str().unwrap();
        RotatingLog::open(dir, path.parent().unwrap(), name, max_bytes, keep).unwrap()
    }

    #[test]
    fn rotation_cuts_after_whole_lines_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let mut log = open(&path, 10, 2);
        log.write(b"aaaa\nbbbb\ncccc\n");
        assert_eq!(read(&path), "cccc\n");
        assert_eq!(read(&rotated_path(&path, 1)), "aaaa\nbbbb\n");
        log.write(b"dd\n");
        log.write(b"eeee\n"); // 8 + 5 bytes do not fit: rotate first
        assert_eq!(read(&path), "eeee\n");
        assert_eq!(read(&rotated_path(&path, 1)), "cccc\ndd\n");
        assert_eq!(read(&rotated_path(&path, 2)), "aaaa\nbbbb\n");
        log.write(b"ffff\n"); // exactly full is allowed
        assert_eq!(read(&path), "eeee\nffff\n");
        log.write(b"g\n");
        assert_eq!(read(&path), "g\n");
        assert_eq!(read(&rotated_path(&path, 1)), "eeee\nffff\n");
        assert_eq!(read(&rotated_path(&path, 2)), "cccc\ndd\n");
        assert!(!rotated_path(&path, 3).exists());
    }

    #[test]
    fn a_line_longer_than_the_file_is_cut_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let mut log = open(&path, 4, 3);
        log.write(b"ab\n");
        log.write(b"0123456789\n");
        assert_eq!(read(&rotated_path(&path, 3)), "ab\n");
        assert_eq!(read(&rotated_path(&path, 2)), "0123");
        assert_eq!(read(&rotated_path(&path, 1)), "4567");
        assert_eq!(read(&path), "89\n");
        assert!(!rotated_path(&path, 4).exists());
    }

    #[test]
    fn keep_zero_discards_and_sizes_never_exceed_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let mut log = open(&path, 100, 0);
        for i in 0..1000 {
            log.write(format!("line {i}\n").as_bytes());
            assert!(fs::metadata(&path).unwrap().len() <= 100);
        }
        assert!(read(&path).ends_with("line 999\n"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "nothing rotated is kept");
    }

    #[test]
    fn a_pump_moves_what_the_pipe_holds_and_sees_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let mut pump = LogPump::new(read_end, open(&path, 1 << 20, 1)).unwrap();
        let mut writer = File::from(write_end);
        writer.write_all(b"one\ntwo\n").unwrap();
        let mut buf = [0u8; 4];
        pump.pump(&mut buf, 1);
        assert_eq!(read(&path), "one\n", "one read of 4 bytes per call");
        pump.pump(&mut buf, 100);
        assert_eq!(read(&path), "one\ntwo\n");
        assert!(pump.is_open(), "an empty pipe with a writer is not EOF");
        writer.write_all(b"last").unwrap();
        drop(writer);
        pump.pump(&mut buf, 100);
        assert_eq!(read(&path), "one\ntwo\nlast");
        assert!(!pump.is_open() && pump.fd().is_none());
    }

    #[test]
    fn an_existing_file_counts_towards_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        fs::write(&path, "12345678\n").unwrap();
        let mut log = open(&path, 10, 1);
        log.write(b"xy\n");
        assert_eq!(read(&rotated_path(&path, 1)), "12345678\n");
        assert_eq!(read(&path), "xy\n");
    }

    #[test]
    fn links_planted_among_the_files_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "untouched\n").unwrap();
        let logs = dir.path().join("logs");
        fs::create_dir(&logs).unwrap();
        let path = logs.join("stdout");
        let mut log = open(&path, 10, 2);
        log.write(b"aaaa\n");
        // The live name and the rotated names replaced by links to the victim.
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        std::os::unix::fs::symlink(&victim, rotated_path(&path, 1)).unwrap();
        std::os::unix::fs::symlink(&victim, rotated_path(&path, 2)).unwrap();
        for _ in 0..5 {
            log.write(b"bbbbbbbb\n");
        }
        assert_eq!(read(&victim), "untouched\n", "nothing was written through a link");
        assert!(fs::symlink_metadata(&victim).unwrap().is_file());
    }
}
