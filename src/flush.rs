//! The flush epoch: `flush_all` hides every item stored at or before a moment.
//!
//! The epoch lives in a control object beside the items, so it survives restarts and every
//! replica sharing the bucket honours it; the objects themselves are removed later, in the
//! background, by the culler. The epoch is kept in memory and re-read once per
//! revalidation window by a background task, so reads cost no request for it; a flush
//! through this replica is seen by it at once, one through another replica within two
//! windows (a reading is used for two windows before a request waits for a fresh one).
//! A window of zero is strict mode: each read uses an epoch read after the request arrived
//! (concurrent requests share one read), so nothing flushed by any replica is served after.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::store::{Entry, PutMode, Store, StoreError, Version};

/// The control object's name.
pub const FLUSH_OBJECT: &str = "flush-epoch";

/// How often a `flush_all` retries its conditional write after another replica's flush.
const MAX_FLUSH_RETRIES: usize = 16;

/// The flush moments in force, in Unix microseconds (0 = none).
///
/// memcached keeps one moment, so `flush_all` then `flush_all 3600` un-hides what the first
/// flush hid until the second comes. Here the culler deletes flushed objects in the
/// background, which would make that depend on timing, so a moment that has passed stays in
/// force (`passed_us`) beside the pending one (`pending_us`). A deliberate difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Epoch {
    /// The latest flush moment known to have come.
    pub passed_us: u64,
    /// A delayed flush's moment, which may still be to come.
    pub pending_us: u64,
}

impl Epoch {
    /// The state after a `flush_all` for moment `at_us`, decided at `now_us`: the last flush
    /// wins, except that a moment which has passed stays in force.
    pub fn with_flush(self, at_us: u64, now_us: u64) -> Epoch {
        let mut passed_us = self.passed_us;
        if self.pending_us != 0 && self.pending_us <= now_us {
            passed_us = passed_us.max(self.pending_us);
        }
        if at_us <= now_us {
            Epoch {
                passed_us: passed_us.max(at_us),
                pending_us: 0,
            }
        } else {
            Epoch {
                passed_us,
                pending_us: at_us,
            }
        }
    }

    /// The latest moment of the two: everything stored at or before it is hidden once it
    /// has come (what the culler collects).
    pub fn latest_us(self) -> u64 {
        self.passed_us.max(self.pending_us)
    }

    fn encode(self) -> Bytes {
        Bytes::from(format!("{} {}\n", self.passed_us, self.pending_us))
    }

    /// The object's text: `<passed> <pending>`, or one number (an older s3cached's single
    /// moment, read as pending: it hides once it has come, as before).
    fn decode(body: &[u8]) -> Result<Epoch, String> {
        let text = std::str::from_utf8(body).map_err(|_| "not text".to_owned())?;
        let numbers: Result<Vec<u64>, _> = text.split_whitespace().map(str::parse).collect();
        match numbers.map_err(|e| e.to_string())?.as_slice() {
            [passed_us, pending_us] => Ok(Epoch {
                passed_us: *passed_us,
                pending_us: *pending_us,
            }),
            [pending_us] => Ok(Epoch {
                passed_us: 0,
                pending_us: *pending_us,
            }),
            _ => Err(format!("{} numbers", text.split_whitespace().count())),
        }
    }
}

pub struct Flush {
    store: Arc<dyn Store>,
    /// The flush moments as last read or written.
    epoch: Mutex<Epoch>,
    /// The revalidation window: how often the background task re-reads the epoch (zero:
    /// strict mode, every request reads it).
    window: Duration,
    /// When the newest completed reading was started.
    read_started: Mutex<Option<Instant>>,
    /// One reading in flight at a time; others wait and reuse it if it is fresh enough.
    reading: tokio::sync::Mutex<()>,
}

/// The reason an epoch object cannot be used, as a store error: the request fails.
fn unreadable(why: &str) -> StoreError {
    StoreError::Unavailable(format!("flush epoch object unreadable: {why}"))
}

