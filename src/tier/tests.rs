//! The tier's promises, against a memory store that counts and can hold back its reads.

use std::sync::atomic::AtomicUsize;

use tokio::sync::Semaphore;

use super::*;
use crate::store::memory::MemoryStore;
use crate::store::test_utils::Layer;

/// A memory store that counts reads and lets a test hold them back.
#[derive(Default)]
struct Probe {
    inner: MemoryStore,
    gets: AtomicUsize,
    revalidations: AtomicUsize,
    /// While set, reads wait for a permit.
    gate: Option<Arc<Semaphore>>,
    /// While set, writes wait for a permit before they reach the store.
    put_gate: Option<Arc<Semaphore>>,
}

impl Probe {
    async fn wait_gate(&self) {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate").forget();
        }
    }
}

#[async_trait]
impl Layer for Probe {
    fn inner(&self) -> &MemoryStore {
        &self.inner
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        // Read first, then wait: a held read carries what was stored when it started.
        let read = self.inner.get(key).await;
        self.gets.fetch_add(1, Relaxed);
        self.wait_gate().await;
        read
    }
    async fn get_if_changed(
        &self,
        key: &[u8],
        version: &Version,
    ) -> Result<Revalidated, StoreError> {
        self.revalidations.fetch_add(1, Relaxed);
        self.wait_gate().await;
        self.inner.get_if_changed(key, version).await
    }
    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        if let Some(gate) = &self.put_gate {
            gate.acquire().await.expect("gate").forget();
        }
        self.inner.put(entry, mode).await
    }
}

const WINDOW: Duration = Duration::from_secs(1);

fn tier(probe: Arc<Probe>, ram_bytes: u64, window: Duration) -> Tiered {
    let config = TierConfig {
        ram_bytes,
        revalidate_after: window,
        longest: window,
        stream_above: usize::MAX,
    };
    Tiered::new(probe, config, Arc::new(Stats::default()))
}

fn entry(key: &str, value: &str) -> Entry {
    Entry {
        key: Bytes::from(key.to_owned()),
        value: Bytes::from(value.to_owned()),
        cas: 1,
        ..Entry::default()
    }
}

fn value_of(read: Option<Versioned>) -> Option<String> {
    read.map(|v| String::from_utf8(v.entry.value.to_vec()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_write_is_served_from_ram_until_the_window_ends() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 1 << 20, WINDOW);
    t.put(&entry("k", "v1"), PutMode::Overwrite).await.unwrap();
    for _ in 0..10 {
        assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("v1"));
    }
    assert_eq!(
        probe.gets.load(Relaxed),
        0,
        "no backend read inside the window"
    );
    assert_eq!(probe.revalidations.load(Relaxed), 0);
    assert_eq!(t.stats.tier_hits.load(Relaxed), 10);

    tokio::time::advance(WINDOW).await;
    assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("v1"));
    assert_eq!(
        probe.revalidations.load(Relaxed),
        1,
        "one conditional read after it"
    );
    assert_eq!(t.stats.tier_revalidated_unchanged.load(Relaxed), 1);
    // The revalidation renewed the entry: the next read is free again.
    t.get(b"k").await.unwrap();
    assert_eq!(probe.revalidations.load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn another_writer_is_seen_after_one_window() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 1 << 20, WINDOW);
    t.put(&entry("k", "mine"), PutMode::Overwrite)
        .await
        .unwrap();
    // Another replica writes straight to the shared store.
    probe
        .inner
        .put(&entry("k", "theirs"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        value_of(t.get(b"k").await.unwrap()).as_deref(),
        Some("mine")
    );
    tokio::time::advance(WINDOW).await;
    assert_eq!(
        value_of(t.get(b"k").await.unwrap()).as_deref(),
        Some("theirs")
    );
    // And a delete elsewhere is seen the same way.
    probe.inner.delete(b"k", None).await.unwrap();
    tokio::time::advance(WINDOW).await;
    assert_eq!(t.get(b"k").await.unwrap(), None);
    assert_eq!(
        t.peek_fresh(b"k"),
        Some(None),
        "the item left RAM, its miss is kept"
    );
}

