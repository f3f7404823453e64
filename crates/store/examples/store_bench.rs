//! Micro-benchmark of the embedded store: append 1M small entries in batches, install and load a 100 MiB snapshot, reopen after a crash.
//!
//! Run: `cargo run --release -p capstan-store --example store_bench [DIR]`
//! (DIR defaults to a temporary directory; use a directory on the disk you care about).
//! Prints figures only; it asserts nothing about time.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use capstan_store::{EmbeddedConfig, EmbeddedStore, LogEntry, Snapshot, Store};

const ENTRIES: u64 = 1_000_000;
const BATCH_LEN: u64 = 1_000;
const ENTRY_BYTES: usize = 60;
const SNAPSHOT_BYTES: usize = 100 << 20;
const SNAPSHOT_INDEX: u64 = ENTRIES / 2;

fn config(quick_repair: bool) -> EmbeddedConfig {
    EmbeddedConfig { quick_repair, ..EmbeddedConfig::default() }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("crash-child") {
        crash_child(Path::new(&args[2]), args[3] == "true");
        return;
    }
    let base = match args.get(1) {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    for quick_repair in [true, false] {
        let dir = base.path().join(format!("quick_repair_{quick_repair}"));
        run(&dir, quick_repair);
    }
}

fn run(dir: &Path, quick_repair: bool) {
    println!("== quick_repair = {quick_repair} ({})", dir.display());
    let store = EmbeddedStore::open_with(dir, config(quick_repair)).unwrap();
    let data = vec![0xabu8; ENTRY_BYTES];
    let started = Instant::now();
    let mut next = 1;
    while next <= ENTRIES {
        let batch: Vec<LogEntry> =
            (next..next + BATCH_LEN).map(|index| LogEntry { index, data: data.clone() }).collect();
        store.append(&batch).unwrap();
        next += BATCH_LEN;
    }
    let append_ms = started.elapsed().as_millis();
    println!(
        "append {ENTRIES} entries of {ENTRY_BYTES} bytes in batches of {BATCH_LEN}: {append_ms} ms \
         ({:.0} entries/s, {:.0} commits/s)",
        ENTRIES as f64 / started.elapsed().as_secs_f64(),
        (ENTRIES / BATCH_LEN) as f64 / started.elapsed().as_secs_f64()
    );

    let snapshot_data: Vec<u8> = (0..SNAPSHOT_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    let started = Instant::now();
    store.install_snapshot(&Snapshot { index: SNAPSHOT_INDEX, data: snapshot_data }).unwrap();
    println!(
        "install a {} MiB snapshot at index {SNAPSHOT_INDEX} (drops {SNAPSHOT_INDEX} entries): {} ms",
        SNAPSHOT_BYTES >> 20,
        started.elapsed().as_millis()
    );
    let started = Instant::now();
    let loaded = store.load().unwrap();
    println!("load snapshot + {} entries: {} ms", loaded.entries.len(), started.elapsed().as_millis());
    drop(loaded);
    drop(store);

    // A clean reopen, then a reopen after a crash (the child appends one batch and aborts).
    let started = Instant::now();
    let store = EmbeddedStore::open_with(dir, config(quick_repair)).unwrap();
    println!("reopen after clean close: {} ms", started.elapsed().as_millis());
    drop(store);
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["crash-child", dir.to_str().unwrap(), &quick_repair.to_string()])
        .status()
        .unwrap();
    assert!(!status.success(), "the crash child should have aborted");
    let file_bytes = std::fs::metadata(dir.join(capstan_store::STORE_FILE_NAME)).unwrap().len();
    let started = Instant::now();
    let store = EmbeddedStore::open_with(dir, config(quick_repair)).unwrap();
    let reopen_ms = started.elapsed().as_millis();
    let loaded = store.load().unwrap();
    println!(
        "reopen after crash ({} MiB file): {reopen_ms} ms, then load: {} ms total, last index {}",
        file_bytes >> 20,
        started.elapsed().as_millis(),
        loaded.entries.last().map_or(0, |e| e.index)
    );
}

fn crash_child(dir: &Path, quick_repair: bool) {
    let store = EmbeddedStore::open_with(dir, config(quick_repair)).unwrap();
    let next = store.last_index().unwrap() + 1;
    let batch: Vec<LogEntry> =
        (next..next + BATCH_LEN).map(|index| LogEntry { index, data: vec![1; ENTRY_BYTES] }).collect();
    store.append(&batch).unwrap();
    std::process::abort(); // no clean close: the file is left as after a crash
}
