//! The near tier: recently read and written items in RAM in front of the store, and
//! single-flight backend reads.
//!
//! [`Tiered`] wraps the backend [`Store`] and is itself a `Store`, so the command layer, the
//! flush epoch and the culler use it unchanged. What it promises:
//! - An item enters the tier only from what the backend acknowledged: a write it accepted
//!   (with the version it gave) or a read it answered. A failed or refused write drops the
//!   key instead, so the next read asks the backend.
//! - An entry checked less than `revalidate_after` ago is served with no backend request.
//!   An older one is revalidated with a conditional read (`If-None-Match` on S3): unchanged
//!   keeps it (one small request, no body), changed replaces it. A window of zero is strict
//!   mode: every read asks the backend.
//! - Concurrent reads of one key share one backend read (single flight), and a read that
//!   started before a write through this replica never puts its older result in the tier.
//! - Writes through this replica replace the entry at once; another replica's write is seen
//!   within one window. Conditional writes (add, cas, incr, ...) always go to the backend
//!   with the version they read, so a stale entry costs them one refused write and a re-read.
//!
//! Expiry and flush are not the tier's business: the command layer checks every item it gets,
//! from the tier or not, against the clock and the flush epoch (read from the store before a
//! restarted replica serves anything, so nothing flushed comes back from disk).
//!
//! With a disk tier ([`disk`]), a RAM miss looks on disk before asking the backend, inside
//! the same single flight; everything that enters RAM is also queued for disk, and every
//! drop from RAM drops the disk record too. A disk record keeps the wall-clock moment the
//! backend confirmed it, so after a restart it is served with no backend request within
//! the window and revalidated after, exactly as a RAM entry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use crate::stats::Stats;
use crate::store::body::{Body, Chunks};
use crate::store::{
    DumpPage, Entry, ListPage, PutMode, Revalidated, Store, StoreError, StoreInfo, Version,
    Versioned,
};
use disk::{unix_now_ms, DiskTier, Lookup, Record};

pub mod disk;

/// Default RAM for the tier: memcached's own default memory limit (`-m 64`).
pub const DEFAULT_RAM_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Default revalidation window, in milliseconds.
pub const DEFAULT_REVALIDATE_AFTER_MS: u64 = 1000;
/// The window of a store only this process writes (a century): entries are never revalidated.
pub const AUTHORITATIVE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// What an entry costs beyond its key and value (headers, version, bookkeeping), in bytes.
const ENTRY_OVERHEAD_BYTES: usize = 160;

/// Tier settings, made from the configuration in `app`.
#[derive(Debug, Clone, Copy)]
pub struct TierConfig {
    /// Bytes of items kept in RAM (0 = no RAM tier; single flight still applies).
    pub ram_bytes: u64,
    /// How long an entry is served without asking the backend (0 = strict mode).
    pub revalidate_after: Duration,
    /// The longest window [`Tiered::set_window`] may set (while every peer acknowledges
    /// invalidations); at least `revalidate_after`.
    pub longest: Duration,
    /// Values longer than this are streamed: RAM keeps only their header (a read then
    /// streams the value from the store at the version RAM knows), the disk none of them.
    pub stream_above: usize,
}

/// Who hears of every write through this replica that may have changed the bucket: its
/// peers, who drop what they hold of it.
pub trait Announce: Send + Sync {
    /// `key` was written (its write's id, newest in its history, when known) or deleted.
    fn item(&self, key: &[u8], write: Option<u64>);
    /// A control object (the flush epoch, the culler's lease) was written.
    fn control(&self, name: &str);
}

/// The RAM tier: foyer's in-memory cache with S3-FIFO eviction (its hot get costs fewer
/// instructions than moka's, see docs/design.md, "Decisions").
/// Keys hashed with foldhash, seeded per process: a few times cheaper than foyer's default
/// (xxHash64 with a fixed seed), and clients cannot aim keys at one bucket.
type Ram = foyer::Cache<Bytes, Arc<Cached>, foldhash::fast::RandomState>;