#[tokio::test(start_paused = true)]
async fn a_miss_is_remembered_for_the_window() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 1 << 20, WINDOW);
    for _ in 0..1000 {
        assert_eq!(t.get(b"absent").await.unwrap(), None);
    }
    assert_eq!(
        probe.gets.load(Relaxed),
        1,
        "1,000 misses, one backend read"
    );
    assert_eq!(t.stats.tier_miss_hits.load(Relaxed), 999);
    // Past the window the store is asked again, and finds what another replica wrote.
    probe
        .inner
        .put(&entry("absent", "theirs"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(t.get(b"absent").await.unwrap(), None, "within the window");
    tokio::time::advance(WINDOW).await;
    assert_eq!(
        value_of(t.get(b"absent").await.unwrap()).as_deref(),
        Some("theirs")
    );
    assert_eq!(probe.gets.load(Relaxed), 2);
    // A write through this replica replaces a remembered miss at once.
    t.get(b"other").await.unwrap();
    t.put(&entry("other", "mine"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        value_of(t.get(b"other").await.unwrap()).as_deref(),
        Some("mine")
    );
    // Reads that decide a write never trust a remembered miss: they ask the store.
    t.delete(b"other", None).await.unwrap();
    probe
        .inner
        .put(&entry("other", "theirs"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(t.get(b"other").await.unwrap(), None, "remembered miss");
    assert_eq!(
        value_of(t.get_confirmed(b"other").await.unwrap()).as_deref(),
        Some("theirs")
    );
}

#[tokio::test(start_paused = true)]
async fn strict_mode_asks_the_store_on_every_read() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 1 << 20, Duration::ZERO);
    t.put(&entry("k", "v"), PutMode::Overwrite).await.unwrap();
    for _ in 0..3 {
        assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("v"));
    }
    assert_eq!(probe.revalidations.load(Relaxed), 3);
    probe
        .inner
        .put(&entry("k", "new"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("new"));
}

#[tokio::test]
async fn concurrent_reads_share_one_backend_read() {
    let gate = Arc::new(Semaphore::new(0));
    let probe = Arc::new(Probe {
        gate: Some(gate.clone()),
        ..Probe::default()
    });
    probe
        .inner
        .put(&entry("k", "v"), PutMode::Overwrite)
        .await
        .unwrap();
    let t = Arc::new(tier(probe.clone(), 1 << 20, WINDOW));
    let readers: Vec<_> = (0..32)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move { t.get(b"k").await })
        })
        .collect();
    // Wait until the one backend read is waiting at the gate, then let it through.
    while probe.gets.load(Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    for r in readers {
        assert_eq!(value_of(r.await.unwrap().unwrap()).as_deref(), Some("v"));
    }
    assert_eq!(probe.gets.load(Relaxed), 1, "32 readers, one GET");
    // The result entered the tier: no more backend reads.
    gate.add_permits(100);
    t.get(b"k").await.unwrap();
    assert_eq!(probe.gets.load(Relaxed), 1);
}

