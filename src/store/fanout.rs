//! Reads sent together for one request (a multi-key get's fan-out), as the store sees them:
//! how many are out and how many have answered. A store that hedges slow reads
//! ([`crate::store::s3`]) judges a read of a fan-out against its siblings, not only against
//! reads in general: a hundred GETs sent at once also queue for the CPU, and all of them
//! pass a delay taken from single GETs without any being slow at S3; the slowest tenth of
//! the fan-out is what may be slow at S3. The fan-out is found
//! through a task-local, as [`super::charge`] is, so the store depends on nothing above it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;
use tokio::time::Instant;

/// The reads of one fan-out.
#[derive(Debug, Default)]
pub struct Fanout {
    started: AtomicUsize,
    answered: AtomicUsize,
    /// When half of the reads started by then had answered.
    half_at: OnceLock<Instant>,
    changed: Notify,
}

tokio::task_local! {
    static FANOUT: Arc<Fanout>;
}

/// Runs `future`, whose store reads are one fan-out.
pub async fn scope<F: Future>(future: F) -> F::Output {
    FANOUT.scope(Arc::default(), future).await
}

/// The fan-out this task's reads belong to, if any.
pub fn current() -> Option<Arc<Fanout>> {
    FANOUT.try_with(Arc::clone).ok()
}

impl Fanout {
    /// A read of the fan-out starts; it is counted as answered when the guard drops.
    pub fn start(self: &Arc<Self>) -> Answering {
        self.started.fetch_add(1, Relaxed);
        Answering(self.clone())
    }

    /// Whether nine in ten of the other reads started so far have answered (true for a
    /// read alone), for a read still waiting: it is then among the fan-out's slowest tenth.
    pub fn most_answered(&self) -> bool {
        let others = self.started.load(Relaxed).saturating_sub(1);
        10 * self.answered.load(Relaxed) >= 9 * others
    }

    /// Waits until [`most_answered`](Self::most_answered).
    pub async fn wait_most_answered(&self) {
        self.wait_for(|f| f.most_answered().then_some(())).await;
    }

    /// Waits until half of the reads started have answered; returns when that happened.
    pub async fn wait_half_answered(&self) -> Instant {
        self.wait_for(|f| f.half_at.get().copied()).await
    }

    async fn wait_for<T>(&self, ready: impl Fn(&Self) -> Option<T>) -> T {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(done) = ready(self) {
                return done;
            }
            changed.await;
        }
    }
}

/// A read of a fan-out under way: answered when dropped.
#[derive(Debug)]
pub struct Answering(Arc<Fanout>);

impl Drop for Answering {
    fn drop(&mut self) {
        let fanout = &self.0;
        let answered = fanout.answered.fetch_add(1, Relaxed) + 1;
        if 2 * answered >= fanout.started.load(Relaxed) {
            fanout.half_at.get_or_init(Instant::now);
        }
        fanout.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_waits_for_nine_in_ten_of_the_others() {
        let fanout = Arc::new(Fanout::default());
        let first = fanout.start();
        assert!(fanout.most_answered(), "a read alone");
        let others: Vec<_> = (0..10).map(|_| fanout.start()).collect();
        assert!(!fanout.most_answered(), "none of the 10 others answered");
        drop(first);
        let mut others = others.into_iter();
        for answered in 2..=8 {
            drop(others.next());
            assert!(!fanout.most_answered(), "{answered} of 10");
        }
        drop(others.next());
        assert!(fanout.most_answered(), "9 of 10");
    }

    #[tokio::test]
    async fn the_wait_ends_when_nine_in_ten_have_answered() {
        let fanout = Arc::new(Fanout::default());
        let reads: Vec<_> = (0..11).map(|_| fanout.start()).collect();
        let waiting = tokio::spawn({
            let fanout = fanout.clone();
            async move { fanout.wait_most_answered().await }
        });
        let mut reads = reads.into_iter();
        for _ in 0..8 {
            drop(reads.next());
        }
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "8 of 10 others");
        drop(reads.next());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_moment_half_had_answered_is_kept() {
        let fanout = Arc::new(Fanout::default());
        let mut reads = (0..4)
            .map(|_| fanout.start())
            .collect::<Vec<_>>()
            .into_iter();
        drop(reads.next());
        let began = Instant::now();
        tokio::time::advance(std::time::Duration::from_millis(7)).await;
        drop(reads.next());
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
        drop(reads.next());
        assert_eq!(
            fanout.wait_half_answered().await - began,
            std::time::Duration::from_millis(7)
        );
    }

    #[tokio::test]
    async fn reads_find_their_fan_out() {
        assert!(current().is_none());
        scope(async { assert!(current().is_some()) }).await;
    }
}