/// The tier's clock, read once for all the keys of one request.
#[derive(Debug, Clone, Copy)]
pub struct TierNow(u64);

/// Counts RAM entries pushed out by the size bound (`tier_evictions`).
struct EvictionCounter(Arc<Stats>);

impl foyer::EventListener for EvictionCounter {
    type Key = Bytes;
    type Value = Arc<Cached>;

    fn on_leave(&self, reason: foyer::Event, _key: &Bytes, _value: &Arc<Cached>) {
        if reason == foyer::Event::Evict {
            Stats::incr(&self.0.tier_evictions);
        }
    }
}

/// One item in RAM, or a remembered miss (`None`), and when the backend last vouched for it.
struct Cached {
    item: Option<Versioned>,
    /// Milliseconds since the tier started, when the backend last confirmed this version.
    checked_at_ms: AtomicU64,
}

/// What a backend read (or a disk lookup standing in for one) brought back.
#[derive(Clone)]
struct Fetched {
    item: Option<Versioned>,
    /// How long ago the backend confirmed it, when that was before the read started (a
    /// record found on disk); `None`: when the read started.
    age_ms: Option<u64>,
    /// The disk already holds this version: RAM only.
    on_disk: bool,
}

impl Fetched {
    fn backend(item: Option<Versioned>) -> Self {
        Fetched {
            item,
            age_ms: None,
            on_disk: false,
        }
    }
}

type Flight = Shared<BoxFuture<'static, Result<Fetched, StoreError>>>;

/// A backend read in flight for one key, shared by the reads that join it.
#[derive(Clone)]
struct InFlight {
    flight: Flight,
    /// The key's write generation when it started.
    generation: u64,
    /// Set when a write makes its result too old to enter RAM; also its identity.
    abandoned: Arc<AtomicBool>,
    started: Instant,
}

/// What is going on for one key: a backend read in flight, writes in flight.
#[derive(Default)]
struct KeyState {
    flight: Option<InFlight>,
    /// Writes through this replica that have started and not finished.
    writers: u32,
    /// Bumped by every write that starts: a result from before it must not enter the tier.
    generation: u64,
}

/// What is going on for each key that has a read or a write in flight.
type KeyStates = HashMap<Bytes, KeyState, foldhash::fast::RandomState>;

/// The store with a RAM tier in front.
pub struct Tiered {
    inner: Arc<dyn Store>,
    ram: Option<Ram>,
    /// RAM's size now, in bytes: `ram_cache_bytes` until `cache_memlimit` changes it.
    ram_bytes: AtomicU64,
    /// The optional disk tier behind RAM.
    disk: Option<Arc<DiskTier>>,
    /// The window now, in milliseconds: `revalidate_after`, or longer while peers vouch.
    window_ms: AtomicU64,
    /// Where the tier's millisecond clock starts: the longest window, so a checked moment
    /// of 0 is always older than the window (what a disk record too old to place is given).
    base_ms: u64,
    /// Entries checked before this moment (the tier's clock) are revalidated, whatever the
    /// window: set when writes may have been missed.
    floor_ms: AtomicU64,
    /// Told of every write, once set (weakly: it holds the tier).
    announce: std::sync::OnceLock<std::sync::Weak<dyn Announce>>,
    keys: Mutex<KeyStates>,
    stats: Arc<Stats>,
    started: Instant,
    /// See [`TierConfig::stream_above`].
    stream_above: usize,
}