#[tokio::test]
async fn a_read_older_than_a_write_never_fills_the_tier() {
    let gate = Arc::new(Semaphore::new(0));
    let probe = Arc::new(Probe {
        gate: Some(gate.clone()),
        ..Probe::default()
    });
    probe
        .inner
        .put(&entry("k", "old"), PutMode::Overwrite)
        .await
        .unwrap();
    let t = Arc::new(tier(probe.clone(), 1 << 20, Duration::from_secs(3600)));
    let slow_read = {
        let t = t.clone();
        tokio::spawn(async move { t.get(b"k").await })
    };
    while probe.gets.load(Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    // The read has been answered "old" by the store but not yet returned; a write lands.
    t.put(&entry("k", "new"), PutMode::Overwrite).await.unwrap();
    gate.add_permits(1);
    let concurrent = slow_read.await.unwrap().unwrap();
    assert_eq!(
        value_of(concurrent).as_deref(),
        Some("old"),
        "held read saw the old item"
    );
    assert_eq!(
        value_of(t.peek_fresh(b"k").flatten()).as_deref(),
        Some("new"),
        "the write's value stays in RAM"
    );
}

#[tokio::test]
async fn refused_writes_drop_the_entry() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 1 << 20, Duration::from_secs(3600));
    let v1 = t.put(&entry("k", "v1"), PutMode::Overwrite).await.unwrap();
    // Another replica moves the item on; this replica's update on the old version fails.
    probe
        .inner
        .put(&entry("k", "v2"), PutMode::Overwrite)
        .await
        .unwrap();
    let refused = t.put(&entry("k", "v3"), PutMode::Update(v1)).await;
    assert_eq!(refused, Err(StoreError::Changed));
    assert!(t.peek_fresh(b"k").is_none(), "the stale entry is gone");
    assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("v2"));
    t.delete(b"k", None).await.unwrap();
    assert_eq!(
        t.peek_fresh(b"k"),
        Some(None),
        "a delete is remembered as a miss"
    );
}

#[tokio::test]
async fn ram_stays_within_its_bound() {
    let probe = Arc::new(Probe::default());
    let bound = 64 * 1024;
    let t = tier(probe, bound, Duration::from_secs(3600));
    let value = "x".repeat(1000);
    for i in 0..1000 {
        t.put(&entry(&format!("key-{i}"), &value), PutMode::Overwrite)
            .await
            .unwrap();
    }
    let (items, bytes) = t.usage();
    assert!(bytes <= bound, "{bytes} bytes held, bound {bound}");
    assert!(items > 0 && items < 1000, "{items} items held");
    assert!(t.stats.tier_evictions.load(Relaxed) > 0);
}

#[tokio::test]
async fn ram_resizes_in_place_and_evicts_what_no_longer_fits() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe, 1 << 20, Duration::from_secs(3600));
    let value = "x".repeat(1000);
    for i in 0..500 {
        t.put(&entry(&format!("key-{i}"), &value), PutMode::Overwrite)
            .await
            .unwrap();
    }
    let (items, _) = t.usage();
    assert_eq!(items, 500, "all fit in 1 MiB");
    let smaller = 64 * 1024;
    assert!(t.resize_ram(smaller));
    assert_eq!(t.ram_bytes(), smaller);
    let (items, bytes) = t.usage();
    assert!(bytes <= smaller, "{bytes} bytes held, bound {smaller}");
    assert!(items > 0 && items < 500, "{items} items held");
    // Larger again: new entries fit, nothing else changes.
    assert!(t.resize_ram(2 << 20));
    for i in 0..500 {
        t.put(&entry(&format!("key-{i}"), &value), PutMode::Overwrite)
            .await
            .unwrap();
    }
    assert_eq!(t.usage().0, 500);
}

#[tokio::test]
async fn a_resize_does_not_turn_an_absent_ram_tier_on() {
    let t = tier(Arc::new(Probe::default()), 0, WINDOW);
    assert!(!t.resize_ram(8 << 20));
    assert_eq!(t.ram_bytes(), 0);
}

#[tokio::test]
async fn no_ram_tier_still_reads_through() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 0, WINDOW);
    t.put(&entry("k", "v"), PutMode::Overwrite).await.unwrap();
    assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("v"));
    assert_eq!(probe.gets.load(Relaxed), 1);
}

