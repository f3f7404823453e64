//! The conformance suite every [`Store`] backend must pass, run by each backend's tests through [`conformance_suite!`](crate::conformance_suite).
//!
//! A backend's test file provides a way to open a fresh store (plus a handle that keeps its
//! storage alive, e.g. a `TempDir`) and a way to reopen the same storage:
//!
//! ```
//! capstan_store::conformance_suite!(
//!     embedded,
//!     fresh = || {
//!         let dir = tempfile::tempdir().unwrap();
//!         (capstan_store::EmbeddedStore::open(dir.path()).unwrap(), dir)
//!     },
//!     reopen = |dir: &tempfile::TempDir| capstan_store::EmbeddedStore::open(dir.path()).unwrap(),
//! );
//! ```
//!
//! That expands to a module `embedded` with one `#[test]` per case below. Every case drops the
//! store before it reopens it (a backend may hold an exclusive lock), and panics on failure.

use std::marker::PhantomData;
use std::sync::Arc;

use crate::{LogEntry, Snapshot, Store, StoreError, SNAPSHOT_CHUNK_BYTES};

/// How the suite opens stores of one backend.
pub trait Harness {
    type Store: Store;
    /// Keeps the storage alive between a store being dropped and reopened.
    type Handle;
    /// Opens a new, empty store.
    fn fresh(&self) -> (Self::Store, Self::Handle);
    /// Opens the storage behind `handle` again (the previous store was dropped).
    fn reopen(&self, handle: &Self::Handle) -> Self::Store;
}

/// A [`Harness`] made of two closures.
pub struct Closures<F, R, S, H> {
    fresh: F,
    reopen: R,
    _types: PhantomData<fn() -> (S, H)>,
}

impl<F, R, S, H> Closures<F, R, S, H>
where
    S: Store,
    F: Fn() -> (S, H),
    R: Fn(&H) -> S,
{
    pub fn new(fresh: F, reopen: R) -> Self {
        Self { fresh, reopen, _types: PhantomData }
    }
}

impl<F, R, S, H> Harness for Closures<F, R, S, H>
where
    S: Store,
    F: Fn() -> (S, H),
    R: Fn(&H) -> S,
{
    type Store = S;
    type Handle = H;
    fn fresh(&self) -> (S, H) {
        (self.fresh)()
    }
    fn reopen(&self, handle: &H) -> S {
        (self.reopen)(handle)
    }
}

/// Generates one `#[test]` per conformance case in a module named `$name`.
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, fresh = $fresh:expr, reopen = $reopen:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn harness() -> impl $crate::conformance::Harness {
                $crate::conformance::Closures::new($fresh, $reopen)
            }

            $crate::conformance_suite!(@cases
                empty_store_loads_empty,
                append_then_load_round_trips,
                empty_append_is_a_no_op,
                append_refuses_a_gap,
                append_refuses_a_repeat,
                append_refuses_a_gap_inside_a_batch,
                many_appends_survive_reopen,
                snapshot_drops_covered_entries,
                snapshot_survives_reopen,
                big_snapshot_round_trips,
                snapshot_sizes_around_chunk_boundaries_round_trip,
                newer_snapshot_replaces_older,
                older_snapshot_is_refused,
                same_index_snapshot_replaces,
                appends_continue_after_snapshot,
                snapshot_beyond_log_drops_whole_log,
                concurrent_appends_never_interleave,
                last_index_correct_after_reopen,
                describe_is_not_empty,
            );
        }
    };
    (@cases $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::$case(&harness());
            }
        )*
    };
}

/// The bytes the suite stores for entry `index`: distinct per index, variable length.
pub fn entry_data(index: u64) -> Vec<u8> {
    let mut data = format!("command {index}:").into_bytes();
    data.extend((0..(index % 50)).map(|i| (i as u8).wrapping_mul(31) ^ (index as u8)));
    data
}

/// Entries `from..=to` with [`entry_data`].
pub fn entries(from: u64, to: u64) -> Vec<LogEntry> {
    (from..=to).map(|index| LogEntry { index, data: entry_data(index) }).collect()
}