impl Tiered {
    pub fn new(inner: Arc<dyn Store>, config: TierConfig, stats: Arc<Stats>) -> Self {
        let ram = (config.ram_bytes > 0).then(|| {
            let capacity = usize::try_from(config.ram_bytes).unwrap_or(usize::MAX);
            foyer::CacheBuilder::new(capacity)
                .with_weighter(|key: &Bytes, cached: &Arc<Cached>| {
                    let value = cached.item.as_ref().map_or(0, |i| i.entry.value.len());
                    key.len() + value + ENTRY_OVERHEAD_BYTES
                })
                .with_eviction_config(foyer::S3FifoConfig::default())
                .with_event_listener(Arc::new(EvictionCounter(stats.clone())))
                .with_hash_builder(foldhash::fast::RandomState::default())
                .build()
        });
        Tiered {
            inner,
            ram,
            ram_bytes: AtomicU64::new(config.ram_bytes),
            window_ms: AtomicU64::new(millis(config.revalidate_after)),
            disk: None,
            keys: Mutex::new(HashMap::default()),
            stats,
            started: Instant::now(),
            base_ms: millis(config.longest.max(config.revalidate_after)),
            floor_ms: AtomicU64::new(0),
            announce: std::sync::OnceLock::new(),
            stream_above: config.stream_above,
        }
    }

    /// Tells `announce` of every write from now on (set once).
    pub fn announce_to(&self, announce: std::sync::Weak<dyn Announce>) {
        let _ = self.announce.set(announce);
    }

    /// Who hears of writes, if anyone still does.
    fn announcer(&self) -> Option<Arc<dyn Announce>> {
        self.announce.get()?.upgrade()
    }

    /// Sets how long an entry is served without asking the backend, within the longest
    /// window configured: longer while every peer acknowledges invalidations.
    pub fn set_window(&self, window: Duration) {
        self.window_ms
            .store(millis(window).min(self.base_ms), Relaxed);
    }

    /// Makes every entry checked until now be revalidated before it is served again (a
    /// peer's writes may have been missed).
    pub fn revalidate_all(&self) {
        self.floor_ms.fetch_max(self.now_ms(), Relaxed);
    }