#[tokio::test]
async fn a_finished_read_leaves_the_table_though_its_leader_is_never_polled_again() {
    let gate = Arc::new(Semaphore::new(0));
    let probe = Arc::new(Probe {
        gate: Some(gate.clone()),
        ..Probe::default()
    });
    probe
        .inner
        .put(&entry("k", "v"), PutMode::Overwrite)
        .await
        .unwrap();
    let t = Arc::new(tier(probe.clone(), 1 << 20, Duration::from_secs(3600)));
    let mut leader = Box::pin(t.get(b"k"));
    assert!(
        futures::poll!(&mut leader).is_pending(),
        "the leader waits at the gate"
    );
    let follower = {
        let t = t.clone();
        tokio::spawn(async move { t.get(b"k").await })
    };
    gate.add_permits(1);
    assert_eq!(
        value_of(follower.await.unwrap().unwrap()).as_deref(),
        Some("v")
    );
    assert!(
        t.lock().is_empty(),
        "the follower took the finished read off the table"
    );
    drop(leader);
    assert!(t.lock().is_empty());
}

/// A probe whose writes each wait for a permit of the returned gate (`permits` to start).
fn gated_writes(permits: usize) -> (Arc<Probe>, Arc<Semaphore>) {
    let put_gate = Arc::new(Semaphore::new(permits));
    let probe = Arc::new(Probe {
        put_gate: Some(put_gate.clone()),
        ..Probe::default()
    });
    (probe, put_gate)
}

#[tokio::test]
async fn overlapping_writes_leave_neither_value_in_ram() {
    let (probe, put_gate) = gated_writes(0);
    let t = Arc::new(tier(probe.clone(), 1 << 20, Duration::from_secs(3600)));
    let first = {
        let t = t.clone();
        tokio::spawn(async move { t.put(&entry("k", "a"), PutMode::Overwrite).await })
    };
    let second = {
        let t = t.clone();
        tokio::spawn(async move { t.put(&entry("k", "b"), PutMode::Overwrite).await })
    };
    while t.lock().get(&b"k"[..]).is_none_or(|s| s.writers < 2) {
        tokio::task::yield_now().await;
    }
    put_gate.add_permits(2);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    // Their order at the store is not known here: the next read must ask it.
    assert!(t.peek_fresh(b"k").is_none());
    assert!(t.lock().is_empty());
}

/// A write keeps RAM's entry while it runs (a concurrent read may answer either value) and
/// replaces it when the store acknowledges; a failed write drops it.
#[tokio::test]
async fn a_running_write_keeps_the_entry_until_it_ends() {
    let (probe, put_gate) = gated_writes(1);
    let t = Arc::new(tier(probe.clone(), 1 << 20, Duration::from_secs(3600)));
    t.put(&entry("k", "old"), PutMode::Overwrite).await.unwrap();
    let write = {
        let t = t.clone();
        tokio::spawn(async move { t.put(&entry("k", "new"), PutMode::Overwrite).await })
    };
    while t.lock().get(&b"k"[..]).is_none_or(|s| s.writers == 0) {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        value_of(t.peek_fresh(b"k").flatten()).as_deref(),
        Some("old")
    );
    assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("old"));
    assert_eq!(probe.gets.load(Relaxed), 0, "answered from RAM");
    put_gate.add_permits(1);
    write.await.unwrap().unwrap();
    assert_eq!(
        value_of(t.peek_fresh(b"k").flatten()).as_deref(),
        Some("new")
    );
    put_gate.add_permits(1);
    let refused = t.put(&entry("k", "x"), PutMode::Create).await;
    assert_eq!(refused, Err(StoreError::Exists));
    assert!(
        t.peek_fresh(b"k").is_none(),
        "a refused write drops the entry"
    );
}

#[tokio::test]
async fn a_cancelled_write_leaves_no_state_and_no_entry() {
    let (probe, put_gate) = gated_writes(0);
    let t = tier(probe, 1 << 20, Duration::from_secs(3600));
    put_gate.add_permits(1);
    t.put(&entry("k", "old"), PutMode::Overwrite).await.unwrap();
    assert!(t.peek_fresh(b"k").is_some());
    let e = entry("k", "new");
    let mut write = Box::pin(t.put(&e, PutMode::Overwrite));
    assert!(futures::poll!(&mut write).is_pending());
    drop(write);
    assert!(t.lock().is_empty(), "no write is left counted");
    assert!(
        t.peek_fresh(b"k").is_none(),
        "its outcome is unknown: not in RAM"
    );
}

