//! Tests of the etcd store against a real etcd child process: the shared conformance suite plus limits, etcd crashes, fencing, damaged records and compaction.
//!
//! One etcd serves most tests of this binary (each case under its own key prefix); the tests that
//! kill etcd or measure its database start their own. Without an `etcd` binary the tests print a
//! loud message and pass, except with `CI=true`, where they fail.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use capstan_store::conformance::{entries, entry_data, snapshot_data};
use capstan_store::envelope;
use capstan_store::{
    etcd_missing, EmbeddedStore, EtcdConfig, EtcdProcess, EtcdStore, Fence, LogEntry, LogWatchEvent, Snapshot, Store,
    StoreError, ETCD_ENTRY_BYTES_MAX,
};
use etcd_client::GetOptions;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Harness

/// False (after a loud message) when etcd is missing; panics instead under `CI=true`.
fn etcd_available() -> bool {
    let Some(reason) = etcd_missing() else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("etcd is required under CI=true: {reason}");
    }
    // Straight to stderr (not eprintln!, which the test harness captures), once per binary.
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        let message = format!(
            "\n!!!!!!!!!! SKIPPING the etcd store tests: {reason} !!!!!!!!!!\n\
             !!!!!!!!!! (the conformance cases run against the embedded store instead; CI=true makes this fail) !!!!!!!!!!\n\n"
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
    }
    false
}

/// The etcd shared by this test binary; killed (and its data removed) when the binary exits.
fn shared_etcd() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    static PROCESS: Mutex<Option<(EtcdProcess, TempDir)>> = Mutex::new(None);
    extern "C" fn stop_shared_etcd() {
        if let Ok(mut guard) = PROCESS.lock() {
            drop(guard.take()); // SIGKILL, then remove the data directory
        }
    }
    ENDPOINT.get_or_init(|| {
        let dir = TempDir::new().unwrap();
        let process = EtcdProcess::start(&dir.path().join("etcd")).unwrap();
        let endpoint = process.endpoint();
        *PROCESS.lock().unwrap() = Some((process, dir));
        // SAFETY: registers a plain extern "C" function to run at exit.
        unsafe {
            libc::atexit(stop_shared_etcd);
        }
        endpoint
    })
}

/// A prefix no other case of this run uses.
fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("/capstan-test/{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn config(endpoint: &str, prefix: &str) -> EtcdConfig {
    let mut config = EtcdConfig::new(vec![endpoint.to_string()]);
    config.prefix = prefix.to_string();
    config
}

fn connect(endpoint: &str, prefix: &str) -> EtcdStore {
    EtcdStore::connect(config(endpoint, prefix)).unwrap()
}

/// A store on the shared etcd under a fresh prefix.
fn fresh(name: &str) -> (EtcdStore, String) {
    let prefix = unique_prefix(name);
    (connect(shared_etcd(), &prefix), prefix)
}

/// What the conformance harness keeps between a store and its reopening.
enum Handle {
    Etcd(String),
    Embedded(TempDir),
}

capstan_store::conformance_suite!(
    etcd_conformance,
    fresh = || -> (Arc<dyn Store>, Handle) {
        if etcd_available() {
            let (store, prefix) = fresh("conformance");
            (Arc::new(store), Handle::Etcd(prefix))
        } else {
            let dir = TempDir::new().unwrap();
            (Arc::new(EmbeddedStore::open(dir.path()).unwrap()), Handle::Embedded(dir))
        }
    },
    reopen = |handle: &Handle| -> Arc<dyn Store> {
        match handle {
            Handle::Etcd(prefix) => Arc::new(connect(shared_etcd(), prefix)),
            Handle::Embedded(dir) => Arc::new(EmbeddedStore::open(dir.path()).unwrap()),
        }
    },
);

/// Raw access to etcd beside the store.
struct Raw {
    client: etcd_client::Client,
    runtime: tokio::runtime::Handle,
}

impl Raw {
    fn of(store: &EtcdStore) -> Raw {
        Raw { client: store.client(), runtime: store.runtime() }
    }

