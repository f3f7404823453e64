//! Tests of the embedded (redb) store: the shared conformance suite plus crash, corruption, format and full-disk tests.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use capstan_store::conformance::{entries, entry_data, snapshot_data};
use capstan_store::{fault_injection, EmbeddedStore, LogEntry, Snapshot, Store, StoreError, STORE_FILE_NAME};
use tempfile::TempDir;

capstan_store::conformance_suite!(
    embedded,
    fresh = || {
        let dir = TempDir::new().unwrap();
        (EmbeddedStore::open(dir.path()).unwrap(), dir)
    },
    reopen = |dir: &TempDir| EmbeddedStore::open(dir.path()).unwrap(),
);

#[test]
fn describe_names_the_file() {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let expected = format!("embedded store at {}", dir.path().join(STORE_FILE_NAME).display());
    assert_eq!(store.describe(), expected);
}

#[test]
fn second_open_of_the_same_store_is_refused() {
    let dir = TempDir::new().unwrap();
    let _store = EmbeddedStore::open(dir.path()).unwrap();
    let err = EmbeddedStore::open(dir.path()).err().expect("second open must fail");
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    assert!(err.to_string().contains(STORE_FILE_NAME), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Child processes: the test binary runs itself with CAPSTAN_STORE_CHILD set to one of these
// test names; without the variable those tests return at once.

const CHILD_ENV: &str = "CAPSTAN_STORE_CHILD";
const DIR_ENV: &str = "CAPSTAN_STORE_DIR";

fn child_dir(mode: &str) -> Option<std::path::PathBuf> {
    (std::env::var(CHILD_ENV).ok()? == mode).then(|| std::env::var(DIR_ENV).unwrap().into())
}

fn spawn_child(mode: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", mode, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env(DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Snapshot data written by the crash child for a snapshot at `index` (about 1.5 MiB).
fn crash_snapshot_data(index: u64) -> Vec<u8> {
    snapshot_data((3 << 19) + (index as usize % 1000), index)
}

/// Child: appends batches (and now and then a snapshot) forever, printing each acknowledgement.
#[test]
fn crash_child_appends_forever() {
    let Some(dir) = child_dir("crash_child_appends_forever") else {
        return;
    };
    let store = EmbeddedStore::open(&dir).unwrap();
    let mut out = std::io::stdout().lock();
    let mut next = store.last_index().unwrap() + 1;
    for round in 0u64.. {
        let batch_len = round % 37 + 1;
        store.append(&entries(next, next + batch_len - 1)).unwrap();
        next += batch_len;
        writeln!(out, "acked {}", next - 1).unwrap();
        if round % 25 == 24 {
            let index = next - 1 - (round % 5);
            let data = crash_snapshot_data(index);
            store.install_snapshot(&Snapshot { index, data }).unwrap();
            writeln!(out, "snapshot {index}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_loses_nothing_acknowledged() {
    let dir = TempDir::new().unwrap();
    for (attempt, kill_after_acks) in [40u64, 7, 130, 1, 300].into_iter().enumerate() {
        let mut child = spawn_child("crash_child_appends_forever", dir.path());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut acked, mut snapshot_acked, mut acks) = (0u64, 0u64, 0u64);
        // Returns false at the end of the child's output.
        let mut read_line = |acked: &mut u64, snapshot_acked: &mut u64, acks: &mut u64| -> bool {
            let Some(line) = lines.next() else {
                return false;
            };
            let line = line.unwrap();
            if let Some(index) = line.strip_prefix("acked ") {
                *acked = index.parse().unwrap();
                *acks += 1;
            } else if let Some(index) = line.strip_prefix("snapshot ") {
                *snapshot_acked = index.parse().unwrap();
            }
            true
        };
        while acks < kill_after_acks {
            let more = read_line(&mut acked, &mut snapshot_acked, &mut acks);
            assert!(more, "child exited early");
        }
        child.kill().unwrap(); // SIGKILL
                               // Whatever it printed before it died was acknowledged too.
        while read_line(&mut acked, &mut snapshot_acked, &mut acks) {}
        child.wait().unwrap();

        let store = EmbeddedStore::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        let last = store.last_index().unwrap();
        assert!(last >= acked, "attempt {attempt}: acknowledged {acked}, store has {last}");
        let snapshot_index = loaded.snapshot.as_ref().map_or(0, |s| s.index);
        assert!(
            snapshot_index >= snapshot_acked,
            "attempt {attempt}: snapshot {snapshot_acked} acknowledged, store has {snapshot_index}"
        );
        if let Some(snapshot) = &loaded.snapshot {
            assert!(snapshot.data == crash_snapshot_data(snapshot.index), "snapshot data");
        }
        for (i, entry) in loaded.entries.iter().enumerate() {
            assert_eq!(entry.index, snapshot_index + 1 + i as u64);
            assert_eq!(entry.data, entry_data(entry.index));
        }
        assert_eq!(loaded.entries.last().map_or(snapshot_index, |e| e.index), last);
        eprintln!("attempt {attempt}: acknowledged {acked}, recovered {last} (snapshot {snapshot_index})");
    }
}

/// Child: appends with a file size limit so writes fail like on a full disk, then lifts it.
#[test]
fn full_disk_child() {
    let Some(dir) = child_dir("full_disk_child") else {
        return;
    };
    // SAFETY: plain libc calls on this (single-test) child process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let store = EmbeddedStore::open(&dir).unwrap();
    store.append(&entries(1, 100)).unwrap();
    let file_bytes = std::fs::metadata(dir.join(STORE_FILE_NAME)).unwrap().len();
    set_file_size_limit(file_bytes + (4 << 20));

    let big = |index: u64| LogEntry { index, data: vec![index as u8; 64 << 10] };
    let mut acked = 100;
    let error = loop {
        let batch: Vec<LogEntry> = (acked + 1..=acked + 8).map(big).collect();
        match store.append(&batch) {
            Ok(()) => acked += 8,
            Err(error) => break error,
        }
        assert!(acked < 10_000, "the file size limit never hit");
    };
    println!("append failed after {acked} as expected: {error}");
    assert!(matches!(error, StoreError::Io { .. } | StoreError::Backend(_)), "{error}");
    assert!(error.to_string().contains(STORE_FILE_NAME), "{error}");

    // Still usable for reads; nothing acknowledged is lost, nothing of the failed batch is there.
    let loaded = store.load().unwrap();
    assert_eq!(loaded.entries.len() as u64, acked);
    assert_eq!(store.last_index().unwrap(), acked);
    // Retrying while the disk is still full fails cleanly again (or fits into slack space).
    match store.append(&[big(acked + 1)]) {
        Ok(()) => acked += 1,
        Err(error) => println!("retry while full failed as expected: {error}"),
    }
    assert_eq!(store.last_index().unwrap(), acked);

    // Space comes back: appends continue at the right index.
    set_file_size_limit(libc::RLIM_INFINITY);
    let batch: Vec<LogEntry> = (acked + 1..=acked + 8).map(big).collect();
    store.append(&batch).unwrap();
    store.append(&entries(acked + 9, acked + 20)).unwrap();
    assert_eq!(store.last_index().unwrap(), acked + 20);
    println!("final {}", acked + 20);
}

fn set_file_size_limit(bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid pointer.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn full_disk_append_fails_and_store_stays_usable() {
    let dir = TempDir::new().unwrap();
    let child = spawn_child("full_disk_child", dir.path());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    let last: u64 =
        stdout.lines().find_map(|l| l.strip_prefix("final ")).expect("child reported its final index").parse().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.last_index().unwrap(), last);
    let loaded = store.load().unwrap();
    assert_eq!(loaded.entries.len() as u64, last);
}

// ---------------------------------------------------------------------------------------------
// Damaged and foreign files.

fn store_with(dir: &Path, last: u64) {
    let store = EmbeddedStore::open(dir).unwrap();
    store.append(&entries(1, last)).unwrap();
}

#[test]
fn corrupted_log_entry_is_named() {
    let dir = TempDir::new().unwrap();
    store_with(dir.path(), 2000);
    fault_injection::corrupt_log_entry(dir.path(), 1234);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let err = store.load().unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
    assert!(message.contains("log entry 1234"), "{message}");
    assert!(message.contains(STORE_FILE_NAME), "{message}");
    assert!(message.contains("checksum"), "{message}");
}

#[test]
fn corrupted_snapshot_chunk_is_named() {
    let dir = TempDir::new().unwrap();
    store_with(dir.path(), 10);
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let data = snapshot_data(5 << 20, 9);
        store.install_snapshot(&Snapshot { index: 9, data }).unwrap();
    }
    fault_injection::corrupt_snapshot_chunk(dir.path(), 9, 3);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let message = store.load().unwrap_err().to_string();
    assert!(message.contains("snapshot chunk 3 of the snapshot at index 9"), "{message}");
}

#[test]
fn newer_record_version_is_unsupported() {
    let dir = TempDir::new().unwrap();
    store_with(dir.path(), 10);
    fault_injection::rewrite_log_entry_version(dir.path(), 7, 2);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    match store.load().unwrap_err() {
        StoreError::UnsupportedFormat { found: 2, supported: 1, what } => {
            assert!(what.contains("log entry 7"), "{what}");
        }
        other => panic!("expected UnsupportedFormat, got {other}"),
    }
}

#[test]
fn newer_store_format_is_refused_on_open() {
    let dir = TempDir::new().unwrap();
    store_with(dir.path(), 10);
    fault_injection::set_store_format_version(dir.path(), 5);
    let err = EmbeddedStore::open(dir.path()).err().expect("open must refuse");
    let message = err.to_string();
    assert!(matches!(err, StoreError::UnsupportedFormat { found: 5, supported: 1, .. }), "{message}");
    assert!(message.contains(STORE_FILE_NAME), "{message}");
    assert!(message.contains("version 5") && message.contains("version 1"), "{message}");
}

fn assert_open_fails_naming_file(dir: &Path, case: &str) {
    match EmbeddedStore::open(dir) {
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains(STORE_FILE_NAME), "{case}: {message}");
            eprintln!("{case}: {message}");
        }
        Ok(store) => {
            // redb may accept a damaged file; then nothing may be read back as if it were fine.
            let result = store.load();
            panic!("{case}: open succeeded, load gave {result:?}");
        }
    }
}

#[test]
fn garbage_files_give_a_clear_error() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", snapshot_data(1 << 20, 42)),
        ("a few bytes", b"hello".to_vec()),
        ("a text file", b"[master]\nlisten = \"0.0.0.0:5050\"\n".repeat(100)),
        ("zeros", vec![0; 64 << 10]),
    ];
    for (case, bytes) in cases {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join(STORE_FILE_NAME), bytes).unwrap();
        assert_open_fails_naming_file(dir.path(), case);
    }
}