    /// The window now.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.load(Relaxed))
    }

    /// A peer wrote `key` (`write` is its write's id, when known): RAM and disk drop it
    /// unless they hold that write or a later one (it is in the item's history), and a read
    /// in flight from before may not fill the tier. Returns whether anything was dropped.
    pub fn invalidate(&self, key: &[u8], write: Option<u64>) -> bool {
        let known = self.ram_get(key);
        let held = known
            .as_ref()
            .and_then(|cached| cached.item.as_ref())
            .zip(write)
            .is_some_and(|(item, id)| item.entry.history.position(id).is_some());
        if held {
            return false;
        }
        let mut keys = self.lock();
        if let Some(state) = keys.get_mut(key) {
            state.generation += 1;
            if let Some(read) = state.flight.take() {
                read.abandoned.store(true, Relaxed);
            }
        }
        self.forget(key);
        known.is_some()
    }

    /// Tells the peers, if any, that `key` may have changed.
    fn announce_item(&self, key: &[u8], write: Option<u64>) {
        if let Some(announce) = self.announcer() {
            announce.item(key, write);
        }
    }

    /// Adds the disk tier behind RAM.
    pub fn with_disk(mut self, disk: DiskTier) -> Self {
        self.disk = Some(Arc::new(disk));
        self
    }

    /// RAM's item for `key`, fresh or not (a remembered miss is no item to revalidate).
    fn ram_item(&self, key: &[u8]) -> Option<Arc<Cached>> {
        self.ram_get(key).filter(|cached| cached.item.is_some())
    }

    /// RAM's entry for `key`, fresh or not.
    fn ram_get(&self, key: &[u8]) -> Option<Arc<Cached>> {
        self.ram
            .as_ref()?
            .get(key)
            .map(|entry| entry.value().clone())
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// The tier's clock now, for [`peek_fresh_entry`](Tiered::peek_fresh_entry).
    pub fn now(&self) -> TierNow {
        TierNow(self.now_ms())
    }

    /// The tier's clock at `at` (a request's arrival: one clock read serves all its keys).
    pub fn now_at(&self, at: Instant) -> TierNow {
        TierNow(self.ms_at(at))
    }

    /// What RAM knows of `key` if the backend confirmed it within the window: the item, or
    /// `Some(None)` for a remembered miss; `None` when RAM cannot answer. No I/O. The caller
    /// counts the hit.
    pub fn peek_fresh(&self, key: &[u8]) -> Option<Option<Versioned>> {
        self.peek_fresh_cached(key, self.now())
            .map(|cached| cached.item.clone())
    }

    /// [`peek_fresh`](Tiered::peek_fresh) without the version, for answering a get, at the
    /// moment `now`: no heap allocation (the entry's bytes are shared).
    /// A value streamed is not answered here (`None`).
    pub fn peek_fresh_entry(&self, key: &[u8], now: TierNow) -> Option<Option<Entry>> {
        let cached = self.peek_fresh_cached(key, now)?;
        match &cached.item {
            Some(item) if item.large.is_some() => None,
            item => Some(item.as_ref().map(|item| item.entry.clone())),
        }
    }

    fn peek_fresh_cached(&self, key: &[u8], now: TierNow) -> Option<Arc<Cached>> {
        let cached = self.ram_get(key)?;
        let checked = cached.checked_at_ms.load(Relaxed);
        let age_ms = now.0.saturating_sub(checked);
        let fresh = age_ms < self.window_ms.load(Relaxed) && checked >= self.floor_ms.load(Relaxed);
        fresh.then_some(cached)
    }

    /// The item as the backend has it now: RAM is used only to make the read conditional
    /// (a 304 without a body when unchanged). For commands that decide from what they read
    /// without writing (`add` finding an item, `cas` a different unique), which a stale RAM
    /// entry would mislead.
    pub async fn get_confirmed(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let known = self.ram_item(key);
        self.load(key, known, false).await
    }

    /// Forgets every entry (a flush through this replica). The disk is emptied in the
    /// background; until then the flush epoch hides what it holds.
    pub fn clear(&self) {
        if let Some(ram) = &self.ram {
            ram.clear();
        }
        if let Some(disk) = self.disk.clone() {
            tokio::spawn(async move { disk.clear().await });
        }
    }

    /// Writes out what the disk tier has queued and closes it (at shutdown).
    pub async fn close(&self) {
        if let Some(disk) = &self.disk {
            disk.close().await;
        }
    }

    /// Updates the `tier_disk_bytes` gauge from the disk tier's files.
    pub fn refresh_disk_bytes(&self) {
        if let Some(disk) = &self.disk {
            let bytes = disk.disk_bytes();
            self.stats.tier_disk_bytes.store(bytes, Relaxed);
        }
    }

    /// Whether a disk tier is on.
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// RAM's size, in bytes (0: the RAM tier is off).
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes.load(Relaxed)
    }

    /// Sets RAM's size to `bytes`, evicting what no longer fits (`cache_memlimit`); false
    /// when the RAM tier is off, which a resize does not turn on. foyer resizes its shards
    /// in place on threads of its own, and this waits for them: call it off the async
    /// threads.
    pub fn resize_ram(&self, bytes: u64) -> bool {
        let Some(ram) = &self.ram else {
            return false;
        };
        match ram.resize(usize::try_from(bytes).unwrap_or(usize::MAX)) {
            Ok(()) => {
                self.ram_bytes.store(bytes, Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(cause = %e, bytes, "the RAM tier could not be resized");
                false
            }
        }
    }

    /// Entries and weighted bytes held in RAM, for `stats`.
    pub fn usage(&self) -> (u64, u64) {
        match &self.ram {
            Some(ram) => (ram.entries() as u64, ram.usage() as u64),
            None => (0, 0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyStates> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tier's clock at `at`, in milliseconds (it starts at `base_ms`).
    fn ms_at(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.started).as_millis() as u64).saturating_add(self.base_ms)
    }

    /// Puts `item` in RAM as confirmed by the backend at `checked_ms` (the tier's clock),
    /// and on disk unless `on_disk` says the disk holds it already.
    fn remember(&self, item: Versioned, checked_ms: u64, on_disk: bool) {
        // A streamed value is kept as its header alone (RAM only); a value read whole that
        // is longer than values held whole (one gzipped by an older setting) not at all.
        if item.large.is_none() && item.entry.value.len() > self.stream_above {
            self.forget(&item.entry.key);
            return;
        }
        if let (Some(disk), Some(_)) = (&self.disk, item.large) {
            // An older record held whole goes: only the header stays, in RAM.
            disk.remove(&item.entry.key);
        }
        let on_disk = on_disk || item.large.is_some();
        if let (Some(disk), false) = (&self.disk, on_disk) {
            let age_ms = self.now_ms().saturating_sub(checked_ms);
            let record = Record {
                item: item.clone(),
                checked_unix_ms: unix_now_ms().saturating_sub(age_ms),
            };
            disk.insert(item.entry.key.clone(), record);
        }
        if let Some(ram) = &self.ram {
            let key = item.entry.key.clone();
            let cached = Cached {
                item: Some(item),
                checked_at_ms: AtomicU64::new(checked_ms),
            };
            ram.insert(key, Arc::new(cached));
        }
    }

    /// Remembers that the backend had nothing under `key` at `checked_ms`, so repeated
    /// misses within the window cost no backend read (RAM only; the disk drops the key).
    fn remember_miss(&self, key: &[u8], checked_ms: u64) {
        if let Some(disk) = &self.disk {
            disk.remove(key);
        }
        if let Some(ram) = &self.ram {
            let cached = Cached {
                item: None,
                checked_at_ms: AtomicU64::new(checked_ms),
            };
            ram.insert(Bytes::copy_from_slice(key), Arc::new(cached));
        }
    }

    fn forget(&self, key: &[u8]) {
        if let Some(ram) = &self.ram {
            ram.remove(key);
        }
        if let Some(disk) = &self.disk {
            disk.remove(key);
        }
    }

    /// A read through the backend, shared with concurrent reads of the same key. A read
    /// joins one already in flight only if `may_join` and it started within the window, so
    /// what it answers is never older than the window allows; in strict mode, or for reads
    /// that must be confirmed, it starts its own.
    async fn load(
        &self,
        key: &[u8],
        known: Option<Arc<Cached>>,
        may_join: bool,
    ) -> Result<Option<Versioned>, StoreError> {
        let (read, leader) = {
            let mut keys = self.lock();
            let state = keys.entry(Bytes::copy_from_slice(key)).or_default();
            let joinable = state.flight.as_ref().filter(|f| {
                let window = self.window();
                may_join && !window.is_zero() && f.started.elapsed() < window
            });
            match joinable {
                Some(f) => (f.clone(), false),
                None => {
                    if let Some(old) = state.flight.take() {
                        old.abandoned.store(true, Relaxed);
                    }
                    let read = InFlight {
                        flight: self.start_flight(key, known.clone(), may_join),
                        generation: state.generation,
                        abandoned: Arc::new(AtomicBool::new(false)),
                        started: Instant::now(),
                    };
                    state.flight = Some(read.clone());
                    (read, true)
                }
            }
        };
        // Whoever is dropped first, or sees the read finish first, takes it off the table.
        let guard = FlightGuard {
            tier: self,
            key,
            read: &read,
            leader,
        };
        let result = read.flight.clone().await;
        guard.land(&result, known.as_ref());
        result.map(|fetched| fetched.item)
    }

    /// The shared read: RAM's entry revalidated, else a disk record (served if it is
    /// fresh and `fresh_ok`, else revalidated), else a plain backend read.
    fn start_flight(&self, key: &[u8], known: Option<Arc<Cached>>, fresh_ok: bool) -> Flight {
        let read = BackendRead {
            inner: self.inner.clone(),
            stats: self.stats.clone(),
            key: Bytes::copy_from_slice(key),
        };
        let disk = self.disk.clone().filter(|_| known.is_none());
        let window_ms = self.window_ms.load(Relaxed);
        async move {
            if let Some(item) = known.as_ref().and_then(|cached| cached.item.as_ref()) {
                return read.revalidate(item, false).await;
            }
            let Some(disk) = disk else {
                return read.get().await;
            };
            match disk.lookup(&read.key).await {
                Lookup::Found(record) => {
                    Stats::incr(&read.stats.tier_disk_hits);
                    let mut item = record.item;
                    item.entry.key = read.key.clone();
                    // A clock that went back makes a record's age unknown: revalidate.
                    let age_ms = unix_now_ms()
                        .checked_sub(record.checked_unix_ms)
                        .unwrap_or(u64::MAX);
                    if fresh_ok && age_ms < window_ms {
                        return Ok(Fetched {
                            item: Some(item),
                            age_ms: Some(age_ms),
                            on_disk: true,
                        });
                    }
                    read.revalidate(&item, true).await
                }
                Lookup::Missing => {
                    Stats::incr(&read.stats.tier_disk_misses);
                    read.get().await
                }
                Lookup::Damaged => {
                    Stats::incr(&read.stats.tier_disk_errors);
                    read.get().await
                }
            }
        }
        .boxed()
        .shared()
    }

    /// Marks the start of a write through this replica: reads already in flight may return
    /// what was there before, so none of them may fill the tier from now on. The guard ends
    /// the write, also when the write is cancelled. RAM keeps the entry meanwhile (a read
    /// concurrent with a write may answer either value; the write's end replaces or drops
    /// it), but the disk record goes now, so a crash mid-write cannot bring it back.
    fn begin_write(&self, key: Bytes) -> WriteGuard<'_> {
        let mut keys = self.lock();
        if let Some(disk) = &self.disk {
            disk.remove(&key);
        }
        let state = keys.entry(key.clone()).or_default();
        let alone = state.writers == 0;
        state.writers += 1;
        state.generation += 1;
        if let Some(read) = state.flight.take() {
            read.abandoned.store(true, Relaxed);
        }
        WriteGuard {
            tier: self,
            key,
            generation: state.generation,
            alone,
            done: false,
        }
    }
}

