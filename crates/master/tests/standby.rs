//! A follower's standby copy against a real etcd: it follows appends, reloads when a snapshot
//! covers what it has not seen, and what a new leader takes from it always equals a full load of
//! the store at the same moment.

use capstan_master::core::load_state;
use capstan_master::standby::Standby;
use capstan_model::Timestamp;
use capstan_state::{encode_command, encode_snapshot, ClusterState, Command, Stamped};
use capstan_store::{EtcdConfig, EtcdProcess, EtcdStore, LogEntry, Snapshot, Store};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn entry(index: u64) -> LogEntry {
    // Every command begins a term one above the last: valid in order, refused out of order.
    let stamped = Stamped { at: Timestamp(index), command: Command::BeginTerm { epoch: index } };
    LogEntry { index, data: encode_command(&stamped) }
}

fn append(store: &EtcdStore, from: u64, to: u64) {
    store.append(&(from..=to).map(entry).collect::<Vec<_>>()).unwrap();
}

fn wait_index(index: &AtomicU64, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while index.load(Ordering::SeqCst) != want {
        assert!(Instant::now() < deadline, "the standby copy stays at {} (want {want})", index.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn same(a: &ClusterState, b: &ClusterState) {
    assert_eq!(a.index, b.index);
    assert_eq!(encode_snapshot(a), encode_snapshot(b), "the copy differs from a load of the store");
}

#[test]
fn the_standby_copy_follows_the_log_and_equals_a_load_when_taken() {
    if !capstan_store::etcd_or_skip("the_standby_copy_follows_the_log_and_equals_a_load_when_taken") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdProcess::start(&dir.path().join("etcd")).unwrap();
    let store = Arc::new(EtcdStore::connect(EtcdConfig::from_url(&etcd.url()).unwrap()).unwrap());
    append(&store, 1, 50);

    // Loaded, then following appends.
    let index = Arc::new(AtomicU64::new(0));
    let standby = Standby::start(store.clone(), index.clone());
    wait_index(&index, 50);
    append(&store, 51, 80);
    append(&store, 81, 81);
    wait_index(&index, 81);
    // Taken right after more appends it may not have seen: caught up, equal to a load.
    append(&store, 82, 90);
    let taken = standby.take_caught_up(&store).unwrap();
    same(&taken, &load_state(store.as_ref()).unwrap());
    assert_eq!((taken.index, taken.epoch), (90, 90));

    // A snapshot that covers entries the copy has not seen: it loads again.
    let standby = Standby::start(store.clone(), index.clone());
    wait_index(&index, 90);
    let mut ahead = load_state(store.as_ref()).unwrap();
    for i in 91..=120 {
        capstan_master::core::apply_entry(&mut ahead, &entry(i), store.as_ref()).unwrap();
    }
    store.install_snapshot(&Snapshot { index: 120, data: encode_snapshot(&ahead) }).unwrap();
    wait_index(&index, 120);
    append(&store, 121, 125);
    wait_index(&index, 125);
    let taken = standby.take_caught_up(&store).unwrap();
    same(&taken, &load_state(store.as_ref()).unwrap());
    assert_eq!(taken.epoch, 125);
}