    /// Every (key, value) under `prefix`.
    fn all(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut client = self.client.clone();
        let response =
            self.runtime.block_on(client.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only()))).unwrap();
        let keys: Vec<String> =
            response.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect();
        keys.into_iter().map(|key| (key.clone(), self.get(&key).unwrap())).collect()
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.all(prefix).into_iter().map(|(key, _)| key).collect()
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut client = self.client.clone();
        let response = self.runtime.block_on(client.get(key, None)).unwrap();
        response.kvs().first().map(|kv| kv.value().to_vec())
    }

    /// Puts `value` and returns the key's create revision.
    fn put(&self, key: &str, value: Vec<u8>) -> i64 {
        let mut client = self.client.clone();
        self.runtime.block_on(client.put(key, value, None)).unwrap();
        let response = self.runtime.block_on(client.get(key, None)).unwrap();
        response.kvs()[0].create_revision()
    }

    fn delete(&self, key: &str) {
        let mut client = self.client.clone();
        self.runtime.block_on(client.delete(key, None)).unwrap();
    }

    fn db_size_bytes(&self) -> i64 {
        let mut client = self.client.clone();
        self.runtime.block_on(client.status()).unwrap().db_size()
    }
}

fn log_keys(raw: &Raw, prefix: &str) -> Vec<String> {
    raw.keys(&format!("{prefix}/store/log/"))
}

// ---------------------------------------------------------------------------------------------
// Limits and layout

#[test]
fn batch_bigger_than_one_etcd_request_round_trips() {
    if !etcd_available() {
        return;
    }
    let (store, prefix) = fresh("big-batch");
    let raw = Raw::of(&store);
    store.append(&entries(1, 3)).unwrap();
    // 6 MiB in one batch: four etcd requests at least, visible as one.
    let big: Vec<LogEntry> = (4..=67).map(|index| LogEntry { index, data: snapshot_data(100_000, index) }).collect();
    store.append(&big).unwrap();
    // One part for 1..=3, at least six for the 6 MiB batch.
    let parts = log_keys(&raw, &prefix);
    assert!(parts.len() >= 7, "parts: {parts:?}");
    // The largest single command fits; one byte more is refused and nothing is written.
    let largest = LogEntry { index: 68, data: snapshot_data(ETCD_ENTRY_BYTES_MAX, 68) };
    store.append(std::slice::from_ref(&largest)).unwrap();
    let too_big = LogEntry { index: 69, data: vec![1; ETCD_ENTRY_BYTES_MAX + 1] };
    let message = store.append(&[too_big]).unwrap_err().to_string();
    assert!(message.contains("index 69") && message.contains("at most"), "{message}");
    assert_eq!(store.last_index().unwrap(), 68);

    drop(store);
    let store = connect(shared_etcd(), &prefix);
    let loaded = store.load().unwrap();
    assert_eq!(loaded.entries.len(), 68);
    assert_eq!(&loaded.entries[..3], &entries(1, 3)[..]);
    assert!(loaded.entries[3..67] == big[..], "the big batch differs");
    assert!(loaded.entries[67] == largest, "the largest command differs");
}

#[test]
fn keys_stay_under_prefix_store() {
    if !etcd_available() {
        return;
    }
    let (store, prefix) = fresh("layout");
    let raw = Raw::of(&store);
    store.append(&entries(1, 10)).unwrap();
    store.install_snapshot(&Snapshot { index: 5, data: snapshot_data(3 << 20, 5) }).unwrap();
    store.append(&entries(11, 12)).unwrap();
    let keys = raw.keys(&format!("{prefix}/"));
    assert!(keys.iter().all(|k| k.starts_with(&format!("{prefix}/store/"))), "{keys:?}");
    // Meta records, one straddling log part (1..=10 holds 6..=10), the new part, 3 chunks.
    assert_eq!(keys.len(), 3 + 2 + 3, "{keys:?}");
    assert!(store.describe().contains(&prefix), "{}", store.describe());
}

#[test]
fn a_cut_short_batch_stays_invisible_and_is_replaced() {
    if !etcd_available() {
        return;
    }
    let (store, prefix) = fresh("cut-short");
    let raw = Raw::of(&store);
    store.append(&entries(1, 5)).unwrap();
    // What a batch cut short after its first request leaves: a part beyond `last`.
    let mut payload = 1u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&3u32.to_le_bytes());
    payload.extend_from_slice(b"old");
    let orphan = format!("{prefix}/store/log/{:020}-{:020}", 6, 6);
    raw.put(&orphan, envelope::encode(1, &payload));
    assert_eq!(store.load().unwrap().entries.len(), 5);
    assert_eq!(store.last_index().unwrap(), 5);
    store.append(&entries(6, 9)).unwrap();
    assert!(raw.get(&orphan).is_none(), "the orphan part was not deleted");
    assert_eq!(store.load().unwrap().entries, entries(1, 9));
}