#[tokio::test(start_paused = true)]
async fn strict_and_confirmed_reads_never_join_an_earlier_read() {
    let gate = Arc::new(Semaphore::new(0));
    let probe = Arc::new(Probe {
        gate: Some(gate.clone()),
        ..Probe::default()
    });
    probe
        .inner
        .put(&entry("k", "v"), PutMode::Overwrite)
        .await
        .unwrap();
    let t = Arc::new(tier(probe.clone(), 1 << 20, WINDOW));
    let early = {
        let t = t.clone();
        tokio::spawn(async move { t.get(b"k").await })
    };
    while probe.gets.load(Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let confirmed = {
        let t = t.clone();
        tokio::spawn(async move { t.get_confirmed(b"k").await })
    };
    while probe.gets.load(Relaxed) < 2 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(2);
    early.await.unwrap().unwrap();
    confirmed.await.unwrap().unwrap();
    assert_eq!(
        probe.gets.load(Relaxed),
        2,
        "the confirmed read made its own"
    );
}

/// A tier over `probe` with a disk tier in `dir` (a new one over the same files is a
/// restarted replica).
async fn tier_on_disk(
    probe: Arc<Probe>,
    ram_bytes: u64,
    window: Duration,
    dir: &std::path::Path,
) -> Tiered {
    let disk = disk::DiskConfig {
        dir: dir.to_owned(),
        bytes: 8 << 20,
        max_item_bytes: 64 * 1024,
    };
    let disk = DiskTier::open(&disk).await.unwrap();
    tier(probe, ram_bytes, window).with_disk(disk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_tier_serves_what_it_wrote_from_disk_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let hour = Duration::from_secs(3600);
    let t = tier_on_disk(probe.clone(), 1 << 20, hour, dir.path()).await;
    t.put(&entry("k", "v1"), PutMode::Overwrite).await.unwrap();
    t.put(&entry("gone", "x"), PutMode::Overwrite)
        .await
        .unwrap();
    t.delete(b"gone", None).await.unwrap();
    t.close().await;
    drop(t);
    let t = tier_on_disk(probe.clone(), 1 << 20, hour, dir.path()).await;
    let read = t.get(b"k").await.unwrap().unwrap();
    assert_eq!(read.entry.value, "v1");
    assert_eq!(read.entry.key, "k", "the key is the one asked for");
    assert_eq!(read.entry.cas, 1);
    assert_eq!(t.get(b"gone").await.unwrap(), None);
    assert_eq!(
        (probe.gets.load(Relaxed), probe.revalidations.load(Relaxed)),
        (1, 0),
        "k came from disk; the deleted key from the store"
    );
    assert_eq!(t.stats.tier_disk_hits.load(Relaxed), 1);
    assert_eq!(t.stats.tier_disk_misses.load(Relaxed), 1);
    // Now in RAM, fresh: no I/O at all.
    assert!(t.peek_fresh(b"k").is_some());
    // A read that must be confirmed asks the store, using the version it knows.
    t.get_confirmed(b"k").await.unwrap().unwrap();
    assert_eq!(probe.revalidations.load(Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_record_older_than_the_window_is_revalidated_and_a_change_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let window = Duration::from_millis(50);
    let t = tier_on_disk(probe.clone(), 0, window, dir.path()).await;
    t.put(&entry("same", "a"), PutMode::Overwrite)
        .await
        .unwrap();
    t.put(&entry("moved", "b"), PutMode::Overwrite)
        .await
        .unwrap();
    // With no RAM, the disk alone serves inside the window.
    assert_eq!(
        value_of(t.get(b"same").await.unwrap()).as_deref(),
        Some("a")
    );
    assert_eq!(probe.gets.load(Relaxed), 0);
    t.close().await;
    drop(t);
    probe
        .inner
        .put(&entry("moved", "c"), PutMode::Overwrite)
        .await
        .unwrap();
    tokio::time::sleep(window * 2).await;
    let t = tier_on_disk(probe.clone(), 1 << 20, window, dir.path()).await;
    assert_eq!(
        value_of(t.get(b"same").await.unwrap()).as_deref(),
        Some("a")
    );
    assert_eq!(
        value_of(t.get(b"moved").await.unwrap()).as_deref(),
        Some("c")
    );
    assert_eq!(
        (probe.gets.load(Relaxed), probe.revalidations.load(Relaxed)),
        (0, 2)
    );
    assert_eq!(t.stats.tier_revalidated_unchanged.load(Relaxed), 1);
    // The changed version replaced the disk record too.
    t.close().await;
    drop(t);
    let t = tier_on_disk(
        probe.clone(),
        1 << 20,
        Duration::from_secs(3600),
        dir.path(),
    )
    .await;
    assert_eq!(
        value_of(t.get(b"moved").await.unwrap()).as_deref(),
        Some("c")
    );
}

#[tokio::test(start_paused = true)]
async fn a_peers_invalidation_drops_an_entry_unless_it_holds_that_write() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 1 << 20, WINDOW);
    // The entry holds writes 7 (its own) and 5 (the one before).
    let written = Entry {
        history: crate::store::History::from_ids(vec![7, 5], false),
        ..entry("k", "v1")
    };
    t.put(&written, PutMode::Overwrite).await.unwrap();
    assert!(!t.invalidate(b"k", Some(5)), "an older write: kept");
    assert!(!t.invalidate(b"k", Some(7)), "this very write: kept");
    assert_eq!(value_of(t.get(b"k").await.unwrap()).as_deref(), Some("v1"));
    assert_eq!(probe.gets.load(Relaxed), 0, "still from RAM");
    assert!(
        t.invalidate(b"k", Some(9)),
        "a write it does not hold: dropped"
    );
    t.get(b"k").await.unwrap();
    assert_eq!(probe.gets.load(Relaxed), 1, "read from the store again");
    assert!(t.invalidate(b"k", None), "a delete: dropped");
    t.get(b"k").await.unwrap();
    assert_eq!(probe.gets.load(Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn after_revalidate_all_every_entry_asks_the_store_once() {
    let probe = Arc::new(Probe::default());
    let t = tier(probe.clone(), 1 << 20, WINDOW);
    t.put(&entry("k", "v1"), PutMode::Overwrite).await.unwrap();
    t.get(b"k").await.unwrap();
    assert_eq!(probe.revalidations.load(Relaxed), 0);
    tokio::time::advance(Duration::from_millis(1)).await;
    t.revalidate_all();
    t.get(b"k").await.unwrap();
    t.get(b"k").await.unwrap();
    assert_eq!(
        probe.revalidations.load(Relaxed),
        1,
        "once, then fresh again"
    );
}

#[tokio::test(start_paused = true)]
async fn the_window_set_by_peers_applies_within_the_longest() {
    let probe = Arc::new(Probe::default());
    let config = TierConfig {
        ram_bytes: 1 << 20,
        revalidate_after: WINDOW,
        longest: 10 * WINDOW,
        stream_above: usize::MAX,
    };
    let t = Tiered::new(probe.clone(), config, Arc::new(Stats::default()));
    t.set_window(100 * WINDOW);
    assert_eq!(t.window(), 10 * WINDOW, "never past the longest");
    t.put(&entry("k", "v1"), PutMode::Overwrite).await.unwrap();
    tokio::time::advance(5 * WINDOW).await;
    t.get(b"k").await.unwrap();
    assert_eq!(
        probe.revalidations.load(Relaxed),
        0,
        "fresh in the long window"
    );
    t.set_window(WINDOW);
    t.get(b"k").await.unwrap();
    assert_eq!(
        probe.revalidations.load(Relaxed),
        1,
        "stale in the short one"
    );
}