impl Flush {
    /// Reads the epoch from the store. An object that cannot be parsed is logged and left
    /// for requests to fail on (`SERVER_ERROR`) until a `flush_all` rewrites it.
    pub async fn load(store: Arc<dyn Store>, window: Duration) -> Result<Self, StoreError> {
        let flush = Flush {
            store,
            epoch: Mutex::new(Epoch::default()),
            window,
            read_started: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        };
        let started = Instant::now();
        match flush.read().await? {
            (Ok(epoch), _) => flush.set(epoch, started),
            (Err(why), _) => tracing::warn!(cause = %why, "flush epoch object unreadable"),
        }
        Ok(flush)
    }

    /// The control object: its epoch (or why it is unusable) and its version.
    async fn read(&self) -> Result<(Result<Epoch, String>, Option<Version>), StoreError> {
        Ok(match self.store.get_control(FLUSH_OBJECT).await? {
            Some((body, version)) => (Epoch::decode(&body), Some(version)),
            None => (Ok(Epoch::default()), None),
        })
    }

    fn set(&self, epoch: Epoch, started: Instant) {
        *self.epoch.lock().expect("flush lock") = epoch;
        let mut last = self.read_started.lock().expect("flush lock");
        if last.is_none_or(|l| l < started) {
            *last = Some(started);
        }
    }

    /// Re-reads the epoch another replica may have moved.
    pub async fn refresh(&self) -> Result<Epoch, StoreError> {
        let started = Instant::now();
        let epoch = self.read().await?.0.map_err(|why| unreadable(&why))?;
        self.set(epoch, started);
        Ok(epoch)
    }

    /// How old a reading may be when a request uses it: in strict mode none older than the
    /// request; else two windows, so a request waits for the store only when the background
    /// task has failed to refresh it.
    fn max_age(&self) -> Duration {
        self.window * 2
    }

    fn fresh_since(&self, since: Instant) -> bool {
        let last = *self.read_started.lock().expect("flush lock");
        last.is_some_and(|l| l + self.max_age() >= since)
    }

    /// The epoch, if a reading fresh enough for a request arriving now is at hand (no I/O).
    pub fn current_now(&self) -> Option<Epoch> {
        self.current_at(Instant::now())
    }

    /// [`current_now`](Flush::current_now) for a request that arrived at `arrived`.
    pub fn current_at(&self, arrived: Instant) -> Option<Epoch> {
        (!self.window.is_zero() && self.fresh_since(arrived)).then(|| self.epoch())
    }

    /// Re-reads the epoch once per window until `shutdown`; nothing to do in strict mode.
    pub async fn run_refresher(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        if self.window.is_zero() {
            return;
        }
        // The epoch was just read by `load`: the first re-read is one window away.
        let mut tick = tokio::time::interval_at(Instant::now() + self.window, self.window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let _reading = self.reading.lock().await;
            if let Err(e) = self.refresh().await {
                tracing::warn!(cause = %e, "cannot re-read the flush epoch");
            }
        }
    }

    /// The epoch as read recently enough for a request that arrived at `asked_at`.
    pub async fn current(&self, asked_at: Instant) -> Result<Epoch, StoreError> {
        if self.fresh_since(asked_at) {
            return Ok(self.epoch());
        }
        let _reading = self.reading.lock().await;
        if self.fresh_since(asked_at) {
            return Ok(self.epoch());
        }
        self.refresh().await
    }

    /// The epoch as last read or set.
    pub fn epoch(&self) -> Epoch {
        *self.epoch.lock().expect("flush lock")
    }

    /// The latest flush moment as last read or set (0 = none).
    pub fn epoch_us(&self) -> u64 {
        self.epoch().latest_us()
    }

    /// Whether `entry` is hidden by `epoch` at `now_us`.
    pub fn hides(epoch: Epoch, entry: &Entry, now_us: u64) -> bool {
        let by = |moment: u64| moment != 0 && now_us >= moment && entry.stored_at_us <= moment;
        by(epoch.passed_us) || by(epoch.pending_us)
    }

    /// A flush whose moment `at_us` has come.
    pub async fn flush(&self, at_us: u64) -> Result<(), StoreError> {
        self.flush_at(at_us, at_us).await
    }