/// Snapshot data of `len_bytes` that does not repeat with the chunk size.
pub fn snapshot_data(len_bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len_bytes)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn assert_entries(store: &impl Store, expected_snapshot: Option<&Snapshot>, from: u64, to: u64) {
    let loaded = store.load().expect("load");
    assert_eq!(loaded.snapshot.as_ref().map(|s| s.index), expected_snapshot.map(|s| s.index), "snapshot index");
    if let (Some(got), Some(want)) = (&loaded.snapshot, expected_snapshot) {
        assert!(got.data == want.data, "snapshot data differs");
    }
    let got: Vec<u64> = loaded.entries.iter().map(|e| e.index).collect();
    let want: Vec<u64> = (from..=to).collect();
    assert_eq!(got.len(), want.len(), "number of entries");
    assert!(got == want, "entry indexes: got {:?}..", &got[..got.len().min(10)]);
    for entry in &loaded.entries {
        assert_eq!(entry.data, entry_data(entry.index), "data of entry {}", entry.index);
    }
}

pub fn empty_store_loads_empty(h: &impl Harness) {
    let (store, handle) = h.fresh();
    let loaded = store.load().unwrap();
    assert!(loaded.snapshot.is_none());
    assert!(loaded.entries.is_empty());
    assert_eq!(store.last_index().unwrap(), 0);
    drop(store);
    let store = h.reopen(&handle);
    assert_eq!(store.load().unwrap(), Default::default());
    assert_eq!(store.last_index().unwrap(), 0);
}

pub fn append_then_load_round_trips(h: &impl Harness) {
    let (store, handle) = h.fresh();
    store.append(&entries(1, 1)).unwrap();
    store.append(&entries(2, 10)).unwrap();
    assert_eq!(store.last_index().unwrap(), 10);
    assert_entries(&store, None, 1, 10);
    drop(store);
    let store = h.reopen(&handle);
    assert_entries(&store, None, 1, 10);
    // Empty and large commands round-trip byte for byte.
    let odd = vec![LogEntry { index: 11, data: vec![] }, LogEntry { index: 12, data: vec![0xff; 100_000] }];
    store.append(&odd).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(&loaded.entries[10..], &odd[..]);
}

pub fn empty_append_is_a_no_op(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    store.append(&[]).unwrap();
    assert_eq!(store.last_index().unwrap(), 0);
    store.append(&entries(1, 3)).unwrap();
    store.append(&[]).unwrap();
    assert_eq!(store.last_index().unwrap(), 3);
}

fn assert_out_of_order(result: Result<(), StoreError>, expected: u64, found: u64) {
    match result {
        Err(StoreError::OutOfOrder { expected: e, found: f }) => {
            assert_eq!((e, f), (expected, found), "OutOfOrder fields");
        }
        other => {
            panic!("expected OutOfOrder {{ expected: {expected}, found: {found} }}, got {other:?}")
        }
    }
}

pub fn append_refuses_a_gap(h: &impl Harness) {
    let (store, handle) = h.fresh();
    assert_out_of_order(store.append(&entries(2, 4)), 1, 2);
    assert_out_of_order(store.append(&entries(0, 4)), 1, 0);
    assert_eq!(store.last_index().unwrap(), 0);
    store.append(&entries(1, 5)).unwrap();
    assert_out_of_order(store.append(&entries(7, 9)), 6, 7);
    assert_entries(&store, None, 1, 5);
    drop(store);
    let store = h.reopen(&handle);
    assert_entries(&store, None, 1, 5);
}

pub fn append_refuses_a_repeat(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    store.append(&entries(1, 5)).unwrap();
    assert_out_of_order(store.append(&entries(5, 8)), 6, 5);
    assert_out_of_order(store.append(&entries(1, 1)), 6, 1);
    assert_eq!(store.last_index().unwrap(), 5);
    assert_entries(&store, None, 1, 5);
}

pub fn append_refuses_a_gap_inside_a_batch(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    let mut batch = entries(1, 5);
    batch[3].index = 9; // 1, 2, 3, 9, 5
    assert_out_of_order(store.append(&batch), 4, 9);
    let mut batch = entries(1, 3);
    batch[2].index = 2; // 1, 2, 2
    assert_out_of_order(store.append(&batch), 3, 2);
    assert_eq!(store.last_index().unwrap(), 0);
    assert!(store.load().unwrap().entries.is_empty());
}

pub fn many_appends_survive_reopen(h: &impl Harness) {
    let (store, handle) = h.fresh();
    let mut next = 1;
    for batch_len in (1..=200).map(|i| (i * 7) % 23 + 1) {
        store.append(&entries(next, next + batch_len - 1)).unwrap();
        next += batch_len;
    }
    let last = next - 1;
    assert_eq!(store.last_index().unwrap(), last);
    drop(store);
    let store = h.reopen(&handle);
    assert_eq!(store.last_index().unwrap(), last);
    assert_entries(&store, None, 1, last);
}

