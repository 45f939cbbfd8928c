//! The background culler: keeps the item count under `max_entries` (and bytes under
//! `max_bytes`), and removes objects hidden by `flush_all`. Never on the request path.
//!
//! A pass lists the prefix page by page (no 1,000 cap), deletes flushed objects, then, when
//! the count has reached `max_entries`, removes `count / cull_frequency` of the items (all of
//! them when `cull_frequency` is 0), oldest written first, in batches of 1,000. Replicas
//! sharing a bucket take turns through a lease object written with conditional puts, so
//! two passes never cull the same bucket at once: a pass renews its lease between pages and
//! batches once half of it has run out, and stops if the renewal fails (the lease was lost).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::flush::Flush;
use crate::stats::Stats;
use crate::store::{key_hash, ObjectInfo, PutMode, Store, StoreError, Version, DELETE_BATCH};

/// Name of the lease control object.
pub const LEASE_OBJECT: &str = "cull-lease";
/// How long a lease is good for without renewal.
pub const LEASE_TTL_SECS: u64 = 60;
/// A pass renews its lease once this long has passed since it was taken or renewed.
pub const LEASE_RENEW_AFTER: Duration = Duration::from_secs(LEASE_TTL_SECS / 2);
/// Listing times closer than this to the flush epoch are checked against the object itself.
pub const FLUSH_MARGIN_MS: u64 = 2000;
/// Most objects one pass will list; beyond this a pass works on what it has seen.
pub const MAX_LISTED_PER_PASS: usize = 10_000_000;

/// What the culler enforces.
#[derive(Debug, Clone)]
pub struct CullerConfig {
    pub max_entries: u64,
    pub cull_frequency: u64,
    pub max_bytes: u64,
    pub interval: Duration,
}

/// What the culler needs to hear from the command layer: each item stored, so a pass can
/// run early when the bound is near and cull expired items first.
pub trait WriteListener: Send + Sync {
    /// An item was stored under `key`, expiring at `expires_at` (Unix seconds, 0 = never).
    fn stored(&self, key: &[u8], expires_at: u64);
}

impl WriteListener for WriteHint {
    fn stored(&self, key: &[u8], expires_at: u64) {
        self.wrote(Some((key, expires_at)));
    }
}

/// Most expiry times the culler remembers from this replica's own writes.
pub const MAX_KNOWN_EXPIRIES: usize = 100_000;

/// Counts writes between passes and wakes the culler early when the bound may be near;
/// remembers the expiry of items this replica wrote, so a pass can cull expired ones first.
#[derive(Debug, Default)]
pub struct WriteHint {
    /// Items seen by the last pass.
    last_count: AtomicU64,
    /// Writes since the last pass.
    writes: AtomicU64,
    max_entries: AtomicU64,
    wake: Notify,
    /// Object name (key hash) to expiry in Unix seconds, for items written with a TTL.
    expiries: std::sync::Mutex<HashMap<String, u64>>,
}

impl WriteHint {
    pub fn new(max_entries: u64) -> Self {
        WriteHint {
            max_entries: AtomicU64::new(max_entries),
            ..WriteHint::default()
        }
    }

    /// Called after each stored item, with its key and expiry when known (0 = never).
    pub fn wrote(&self, written: Option<(&[u8], u64)>) {
        if let Some((key, expires_at)) = written {
            let mut expiries = self.expiries.lock().expect("expiries lock");
            if expires_at == 0 {
                // Most items never expire: no need to name them unless some are known.
                if !expiries.is_empty() {
                    expiries.remove(&key_hash(key));
                }
            } else {
                let name = key_hash(key);
                if expiries.len() < MAX_KNOWN_EXPIRIES || expiries.contains_key(&name) {
                    expiries.insert(name, expires_at);
                }
            }
        }
        let writes = self.writes.fetch_add(1, Relaxed) + 1;
        let max = self.max_entries.load(Relaxed);
        if max > 0 && self.last_count.load(Relaxed) + writes >= max {
            self.wake.notify_one();
        }
    }

    fn pass_done(&self, count: u64) {
        self.last_count.store(count, Relaxed);
        self.writes.store(0, Relaxed);
    }

