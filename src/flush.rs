//! The flush epoch: `flush_all` hides every item stored at or before a moment.
//!
//! The epoch lives in a control object beside the items, so it survives restarts and every
//! replica sharing the bucket honours it; the objects themselves are removed later, in the
//! background, by the culler. The epoch is kept in memory and re-read once per
//! revalidation window by a background task, so reads cost no request for it; a flush
//! through this replica is seen by it at once, one through another replica within a window.
//! A window of zero is strict mode: each read uses an epoch read after the request arrived
//! (concurrent requests share one read), so nothing flushed by any replica is served after.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::store::{Entry, PutMode, Store, StoreError};

/// The control object's name.
pub const FLUSH_OBJECT: &str = "flush-epoch";

pub struct Flush {
    store: Arc<dyn Store>,
    /// Items stored at or before this Unix-microsecond moment are hidden once it has come;
    /// 0 = no flush.
    epoch_us: AtomicU64,
    /// The revalidation window: how often the background task re-reads the epoch (zero:
    /// strict mode, every request reads it).
    window: Duration,
    /// When the newest completed reading was started.
    read_started: Mutex<Option<Instant>>,
    /// One reading in flight at a time; others wait and reuse it if it is fresh enough.
    reading: tokio::sync::Mutex<()>,
}

impl Flush {
    /// Reads the epoch from the store.
    pub async fn load(store: Arc<dyn Store>, window: Duration) -> Result<Self, StoreError> {
        let flush = Flush {
            store,
            epoch_us: AtomicU64::new(0),
            window,
            read_started: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        };
        flush.refresh().await?;
        Ok(flush)
    }

    /// Re-reads the epoch another replica may have moved.
    pub async fn refresh(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let epoch = match self.store.get_control(FLUSH_OBJECT).await? {
            Some((body, _)) => parse_epoch(&body),
            None => 0,
        };
        self.epoch_us.store(epoch, Relaxed);
        let mut last = self.read_started.lock().expect("flush lock");
        if last.is_none_or(|l| l < started) {
            *last = Some(started);
        }
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
    pub fn current_now(&self) -> Option<u64> {
        (!self.window.is_zero() && self.fresh_since(Instant::now())).then(|| self.epoch_us())
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
    pub async fn current(&self, asked_at: Instant) -> Result<u64, StoreError> {
        if self.fresh_since(asked_at) {
            return Ok(self.epoch_us());
        }
        let _reading = self.reading.lock().await;
        if self.fresh_since(asked_at) {
            return Ok(self.epoch_us());
        }
        self.refresh().await
    }

    /// The epoch as last read or set.
    pub fn epoch_us(&self) -> u64 {
        self.epoch_us.load(Relaxed)
    }

    /// Whether `entry` is hidden by flush `epoch_us` at `now_us`.
    pub fn hides(epoch_us: u64, entry: &Entry, now_us: u64) -> bool {
        epoch_us != 0 && now_us >= epoch_us && entry.stored_at_us <= epoch_us
    }

    /// Moves the epoch to `at_us` (the last flush wins, as in memcached).
    pub async fn flush(&self, at_us: u64) -> Result<(), StoreError> {
        let _reading = self.reading.lock().await;
        let started = Instant::now();
        self.store
            .put_control(
                FLUSH_OBJECT,
                Bytes::from(format!("{at_us}\n")),
                PutMode::Overwrite,
            )
            .await?;
        self.epoch_us.store(at_us, Relaxed);
        *self.read_started.lock().expect("flush lock") = Some(started);
        Ok(())
    }
}

fn parse_epoch(body: &[u8]) -> u64 {
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
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
        assert!(!Flush::hides(flush.epoch_us(), &old, 1000));
        flush.flush(200).await.unwrap();
        let e = flush.epoch_us();
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
        assert_eq!(b.current(Instant::now()).await.unwrap(), 500);
    }
}