#[test]
fn truncated_store_file_gives_a_clear_error() {
    let source = TempDir::new().unwrap();
    store_with(source.path(), 5000);
    let full = std::fs::read(source.path().join(STORE_FILE_NAME)).unwrap();
    for keep_bytes in [10, 100, 600, 4096, full.len() / 2] {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join(STORE_FILE_NAME), &full[..keep_bytes]).unwrap();
        assert_open_fails_naming_file(dir.path(), &format!("truncated to {keep_bytes} bytes"));
    }
}

#[test]
fn a_foreign_redb_file_is_refused() {
    // An empty redb database (no tables) becomes a store; one with other tables is refused.
    let dir = TempDir::new().unwrap();
    {
        let db = redb_foreign::create(&dir.path().join(STORE_FILE_NAME));
        drop(db);
    }
    let err = EmbeddedStore::open(dir.path()).err().expect("must refuse");
    assert!(err.to_string().contains("no `meta` table"), "{err}");
}

mod redb_foreign {
    //! Writes a redb file that capstan did not write.
    pub fn create(path: &std::path::Path) -> redb::Database {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("other");
            let mut table = txn.open_table(def).unwrap();
            table.insert(1, 2).unwrap();
        }
        txn.commit().unwrap();
        db
    }
}

/// The store holds every job's environment: readable by its owner only, also when an older
/// version left the file or its directory open to others.
#[test]
fn the_store_file_and_its_directory_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let store_dir = dir.path().join("master");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let store = EmbeddedStore::open(&store_dir).unwrap();
    assert_eq!(mode(&store_dir), 0o700, "a new store directory");
    assert_eq!(mode(&store_dir.join(STORE_FILE_NAME)), 0o600, "a new store file");
    drop(store);
    std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(store_dir.join(STORE_FILE_NAME), std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = EmbeddedStore::open(&store_dir).unwrap();
    assert_eq!(mode(&store_dir), 0o700, "a directory left open is closed again");
    assert_eq!(mode(&store_dir.join(STORE_FILE_NAME)), 0o600, "a file left readable is closed again");
}