pub fn snapshot_drops_covered_entries(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    store.append(&entries(1, 100)).unwrap();
    let snapshot = Snapshot { index: 60, data: snapshot_data(5000, 1) };
    store.install_snapshot(&snapshot).unwrap();
    assert_eq!(store.last_index().unwrap(), 100);
    assert_entries(&store, Some(&snapshot), 61, 100);
}

pub fn snapshot_survives_reopen(h: &impl Harness) {
    let (store, handle) = h.fresh();
    store.append(&entries(1, 30)).unwrap();
    let snapshot = Snapshot { index: 30, data: snapshot_data(100, 2) };
    store.install_snapshot(&snapshot).unwrap();
    assert_entries(&store, Some(&snapshot), 31, 30);
    drop(store);
    let store = h.reopen(&handle);
    assert_eq!(store.last_index().unwrap(), 30);
    assert_entries(&store, Some(&snapshot), 31, 30);
}

pub fn big_snapshot_round_trips(h: &impl Harness) {
    let (store, handle) = h.fresh();
    store.append(&entries(1, 10)).unwrap();
    let snapshot = Snapshot { index: 5, data: snapshot_data(20 << 20, 3) };
    store.install_snapshot(&snapshot).unwrap();
    assert_entries(&store, Some(&snapshot), 6, 10);
    drop(store);
    let store = h.reopen(&handle);
    assert_entries(&store, Some(&snapshot), 6, 10);
}

pub fn snapshot_sizes_around_chunk_boundaries_round_trip(h: &impl Harness) {
    let (store, handle) = h.fresh();
    let sizes =
        [0, 1, SNAPSHOT_CHUNK_BYTES - 1, SNAPSHOT_CHUNK_BYTES, SNAPSHOT_CHUNK_BYTES + 1, 2 * SNAPSHOT_CHUNK_BYTES];
    for (i, size) in sizes.into_iter().enumerate() {
        let index = i as u64 + 1;
        store.append(&entries(index, index)).unwrap();
        let snapshot = Snapshot { index, data: snapshot_data(size, index) };
        store.install_snapshot(&snapshot).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.snapshot.as_ref(), Some(&snapshot), "size {size} bytes");
        assert!(loaded.entries.is_empty());
    }
    drop(store);
    let store = h.reopen(&handle);
    let last = sizes.len() as u64;
    let loaded = store.load().unwrap();
    assert_eq!(loaded.snapshot.map(|s| (s.index, s.data)), Some((last, snapshot_data(2 * SNAPSHOT_CHUNK_BYTES, last))));
}

pub fn newer_snapshot_replaces_older(h: &impl Harness) {
    let (store, handle) = h.fresh();
    store.append(&entries(1, 50)).unwrap();
    let first = Snapshot { index: 10, data: snapshot_data(3 * SNAPSHOT_CHUNK_BYTES, 10) };
    store.install_snapshot(&first).unwrap();
    let second = Snapshot { index: 40, data: snapshot_data(1000, 40) };
    store.install_snapshot(&second).unwrap();
    assert_entries(&store, Some(&second), 41, 50);
    drop(store);
    let store = h.reopen(&handle);
    assert_entries(&store, Some(&second), 41, 50);
}

/// Documented behaviour: an older snapshot is refused with `StaleSnapshot` and changes nothing.
pub fn older_snapshot_is_refused(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    store.append(&entries(1, 50)).unwrap();
    let current = Snapshot { index: 30, data: snapshot_data(100, 30) };
    store.install_snapshot(&current).unwrap();
    let older = Snapshot { index: 20, data: snapshot_data(100, 20) };
    match store.install_snapshot(&older) {
        Err(StoreError::StaleSnapshot { offered: 20, installed: 30 }) => {}
        other => panic!("expected StaleSnapshot {{ offered: 20, installed: 30 }}, got {other:?}"),
    }
    assert_entries(&store, Some(&current), 31, 50);
}

/// Documented behaviour: a snapshot at the installed index replaces it.
pub fn same_index_snapshot_replaces(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    store.append(&entries(1, 20)).unwrap();
    store.install_snapshot(&Snapshot { index: 15, data: snapshot_data(2 * SNAPSHOT_CHUNK_BYTES + 5, 1) }).unwrap();
    let again = Snapshot { index: 15, data: snapshot_data(10, 2) };
    store.install_snapshot(&again).unwrap();
    assert_entries(&store, Some(&again), 16, 20);
}