    /// Of the listed objects, the names known to have expired by `now_secs`; forgets what
    /// the listing no longer holds.
    fn known_expired(&self, listed: &[ObjectInfo], now_secs: u64) -> HashSet<String> {
        let mut expiries = self.expiries.lock().expect("expiries lock");
        let present: HashSet<&str> = listed.iter().map(|o| short_name(&o.name)).collect();
        expiries.retain(|name, _| present.contains(name.as_str()));
        expiries
            .iter()
            .filter(|(_, &at)| at <= now_secs)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// The key-hash part of an object name (after any prefix).
fn short_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub listed: u64,
    pub flushed_removed: u64,
    pub culled: u64,
    pub remaining: u64,
    pub requests: u64,
    /// Another replica held the lease; nothing was done.
    pub skipped: bool,
    /// Bytes held under the prefix by what is not an item (unfinished writes of a
    /// directory store); counted against `max_bytes`.
    pub other_bytes: u64,
}

pub struct Culler {
    store: Arc<dyn Store>,
    flush: Arc<Flush>,
    stats: Arc<Stats>,
    clock: Clock,
    config: CullerConfig,
    /// Write counts and known expiries, fed by the command layer.
    hint: Arc<WriteHint>,
    /// Identifies this replica in the lease.
    owner: String,
    /// The lease this replica holds: its version and when it was taken or last renewed.
    lease: tokio::sync::Mutex<Option<(Version, tokio::time::Instant)>>,
    /// One pass at a time in this process.
    running: tokio::sync::Mutex<()>,
    /// The flush epoch whose objects a pass has already removed.
    collected_epoch_us: AtomicU64,
}

impl Culler {
    pub fn new(
        store: Arc<dyn Store>,
        flush: Arc<Flush>,
        stats: Arc<Stats>,
        clock: Clock,
        config: CullerConfig,
        hint: Arc<WriteHint>,
    ) -> Self {
        Culler {
            store,
            flush,
            stats,
            clock,
            config,
            hint,
            owner: format!("{:016x}", rand::random::<u64>()),
            lease: tokio::sync::Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
            collected_epoch_us: AtomicU64::new(0),
        }
    }