/// What a flight needs of the tier to ask the backend.
struct BackendRead {
    inner: Arc<dyn Store>,
    stats: Arc<Stats>,
    key: Bytes,
}

impl BackendRead {
    async fn get(&self) -> Result<Fetched, StoreError> {
        Stats::incr(&self.stats.backend_gets);
        Ok(Fetched::backend(self.inner.get(&self.key).await?))
    }

    /// A conditional read of `known`'s version; `on_disk`: the disk holds `known`.
    async fn revalidate(&self, known: &Versioned, on_disk: bool) -> Result<Fetched, StoreError> {
        Stats::incr(&self.stats.backend_revalidations);
        match self.inner.get_if_changed(&self.key, &known.version).await? {
            Revalidated::Unchanged => {
                Stats::incr(&self.stats.tier_revalidated_unchanged);
                Ok(Fetched {
                    item: Some(known.clone()),
                    age_ms: None,
                    on_disk,
                })
            }
            Revalidated::Changed(now) => Ok(Fetched::backend(now)),
        }
    }
}

/// A write in progress through this replica.
struct WriteGuard<'a> {
    tier: &'a Tiered,
    key: Bytes,
    generation: u64,
    /// No other write to the key was in progress when this one started.
    alone: bool,
    done: bool,
}

impl WriteGuard<'_> {
    /// Ends the write: what the backend acknowledged enters the tier, unless another write to
    /// the key overlapped this one (whose order against it at the backend is unknown).
    fn end(mut self, stored: Option<Versioned>) {
        self.finish(stored.map(Some));
    }

    /// Ends a delete: `gone` when the backend acknowledged it, so the key is known absent.
    fn end_absent(mut self, gone: bool) {
        self.finish(gone.then_some(None));
    }

    /// `stored`: what the backend now holds (an item, or nothing), when known.
    fn finish(&mut self, stored: Option<Option<Versioned>>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let tier = self.tier;
        let mut keys = tier.lock();
        let Some(state) = keys.get_mut(&self.key) else {
            return;
        };
        state.writers -= 1;
        if let Some(read) = state.flight.take() {
            read.abandoned.store(true, Relaxed);
        }
        let overlapped = !self.alone || state.generation != self.generation;
        match stored {
            Some(Some(item)) if !overlapped => tier.remember(item, tier.now_ms(), false),
            Some(None) if !overlapped => tier.remember_miss(&self.key, tier.now_ms()),
            _ => tier.forget(&self.key),
        }
        if state.writers == 0 {
            keys.remove(&self.key);
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // A cancelled write: its outcome is unknown, so the key leaves RAM.
        self.finish(None);
    }
}