    /// `flush_all`: hides everything stored at or before `at_us` once it comes (`now_us` is
    /// now). Read-modify-write of the control object with a precondition, so concurrent
    /// flushes on several replicas all count. An unreadable object is rewritten by an
    /// immediate flush (which needs nothing from it) and fails a delayed one.
    pub async fn flush_at(&self, at_us: u64, now_us: u64) -> Result<(), StoreError> {
        let _reading = self.reading.lock().await;
        for _ in 0..MAX_FLUSH_RETRIES {
            let started = Instant::now();
            let (old, version) = self.read().await?;
            let next = match old {
                Ok(old) => old.with_flush(at_us, now_us),
                Err(_) if at_us <= now_us => Epoch::default().with_flush(at_us, now_us),
                Err(why) => return Err(unreadable(&why)),
            };
            let mode = version.map_or(PutMode::Create, PutMode::Update);
            match self
                .store
                .put_control(FLUSH_OBJECT, next.encode(), mode)
                .await
            {
                Ok(_) => {
                    *self.epoch.lock().expect("flush lock") = next;
                    *self.read_started.lock().expect("flush lock") = Some(started);
                    return Ok(());
                }
                Err(StoreError::Exists | StoreError::Changed) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn epoch_hides_older_items_once_due_and_persists() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let flush = Flush::load(store.clone(), Duration::ZERO).await.unwrap();
        let old = Entry {
            stored_at_us: 100,
            ..Entry::default()
        };
        let new = Entry {
            stored_at_us: 300,
            ..Entry::default()
        };
        assert!(!Flush::hides(flush.epoch(), &old, 1000));
        flush.flush(200).await.unwrap();
        let e = flush.epoch();
        assert!(!Flush::hides(e, &old, 150), "not before the flush moment");
        assert!(Flush::hides(e, &old, 200));
        assert!(!Flush::hides(e, &new, 1000));
        let again = Flush::load(store, Duration::ZERO).await.unwrap();
        assert_eq!(again.epoch_us(), 200);
    }

    #[tokio::test]
    async fn another_replicas_flush_is_seen_by_the_next_request() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = Flush::load(store.clone(), Duration::ZERO).await.unwrap();
        let b = Flush::load(store.clone(), Duration::ZERO).await.unwrap();
        a.flush(500).await.unwrap();
        assert_eq!(b.current(Instant::now()).await.unwrap().latest_us(), 500);
    }

    #[tokio::test]
    async fn a_passed_flush_stays_in_force_after_a_delayed_one() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let flush = Flush::load(store.clone(), Duration::ZERO).await.unwrap();
        let old = Entry {
            stored_at_us: 100,
            ..Entry::default()
        };
        let between = Entry {
            stored_at_us: 300,
            ..Entry::default()
        };
        flush.flush_at(200, 250).await.unwrap();
        flush.flush_at(5_000, 400).await.unwrap();
        let e = Flush::load(store, Duration::ZERO).await.unwrap().epoch();
        assert_eq!(
            e,
            Epoch {
                passed_us: 200,
                pending_us: 5_000
            }
        );
        assert!(Flush::hides(e, &old, 400), "the passed flush still hides");
        assert!(!Flush::hides(e, &between, 400));
        assert!(
            Flush::hides(e, &between, 5_000),
            "the delayed one hides when due"
        );
        // A later immediate flush cancels the pending one, as in memcached.
        let e = e.with_flush(600, 600);
        assert_eq!(e.pending_us, 0);
        assert_eq!(e.passed_us, 600);
        // A due pending moment is promoted when the next flush comes.
        let e = Epoch {
            passed_us: 10,
            pending_us: 20,
        }
        .with_flush(90, 30);
        assert_eq!((e.passed_us, e.pending_us), (20, 90));
    }

    #[tokio::test]
    async fn an_unreadable_epoch_fails_requests_until_a_flush_rewrites_it() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        store
            .put_control(FLUSH_OBJECT, Bytes::from("garbage"), PutMode::Overwrite)
            .await
            .unwrap();
        let flush = Flush::load(store.clone(), Duration::ZERO).await.unwrap();
        assert!(matches!(
            flush.current(Instant::now()).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(flush.flush_at(900, 100).await.is_err(), "a delayed flush");
        flush.flush_at(100, 100).await.unwrap();
        let e = flush.current(Instant::now()).await.unwrap();
        assert_eq!(e.passed_us, 100);
        // An older s3cached's single number is still understood.
        assert_eq!(Epoch::decode(b"77\n").unwrap().latest_us(), 77);
    }
}