// ---------------------------------------------------------------------------------------------
// Threads and runtimes

#[test]
fn works_from_inside_a_tokio_runtime_and_drops_there() {
    if !etcd_available() {
        return;
    }
    let prefix = unique_prefix("in-runtime");
    let endpoint = shared_etcd().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let store = EtcdStore::connect(config(&endpoint, &prefix)).unwrap();
        store.append(&entries(1, 4)).unwrap();
        assert_eq!(store.load().unwrap().entries, entries(1, 4));
        tokio::task::yield_now().await;
        drop(store); // must not panic inside a runtime
    });
}

#[test]
fn unreachable_etcd_is_unavailable_in_time() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut config = EtcdConfig::new(vec![format!("http://127.0.0.1:{port}")]);
    config.dial_timeout = Duration::from_millis(300);
    config.request_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let error = EtcdStore::connect(config).err().expect("nothing listens there");
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
    assert!(error.to_string().contains(&port.to_string()), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// etcd crashes

#[test]
fn kill9_etcd_during_appends_loses_nothing_acknowledged() {
    if !etcd_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let mut etcd = EtcdProcess::start(&dir.path().join("etcd")).unwrap();
    let mut config = config(&etcd.endpoint(), "/capstan");
    config.request_timeout = Duration::from_millis(1000);
    let store = Arc::new(EtcdStore::connect(config).unwrap());
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let appender = {
        let (store, acked, stop, errors) = (store.clone(), acked.clone(), stop.clone(), errors.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let next = match store.last_index() {
                    Ok(last) => last + 1,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let batch_len = round % 13 + 1;
                match store.append(&entries(next, next + batch_len - 1)) {
                    Ok(()) => acked.store(next + batch_len - 1, Ordering::SeqCst),
                    Err(StoreError::Unavailable { .. }) | Err(StoreError::OutOfOrder { .. }) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(other) => panic!("append failed: {other}"),
                }
            }
        })
    };
    let wait_for = |at_least: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.load(Ordering::SeqCst) < at_least {
            assert!(Instant::now() < deadline, "{what}: acknowledged only {}", acked.load(Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for kill in 0..2 {
        wait_for(acked.load(Ordering::SeqCst) + 100, "before the kill");
        let errors_before = errors.load(Ordering::SeqCst);
        etcd.kill9();
        let acked_at_kill = acked.load(Ordering::SeqCst);
        // Down until the appender has seen it fail, not for a guessed while.
        let deadline = Instant::now() + Duration::from_secs(30);
        while errors.load(Ordering::SeqCst) == errors_before {
            assert!(Instant::now() < deadline, "no append failed after etcd was killed");
            std::thread::sleep(Duration::from_millis(5));
        }
        etcd.restart().unwrap();
        let restarted = Instant::now();
        wait_for(acked_at_kill + 100, "after the restart");
        eprintln!(
            "kill {kill}: {acked_at_kill} acknowledged at the kill; appending again {:?} after the restart",
            restarted.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    appender.join().unwrap();
    let acked = acked.load(Ordering::SeqCst);
    assert!(errors.load(Ordering::Relaxed) > 0, "no append failed while etcd was down");

    // A fresh store and the one that lived through the kills agree: nothing acknowledged is lost.
    for store in [store.clone(), Arc::new(connect(&etcd.endpoint(), "/capstan"))] {
        let loaded = store.load().unwrap();
        let last = store.last_index().unwrap();
        assert!(last >= acked, "acknowledged {acked}, store has {last}");
        assert_eq!(loaded.entries.len() as u64, last);
        for (i, entry) in loaded.entries.iter().enumerate() {
            assert_eq!(entry.index, i as u64 + 1);
            assert_eq!(entry.data, entry_data(entry.index), "data of entry {}", entry.index);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fencing

#[test]
fn fenced_store_refuses_writes_after_the_fence_key_goes_and_writes_nothing() {
    if !etcd_available() {
        return;
    }
    let (store, prefix) = fresh("fence");
    let raw = Raw::of(&store);
    let fence_key = format!("{prefix}/election/leader");
    let revision = raw.put(&fence_key, b"master-1".to_vec());
    store.set_fence(Some(Fence { key: fence_key.clone().into_bytes(), create_revision: revision }));
    store.append(&entries(1, 10)).unwrap();
    store.install_snapshot(&Snapshot { index: 4, data: snapshot_data(2 << 20, 4) }).unwrap();
    store.append(&entries(11, 12)).unwrap();
    let before = raw.all(&format!("{prefix}/store/"));

    let assert_fenced = |store: &EtcdStore, case: &str| {
        for (what, result) in [
            ("append", store.append(&entries(13, 20))),
            (
                "big append",
                store.append(&[
                    LogEntry { index: 13, data: vec![7; 900_000] },
                    LogEntry { index: 14, data: vec![8; 900_000] },
                ]),
            ),
            ("snapshot", store.install_snapshot(&Snapshot { index: 12, data: snapshot_data(3 << 20, 12) })),
        ] {
            match result {
                Err(StoreError::Fenced { detail }) => assert!(detail.contains(&fence_key), "{case} {what}: {detail}"),
                other => panic!("{case} {what}: expected Fenced, got {other:?}"),
            }
        }
        assert!(raw.all(&format!("{prefix}/store/")) == before, "{case}: a fenced write changed the store");
    };

    raw.delete(&fence_key);
    assert_fenced(&store, "fence key deleted");
    let new_revision = raw.put(&fence_key, b"master-2".to_vec());
    assert_ne!(new_revision, revision);
    assert_fenced(&store, "fence key recreated");

    // The new leader, fenced on the new key, writes; reads never needed the fence.
    let loaded = store.load().unwrap();
    assert_eq!((loaded.snapshot.map(|s| s.index), loaded.entries.len()), (Some(4), 8));
    let leader = connect(shared_etcd(), &prefix);
    leader.set_fence(Some(Fence { key: fence_key.clone().into_bytes(), create_revision: new_revision }));
    leader.append(&entries(13, 14)).unwrap();
    leader.install_snapshot(&Snapshot { index: 14, data: vec![1, 2, 3] }).unwrap();
    // Without a fence, writes are unconditional.
    store.set_fence(None);
    store.append(&entries(15, 15)).unwrap();
    assert_eq!(leader.last_index().unwrap(), 15);
}

// ---------------------------------------------------------------------------------------------
// Damaged and newer records

#[test]
fn garbage_under_a_log_key_is_corrupt_naming_the_key() {
    if !etcd_available() {
        return;
    }
    let (store, prefix) = fresh("garbage");
    let raw = Raw::of(&store);
    for from in (1..=40).step_by(10) {
        store.append(&entries(from, from + 9)).unwrap();
    }
    let key = format!("{prefix}/store/log/{:020}-{:020}", 21, 30);
    let mut record = raw.get(&key).expect("the part exists");
    let at = record.len() - 1;
    record[at] ^= 0x40;
    raw.put(&key, record);
    let error = store.load().unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{message}");
    assert!(message.contains(&key) && message.contains("checksum"), "{message}");

    raw.put(&key, b"not an envelope at all".to_vec());
    let message = store.load().unwrap_err().to_string();
    assert!(message.contains(&key) && message.contains("magic"), "{message}");
    let message = store.entries_after(25).unwrap_err().to_string();
    assert!(message.contains(&key), "{message}");
    // Entries before the damaged part can still be read.
    assert_eq!(store.entries_after(30).unwrap(), entries(31, 40));

    // A missing part is named too.
    raw.delete(&key);
    let message = store.load().unwrap_err().to_string();
    assert!(message.contains("21..30") || message.contains("21.."), "{message}");
}

#[test]
fn future_envelope_version_is_refused_naming_both_versions() {
    if !etcd_available() {
        return;
    }
    let (store, prefix) = fresh("future");
    let raw = Raw::of(&store);
    store.append(&entries(1, 10)).unwrap();
    let key = format!("{prefix}/store/log/{:020}-{:020}", 1, 10);
    let record = raw.get(&key).unwrap();
    raw.put(&key, envelope::encode(2, &record[envelope::HEADER_BYTES..]));
    let error = store.load().unwrap_err();
    let message = error.to_string();
    match error {
        StoreError::UnsupportedFormat { found: 2, supported: 1, what } => assert!(what.contains(&key), "{what}"),
        other => panic!("expected UnsupportedFormat, got {other}"),
    }
    assert!(message.contains("version 2") && message.contains("version 1"), "{message}");

    // A newer store layout is refused when connecting.
    let format_key = format!("{prefix}/store/format");
    raw.put(&format_key, envelope::encode(1, &7u32.to_le_bytes()));
    drop(store);
    let error = EtcdStore::connect(config(shared_etcd(), &prefix)).err().expect("connect must refuse");
    let message = error.to_string();
    assert!(matches!(error, StoreError::UnsupportedFormat { found: 7, supported: 1, .. }), "{message}");
    assert!(message.contains(&format_key) && message.contains("version 7"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Snapshots and compaction

#[test]
fn big_snapshots_round_trip_and_compaction_bounds_the_database() {
    if !etcd_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let etcd = EtcdProcess::start(&dir.path().join("etcd")).unwrap();
    let store = connect(&etcd.endpoint(), "/capstan");
    let raw = Raw::of(&store);
    store.append(&entries(1, 10)).unwrap();
    let big = Snapshot { index: 10, data: snapshot_data(20 << 20, 10) };
    store.install_snapshot(&big).unwrap();
    let loaded = connect(&etcd.endpoint(), "/capstan").load().unwrap();
    assert!(loaded.snapshot.as_ref() == Some(&big), "the 20 MiB snapshot differs");
    let after_big = raw.db_size_bytes();

    // 20 more snapshots of 8 MiB: 160 MiB written. Without compaction the database would hold all of it.
    let mut sizes = Vec::new();
    for round in 0..20u64 {
        let index = 11 + round;
        store.append(&entries(index, index)).unwrap();
        store.install_snapshot(&Snapshot { index, data: snapshot_data(8 << 20, index) }).unwrap();
        sizes.push(raw.db_size_bytes());
    }
    eprintln!("db size after the 20 MiB snapshot: {after_big}; after each 8 MiB snapshot: {sizes:?}");
    let last = *sizes.last().unwrap();
    assert!(last < 100 << 20, "etcd's database grew to {last} bytes over 180 MiB of snapshots");
    assert!(last <= sizes[4] + (16 << 20), "the database keeps growing: {sizes:?}");
    let loaded = store.load().unwrap();
    assert_eq!(loaded.snapshot.map(|s| (s.index, s.data.len())), Some((30, 8 << 20)));
    assert_eq!(raw.keys("/capstan/store/chunks/").len(), 8, "old chunk sets were not deleted");
}

// ---------------------------------------------------------------------------------------------
// Following the log

#[test]
fn entries_after_and_watch_log_follow_appends() {
    if !etcd_available() {
        return;
    }
    let (store, _prefix) = fresh("watch");
    store.append(&entries(1, 5)).unwrap();
    assert_eq!(store.entries_after(2).unwrap(), entries(3, 5));
    assert_eq!(store.entries_after(5).unwrap(), vec![]);

    let watch = store.watch_log(3);
    let mut seen = Vec::new();
    let receive_until = |last: u64, seen: &mut Vec<LogEntry>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.last().map_or(0, |e| e.index) < last {
            assert!(Instant::now() < deadline, "watch saw only {:?}", seen.last().map(|e| e.index));
            match watch.recv_timeout(Duration::from_millis(100)).unwrap() {
                Some(LogWatchEvent::Entries(batch)) => seen.extend(batch),
                Some(other) => panic!("unexpected {other:?}"),
                None => {}
            }
        }
    };
    receive_until(5, &mut seen);
    store.append(&entries(6, 8)).unwrap();
    store.append(&entries(9, 9)).unwrap();
    receive_until(9, &mut seen);
    assert_eq!(seen, entries(4, 9));

    // A snapshot covering entries the watcher has not seen is reported as such.
    drop(watch);
    store.install_snapshot(&Snapshot { index: 7, data: vec![7] }).unwrap();
    let watch = store.watch_log(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no SnapshotInstalled");
        match watch.recv_timeout(Duration::from_millis(100)).unwrap() {
            Some(LogWatchEvent::SnapshotInstalled { index: 7 }) => break,
            Some(LogWatchEvent::Entries(_)) | None => {}
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    let message = store.entries_after(3).unwrap_err().to_string();
    assert!(message.contains("snapshot at index 7"), "{message}");
    assert_eq!(store.entries_after(7).unwrap(), entries(8, 9));
}