/// Held by every read waiting on a flight. The first to see it finish takes it off the
/// table and, if nothing newer was written meanwhile, puts its result in RAM; if the leader
/// is dropped before that, it takes it off the table so later reads start afresh.
struct FlightGuard<'a> {
    tier: &'a Tiered,
    key: &'a [u8],
    read: &'a InFlight,
    leader: bool,
}

impl FlightGuard<'_> {
    /// Unregisters the flight if it is still this key's; returns whether it was.
    fn unregister(&self, keys: &mut KeyStates) -> bool {
        let Some(state) = keys.get_mut(self.key) else {
            return false;
        };
        let ours = state
            .flight
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(&f.abandoned, &self.read.abandoned));
        if ours {
            state.flight = None;
        }
        if state.flight.is_none() && state.writers == 0 {
            keys.remove(self.key);
        }
        ours
    }

    fn land(mut self, result: &Result<Fetched, StoreError>, known: Option<&Arc<Cached>>) {
        let tier = self.tier;
        let mut keys = tier.lock();
        let current = !self.read.abandoned.load(Relaxed)
            && keys
                .get(self.key)
                .is_some_and(|s| s.writers == 0 && s.generation == self.read.generation);
        if self.unregister(&mut keys) && current {
            if let Ok(fetched) = result {
                tier.land(self.key, fetched, self.read.started, known);
            }
        }
        drop(keys);
        // Already off the table: nothing left for Drop to do.
        self.leader = false;
    }
}