    /// Runs passes on the interval, or sooner when `hint` says writes are piling up.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let hint = self.hint.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = hint.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            // Passes repeat while a bound is still exceeded, each one bounded.
            for _ in 0..8 {
                match self.pass().await {
                    Ok(report) => {
                        hint.pass_done(report.remaining);
                        if report.skipped || !self.over_bound(report.remaining) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, "cull pass failed");
                        break;
                    }
                }
            }
        }
    }

    fn over_bound(&self, count: u64) -> bool {
        self.config.max_entries > 0 && count >= self.config.max_entries
    }

    /// One pass: take the lease, list, drop flushed objects, cull to the bounds.
    pub async fn pass(&self) -> Result<PassReport, StoreError> {
        let _running = self.running.lock().await;
        let started = tokio::time::Instant::now();
        let mut report = PassReport::default();
        let epoch_us = self.flush.epoch_us();
        let flush_due = epoch_us != 0
            && self.clock.now_us() >= epoch_us
            && self.collected_epoch_us.load(Relaxed) != epoch_us;
        if self.config.max_entries == 0 && self.config.max_bytes == 0 && !flush_due {
            // No bound to enforce and no flushed objects to remove: spare the listing.
            return Ok(report);
        }
        report.requests += 2;
        if !self.take_lease().await? {
            report.skipped = true;
            return Ok(report);
        }
        let mut objects = self.list_all(&mut report).await?;
        report.listed = objects.len() as u64;

        // Objects hidden by a flush that has come are garbage.
        if epoch_us != 0 && self.clock.now_us() >= epoch_us {
            let (flushed, kept) = self.split_flushed(objects, epoch_us, &mut report).await?;
            objects = kept;
            report.flushed_removed = self.remove(&flushed, &mut report).await?;
            Stats::add(&self.stats.flush_objects_removed, report.flushed_removed);
            self.collected_epoch_us.store(epoch_us, Relaxed);
        }

        // Items known to have expired first, then the oldest written.
        let expired = self.hint.known_expired(&objects, self.clock.now_secs());
        objects.sort_by_key(|o| (!expired.contains(short_name(&o.name)), o.modified_ms));
        let count = objects.len() as u64;
        let mut victims = 0usize;
        if self.over_bound(count) {
            // Django's rule: remove count / cull_frequency; 0 removes everything.
            victims = count
                .checked_div(self.config.cull_frequency)
                .map_or(objects.len(), |n| n.max(1) as usize);
        }
        if self.config.max_bytes > 0 {
            let mut total: u64 = objects.iter().map(|o| o.size).sum::<u64>() + report.other_bytes;
            let mut n = 0;
            while total > self.config.max_bytes && n < objects.len() {
                total -= objects[n].size;
                n += 1;
            }
            victims = victims.max(n);
        }
        report.culled = self.remove(&objects[..victims], &mut report).await?;
        report.remaining = count - report.culled;
        Stats::add(&self.stats.evictions, report.culled);
        self.stats.curr_items.store(report.remaining, Relaxed);
        Stats::incr(&self.stats.cull_passes);
        Stats::add(&self.stats.cull_requests, report.requests);
        self.stats
            .cull_last_pass_unix
            .store(self.clock.now_secs(), Relaxed);
        self.stats
            .cull_last_duration_ms
            .store(started.elapsed().as_millis() as u64, Relaxed);
        tracing::debug!(?report, "cull pass done");
        Ok(report)
    }

    /// Splits a listing into objects stored at or before the flush epoch and the rest. A
    /// listing's times come from the backend's clock, in whole seconds on some stores, so
    /// objects written within [`FLUSH_MARGIN_MS`] of the epoch are decided by their header.
    async fn split_flushed(
        &self,
        objects: Vec<ObjectInfo>,
        epoch_us: u64,
        report: &mut PassReport,
    ) -> Result<(Vec<ObjectInfo>, Vec<ObjectInfo>), StoreError> {
        let epoch_ms = epoch_us / 1000;
        let mut flushed = Vec::new();
        let mut kept = Vec::new();
        for o in objects {
            if o.modified_ms + FLUSH_MARGIN_MS <= epoch_ms {
                flushed.push(o);
            } else if o.modified_ms > epoch_ms + FLUSH_MARGIN_MS {
                kept.push(o);
            } else {
                self.keep_lease(report).await?;
                report.requests += 1;
                match self.store.stored_at_us(&o.name).await? {
                    Some(stored) if stored <= epoch_us => flushed.push(o),
                    Some(_) => kept.push(o),
                    None => {}
                }
            }
        }
        Ok((flushed, kept))
    }

    async fn list_all(&self, report: &mut PassReport) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.store.list(cursor, DELETE_BATCH).await?;
            report.requests += 1;
            report.other_bytes += page.other_bytes;
            all.extend(page.objects);
            match page.next {
                Some(next) if all.len() < MAX_LISTED_PER_PASS => cursor = Some(next),
                _ => return Ok(all),
            }
            self.keep_lease(report).await?;
        }
    }

    async fn remove(
        &self,
        victims: &[ObjectInfo],
        report: &mut PassReport,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        for batch in victims.chunks(DELETE_BATCH) {
            self.keep_lease(report).await?;
            let names: Vec<String> = batch.iter().map(|o| o.name.clone()).collect();
            removed += self.store.delete_objects(&names).await? as u64;
            report.requests += 1;
        }
        Ok(removed)
    }

    /// Takes or renews the cull lease; `false` when another replica holds a live one.
    async fn take_lease(&self) -> Result<bool, StoreError> {
        let mut held = self.lease.lock().await;
        let asked = tokio::time::Instant::now();
        let now = self.clock.now_secs();
        let body = Bytes::from(format!("{} {}\n", self.owner, now + LEASE_TTL_SECS));
        let current = self.store.get_control(LEASE_OBJECT).await?;
        let mode = match &current {
            None => PutMode::Create,
            Some((raw, version)) => {
                let (owner, expires) = parse_lease(raw);
                let ours = owner == self.owner && held.as_ref().map(|h| &h.0) == Some(version);
                if !ours && expires > now {
                    return Ok(false);
                }
                PutMode::Update(version.clone())
            }
        };
        match self.store.put_control(LEASE_OBJECT, body, mode).await {
            Ok(version) => {
                *held = Some((version, asked));
                Ok(true)
            }
            Err(StoreError::Exists | StoreError::Changed) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Renews the lease during a pass once half of it has run out. An error (the lease was
    /// lost to another replica, or could not be renewed) stops the pass: past this point
    /// another replica may be culling.
    async fn keep_lease(&self, report: &mut PassReport) -> Result<(), StoreError> {
        let mut held = self.lease.lock().await;
        let Some((version, renewed)) = held.clone() else {
            return Err(StoreError::Unavailable("cull lease lost".into()));
        };
        if renewed.elapsed() < LEASE_RENEW_AFTER {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        let expires = self.clock.now_secs() + LEASE_TTL_SECS;
        let body = Bytes::from(format!("{} {expires}\n", self.owner));
        report.requests += 1;
        match self
            .store
            .put_control(LEASE_OBJECT, body, PutMode::Update(version))
            .await
        {
            Ok(version) => {
                *held = Some((version, started));
                Ok(())
            }
            Err(StoreError::Exists | StoreError::Changed) => {
                *held = None;
                tracing::warn!("the cull lease was taken over during a pass; pass stopped");
                Err(StoreError::Unavailable(
                    "cull lease lost to another replica".into(),
                ))
            }
            Err(e) => Err(e),
        }
    }
}

fn parse_lease(raw: &[u8]) -> (String, u64) {
    let text = String::from_utf8_lossy(raw);
    let mut parts = text.split_whitespace();
    let owner = parts.next().unwrap_or_default().to_owned();
    let expires = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
    (owner, expires)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::test_utils::Layer;
    use crate::store::Entry;

    async fn fill(store: &dyn Store, n: u64) {
        for i in 0..n {
            let entry = Entry {
                key: Bytes::from(format!("key-{i}")),
                stored_at_us: 1_000_000 * (i + 1),
                value: Bytes::from("v"),
                ..Entry::default()
            };
            store.put(&entry, PutMode::Overwrite).await.unwrap();
        }
    }

    async fn culler(store: Arc<dyn Store>, max_entries: u64, cull_frequency: u64) -> Culler {
        culler_with(store, max_entries, cull_frequency, 0).await
    }

    async fn culler_with(
        store: Arc<dyn Store>,
        max_entries: u64,
        cull_frequency: u64,
        max_bytes: u64,
    ) -> Culler {
        culler_on(store, max_entries, cull_frequency, max_bytes, Clock::System).await
    }

    async fn culler_on(
        store: Arc<dyn Store>,
        max_entries: u64,
        cull_frequency: u64,
        max_bytes: u64,
        clock: Clock,
    ) -> Culler {
        let flush = Arc::new(Flush::load(store.clone(), Duration::ZERO).await.unwrap());
        Culler::new(
            store,
            flush,
            Arc::new(Stats::default()),
            clock,
            CullerConfig {
                max_entries,
                cull_frequency,
                max_bytes,
                interval: Duration::from_secs(3600),
            },
            Arc::new(WriteHint::new(max_entries)),
        )
    }

    #[tokio::test]
    async fn items_known_to_have_expired_go_first() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        fill(&*store, 30).await;
        let c = culler(store.clone(), 30, 3).await;
        // This replica wrote the newest three with a TTL that has passed.
        for i in 27..30 {
            c.hint.wrote(Some((format!("key-{i}").as_bytes(), 1)));
        }
        let report = c.pass().await.unwrap();
        assert_eq!(report.culled, 10);
        for i in 27..30 {
            assert!(store
                .get(format!("key-{i}").as_bytes())
                .await
                .unwrap()
                .is_none());
        }
        // Then the oldest: seven of them.
        assert!(store.get(b"key-6").await.unwrap().is_none());
        assert!(store.get(b"key-7").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn max_bytes_removes_the_oldest_until_under() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        fill(&*store, 10).await; // ten one-byte values
        let report = culler_with(store.clone(), 0, 3, 6)
            .await
            .pass()
            .await
            .unwrap();
        assert_eq!((report.culled, report.remaining), (4, 6));
        assert!(store.get(b"key-3").await.unwrap().is_none());
        assert!(store.get(b"key-4").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn writes_near_the_bound_wake_the_culler_early() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        fill(&*store, 12).await;
        let c = Arc::new(culler(store.clone(), 10, 2).await);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(c.clone().run(shutdown.clone()));
        for _ in 0..10 {
            c.hint.wrote(None);
        }
        // The interval is an hour: only the hint can have started this pass.
        let woke = tokio::time::timeout(Duration::from_secs(10), async {
            while c.stats.cull_passes.load(Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        shutdown.cancel();
        task.await.unwrap();
        assert!(woke.is_ok(), "the culler did not wake");
        assert!(c.stats.evictions.load(Relaxed) >= 6);
    }

    #[tokio::test]
    async fn culls_a_third_of_the_oldest_at_the_bound() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        fill(&*store, 30).await;
        let c = culler(store.clone(), 30, 3).await;
        let report = c.pass().await.unwrap();
        assert_eq!(report.culled, 10);
        assert_eq!(report.remaining, 20);
        // The oldest ten went.
        assert!(store.get(b"key-0").await.unwrap().is_none());
        assert!(store.get(b"key-9").await.unwrap().is_none());
        assert!(store.get(b"key-10").await.unwrap().is_some());
        // Under the bound: nothing more.
        assert_eq!(c.pass().await.unwrap().culled, 0);
    }

    #[tokio::test]
    async fn cull_frequency_zero_removes_everything() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        fill(&*store, 12).await;
        let report = culler(store, 10, 0).await.pass().await.unwrap();
        assert_eq!((report.culled, report.remaining), (12, 0));
    }

    #[tokio::test]
    async fn flushed_objects_go_and_later_ones_stay_even_close_to_the_epoch() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let epoch_us = 1_700_000_000_000_000;
        for (key, stored_at_us) in [
            ("old", epoch_us - 10_000_000),
            ("just-before", epoch_us - 500_000),
            ("just-after", epoch_us + 500_000),
            ("new", epoch_us + 10_000_000),
        ] {
            let entry = Entry {
                key: Bytes::from(key),
                stored_at_us,
                ..Entry::default()
            };
            store.put(&entry, PutMode::Overwrite).await.unwrap();
        }
        let c = culler(store.clone(), 0, 3).await;
        c.flush.flush(epoch_us).await.unwrap();
        let report = c.pass().await.unwrap();
        assert_eq!(report.flushed_removed, 2);
        assert!(store.get(b"just-before").await.unwrap().is_none());
        assert!(store.get(b"just-after").await.unwrap().is_some());
        assert!(store.get(b"new").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_second_replica_waits_for_the_lease() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        fill(&*store, 30).await;
        let a = culler(store.clone(), 30, 3).await;
        let b = culler(store.clone(), 30, 3).await;
        assert!(!a.pass().await.unwrap().skipped);
        assert!(b.pass().await.unwrap().skipped);
        assert!(
            !a.pass().await.unwrap().skipped,
            "the holder renews its lease"
        );
    }

    /// A memory store whose listings and batch deletes each take `delay` (paused time).
    struct SlowStore {
        inner: MemoryStore,
        delay: Duration,
    }

    #[async_trait::async_trait]
    impl Layer for SlowStore {
        fn inner(&self) -> &MemoryStore {
            &self.inner
        }
        async fn list(
            &self,
            cursor: Option<String>,
            limit: usize,
        ) -> Result<crate::store::ListPage, StoreError> {
            tokio::time::sleep(self.delay).await;
            self.inner.list(cursor, limit).await
        }
        async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
            tokio::time::sleep(self.delay).await;
            self.inner.delete_objects(names).await
        }
    }

    /// 5,000 items on a store where each list page and delete batch takes 20 s: a pass
    /// culling a third lists 5 pages and deletes 2 batches, 140 s against a 60 s lease.
    async fn slow_store() -> Arc<dyn Store> {
        let slow = SlowStore {
            inner: MemoryStore::new(),
            delay: Duration::from_secs(20),
        };
        fill(&slow.inner, 5000).await;
        Arc::new(slow)
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_longer_than_the_lease_keeps_it() {
        let store = slow_store().await;
        let clock = Clock::tokio();
        let a = Arc::new(culler_on(store.clone(), 3000, 3, 0, clock).await);
        let b = culler_on(store.clone(), 3000, 3, 0, clock).await;
        let started = tokio::time::Instant::now();
        let pass = tokio::spawn({
            let a = a.clone();
            async move { a.pass().await }
        });
        let mut tries = 0;
        while !pass.is_finished() {
            tokio::time::sleep(Duration::from_secs(7)).await;
            if pass.is_finished() {
                break;
            }
            let report = b.pass().await.unwrap();
            assert!(
                report.skipped,
                "a second culler ran {:?} into the first one's pass",
                started.elapsed()
            );
            tries += 1;
        }
        let report = pass.await.unwrap().expect("the pass kept its lease");
        assert!(
            started.elapsed() > Duration::from_secs(2 * LEASE_TTL_SECS),
            "the pass was meant to outlast the lease: {:?}",
            started.elapsed()
        );
        assert!(tries >= 15, "the other culler tried {tries} times");
        assert_eq!((report.culled, report.remaining), (1666, 3334));
        // Passes do not release the lease: it is free once it runs out.
        tokio::time::sleep(Duration::from_secs(LEASE_TTL_SECS + 1)).await;
        assert!(
            !b.pass().await.unwrap().skipped,
            "free again after the pass"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_that_loses_its_lease_stops() {
        let store = slow_store().await;
        let a = Arc::new(culler_on(store.clone(), 3000, 3, 0, Clock::tokio()).await);
        let pass = tokio::spawn({
            let a = a.clone();
            async move { a.pass().await }
        });
        // Another replica takes the lease over behind the pass's back (as it could once a
        // lease ran out), before the pass's first renewal.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!pass.is_finished());
        store
            .put_control(
                LEASE_OBJECT,
                Bytes::from("rival 99999999999\n"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        let err = pass.await.unwrap().expect_err("the pass stops");
        assert!(err.to_string().contains("lease"), "{err}");
        assert_eq!(
            store.list(None, 10_000).await.unwrap().objects.len(),
            5000,
            "nothing was culled after the lease was lost"
        );
    }
}
