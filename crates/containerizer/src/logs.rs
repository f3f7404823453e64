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
//! Architecture invariant: a live log file never exceeds `max_bytes` (a full disk drops output,
//! it never blocks the task forever: the supervisor keeps reading the pipe).

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::{Gid, Uid};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// One output stream's file, with its rotated predecessors next to it.
#[derive(Debug)]
pub(crate) struct RotatingLog {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    max_bytes: u64,
    keep: u32,
    /// Owner of the files (the task's user, so it can read its own logs).
    owner: Option<(Uid, Gid)>,
    /// Output lost to write errors since the last successful write (reported when it resumes).
    dropped_bytes: u64,
}

/// The `n`th rotated part of a log: `SANDBOX/stdout` → `SANDBOX/stdout.N` (1 is the newest).
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path, owner: Option<(Uid, Gid)>) -> io::Result<File> {
    let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(&file, Some(uid), Some(gid)).map_err(io::Error::from)?;
    }
    Ok(file)
}

impl RotatingLog {
    /// Opens (creating) `path` for appending; `max_bytes` is at least 1.
    pub fn open(path: &Path, max_bytes: u64, keep: u32, owner: Option<(Uid, Gid)>) -> io::Result<Self> {
        assert!(max_bytes > 0, "a log of at most 0 bytes cannot hold anything");
        let file = open_append(path, owner)?;
        let size_bytes = file.metadata()?.len();
        Ok(RotatingLog { path: path.to_path_buf(), file, size_bytes, max_bytes, keep, owner, dropped_bytes: 0 })
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
                        self.path.display(),
                        self.dropped_bytes
                    );
                    self.dropped_bytes = 0;
                }
            }
            Err(e) => {
                if self.dropped_bytes == 0 {
                    eprintln!("capstan supervisor: {}: {e}; dropping output", self.path.display());
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
                eprintln!("capstan supervisor: rotating {}: {e}; truncating it instead", self.path.display());
                if let Err(e) = self.file.set_len(0) {
                    eprintln!("capstan supervisor: truncating {}: {e}", self.path.display());
                }
            }
        }
        self.size_bytes = 0;
    }

    fn shift_and_reopen(&self) -> io::Result<File> {
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                match fs::rename(rotated_path(&self.path, n), rotated_path(&self.path, n + 1)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            fs::rename(&self.path, rotated_path(&self.path, 1))?;
        }
        open_append(&self.path, self.owner)
    }

    /// Flushes the current file to disk (before `exit.json` is written).
    pub fn sync(&self) {
        if let Err(e) = self.file.sync_data() {
            eprintln!("capstan supervisor: syncing {}: {e}", self.path.display());
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
                    eprintln!("capstan supervisor: reading the task's output for {}: {e}", self.log.path.display());
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

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| format!("<{e}>"))
    }

    #[test]
    fn rotation_cuts_after_whole_lines_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let mut log = RotatingLog::open(&path, 10, 2, None).unwrap();
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
        let mut log = RotatingLog::open(&path, 4, 3, None).unwrap();
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
        let mut log = RotatingLog::open(&path, 100, 0, None).unwrap();
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
        let mut pump = LogPump::new(read_end, RotatingLog::open(&path, 1 << 20, 1, None).unwrap()).unwrap();
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
        let mut log = RotatingLog::open(&path, 10, 1, None).unwrap();
        log.write(b"xy\n");
        assert_eq!(read(&rotated_path(&path, 1)), "12345678\n");
        assert_eq!(read(&path), "xy\n");
    }
}