impl Tiered {
    /// Puts what a current flight fetched in the tiers.
    fn land(&self, key: &[u8], fetched: &Fetched, started: Instant, known: Option<&Arc<Cached>>) {
        let checked = match fetched.age_ms {
            Some(age_ms) => self.now_ms().saturating_sub(age_ms),
            None => self.ms_at(started),
        };
        match &fetched.item {
            Some(item) => match known {
                Some(k) if k.item.as_ref().is_some_and(|i| i.version == item.version) => {
                    k.checked_at_ms.store(checked, Relaxed);
                }
                _ => self.remember(item.clone(), checked, fetched.on_disk),
            },
            None => self.remember_miss(key, checked),
        }
    }
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if self.leader {
            let mut keys = self.tier.lock();
            self.unregister(&mut keys);
        }
    }
}

#[async_trait]
impl Store for Tiered {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        if let Some(found) = self.peek_fresh(key) {
            Stats::incr(&self.stats.tier_hits);
            if found.is_none() {
                Stats::incr(&self.stats.tier_miss_hits);
            }
            return Ok(found);
        }
        let known = self.ram_get(key);
        // Every read counts once: a fresh hit, a stale entry asked again, or a miss.
        Stats::incr(match known {
            Some(_) => &self.stats.tier_stale,
            None => &self.stats.tier_misses,
        });
        self.load(key, known.filter(|k| k.item.is_some()), true)
            .await
    }

    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        // The key is a slice of the connection's read buffer, held only while the write runs.
        let write = self.begin_write(entry.key.clone());
        Stats::incr(&self.stats.backend_puts);
        let result = self.inner.put(entry, mode).await;
        // The client's key and value are slices of its connection's read buffer (the parser
        // copies nothing): the RAM tier keeps its own copy, so a small item kept for long
        // never pins a whole read buffer.
        // A write settled after its answer was lost may already be written over: its
        // version is unknown and the key is dropped, as after a failed write.
        if matches!(result, Ok(_) | Err(StoreError::Unavailable(_))) {
            // Applied, or perhaps applied: a peer holding the key re-reads it.
            self.announce_item(&entry.key, entry.history.own());
        }
        let known = result.as_ref().ok().filter(|v| v.is_known());
        write.end(known.map(|version| {
            Versioned::whole(
                Entry {
                    key: Bytes::copy_from_slice(&entry.key),
                    value: Bytes::copy_from_slice(&entry.value),
                    ..entry.clone()
                },
                version.clone(),
            )
        }));
        result
    }

    async fn open(&self, key: &[u8], version: &Version) -> Result<Option<Body>, StoreError> {
        Stats::incr(&self.stats.backend_gets);
        let opened = self.inner.open(key, version).await?;
        if opened.is_none() {
            // Changed or gone since RAM learned its header: the next read asks the store.
            self.forget(key);
        }
        Ok(opened)
    }

    async fn put_streamed(
        &self,
        entry: &Entry,
        len: u64,
        value: Chunks,
    ) -> Result<Version, StoreError> {
        let write = self.begin_write(entry.key.clone());
        Stats::incr(&self.stats.backend_puts);
        let result = self.inner.put_streamed(entry, len, value).await;
        if matches!(result, Ok(_) | Err(StoreError::Unavailable(_))) {
            self.announce_item(&entry.key, entry.history.own());
        }
        let known = result.as_ref().ok().filter(|v| v.is_known());
        write.end(known.map(|version| Versioned {
            entry: Entry {
                key: Bytes::copy_from_slice(&entry.key),
                ..entry.clone()
            },
            version: version.clone(),
            large: Some(len),
        }));
        result
    }

    async fn delete(&self, key: &[u8], version: Option<&Version>) -> Result<bool, StoreError> {
        let write = self.begin_write(Bytes::copy_from_slice(key));
        Stats::incr(&self.stats.backend_deletes);
        let result = self.inner.delete(key, version).await;
        // Gone, whether it was there or not: remembered as a miss, like a read finding none.
        write.end_absent(result.is_ok());
        if matches!(result, Ok(true) | Err(StoreError::Unavailable(_))) {
            self.announce_item(key, None);
        }
        result
    }

    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError> {
        Stats::incr(&self.stats.backend_lists);
        self.inner.list(cursor, limit).await
    }

    async fn dump(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<Option<DumpPage>, StoreError> {
        Stats::incr(&self.stats.backend_lists);
        self.inner.dump(cursor, limit).await
    }

    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Stats::incr(&self.stats.backend_gets);
        self.inner.stored_at_us(name).await
    }

    /// Culled objects may stay in RAM until they are next revalidated: an evicted item
    /// lingering in a near cache is still a correct cache answer, and flushed ones are hidden
    /// by the flush epoch whatever tier they come from.
    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        Stats::incr(&self.stats.backend_deletes);
        self.inner.delete_objects(names).await
    }

    async fn get_control(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        Stats::incr(&self.stats.backend_control_gets);
        self.inner.get_control(name).await
    }

    async fn put_control(
        &self,
        name: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<Version, StoreError> {
        Stats::incr(&self.stats.backend_puts);
        let result = self.inner.put_control(name, body, mode).await;
        if let (Ok(_), Some(announce)) = (&result, self.announcer()) {
            announce.control(name);
        }
        result
    }

    fn info(&self) -> StoreInfo {
        self.inner.info()
    }
}

#[cfg(test)]
mod tests;