pub fn appends_continue_after_snapshot(h: &impl Harness) {
    let (store, handle) = h.fresh();
    store.append(&entries(1, 20)).unwrap();
    let snapshot = Snapshot { index: 20, data: snapshot_data(64, 20) };
    store.install_snapshot(&snapshot).unwrap();
    assert_eq!(store.last_index().unwrap(), 20);
    assert_out_of_order(store.append(&entries(1, 3)), 21, 1);
    assert_out_of_order(store.append(&entries(20, 22)), 21, 20);
    store.append(&entries(21, 25)).unwrap();
    assert_entries(&store, Some(&snapshot), 21, 25);
    drop(store);
    let store = h.reopen(&handle);
    store.append(&entries(26, 30)).unwrap();
    assert_eq!(store.last_index().unwrap(), 30);
    assert_entries(&store, Some(&snapshot), 21, 30);
}

/// Documented behaviour: a snapshot past the end of the log (a restore) drops the whole log and
/// the log continues after it.
pub fn snapshot_beyond_log_drops_whole_log(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    store.append(&entries(1, 5)).unwrap();
    let snapshot = Snapshot { index: 1000, data: snapshot_data(10, 1000) };
    store.install_snapshot(&snapshot).unwrap();
    assert_eq!(store.last_index().unwrap(), 1000);
    assert_out_of_order(store.append(&entries(6, 6)), 1001, 6);
    store.append(&entries(1001, 1002)).unwrap();
    assert_entries(&store, Some(&snapshot), 1001, 1002);
}

pub fn concurrent_appends_never_interleave(h: &impl Harness) {
    const BATCHES_PER_THREAD: u64 = 40;
    const BATCH_LEN: u64 = 25;
    let (store, _handle) = h.fresh();
    let store = Arc::new(store);
    let threads: Vec<_> = (0..2u8)
        .map(|thread| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut batch_no = 0u64;
                let mut refusals = 0u64;
                while batch_no < BATCHES_PER_THREAD {
                    let start = store.last_index().unwrap() + 1;
                    let batch: Vec<LogEntry> = (0..BATCH_LEN)
                        .map(|pos| LogEntry {
                            index: start + pos,
                            data: format!("{thread}/{batch_no}/{pos}").into_bytes(),
                        })
                        .collect();
                    match store.append(&batch) {
                        Ok(()) => batch_no += 1,
                        Err(StoreError::OutOfOrder { .. }) => refusals += 1,
                        Err(other) => panic!("append failed: {other}"),
                    }
                    assert!(refusals < 100_000, "thread {thread} never got a turn");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let loaded = store.load().unwrap();
    assert_eq!(loaded.entries.len() as u64, 2 * BATCHES_PER_THREAD * BATCH_LEN);
    let mut seen = std::collections::HashSet::new();
    for (i, batch) in loaded.entries.chunks(BATCH_LEN as usize).enumerate() {
        let first = String::from_utf8(batch[0].data.clone()).unwrap();
        let (owner, rest) = first.split_once('/').unwrap();
        let batch_no = rest.split_once('/').unwrap().0;
        for (pos, entry) in batch.iter().enumerate() {
            assert_eq!(entry.index, i as u64 * BATCH_LEN + pos as u64 + 1);
            assert_eq!(
                String::from_utf8(entry.data.clone()).unwrap(),
                format!("{owner}/{batch_no}/{pos}"),
                "batch starting at {} is interleaved",
                batch[0].index
            );
        }
        assert!(seen.insert(first), "batch stored twice");
    }
}

pub fn last_index_correct_after_reopen(h: &impl Harness) {
    let (store, handle) = h.fresh();
    store.append(&entries(1, 7)).unwrap();
    drop(store);
    let store = h.reopen(&handle);
    assert_eq!(store.last_index().unwrap(), 7);
    store.install_snapshot(&Snapshot { index: 7, data: vec![1, 2, 3] }).unwrap();
    drop(store);
    let store = h.reopen(&handle);
    assert_eq!(store.last_index().unwrap(), 7, "after a snapshot covering the whole log");
    store.append(&entries(8, 9)).unwrap();
    drop(store);
    let store = h.reopen(&handle);
    assert_eq!(store.last_index().unwrap(), 9);
}

pub fn describe_is_not_empty(h: &impl Harness) {
    let (store, _handle) = h.fresh();
    assert!(!store.describe().trim().is_empty());
}
