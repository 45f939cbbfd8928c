//! A connection's requests in flight: concurrent, answered in order, ordered per key.
//!
//! Requests run concurrently, yet their outputs come in request order; one key's requests run
//! one after another, and a barrier waits for everything before it. The pipeline knows nothing
//! of the store or the protocol: it takes futures (a request running, with whatever the driver
//! attaches to it) and the keys they touch, and yields their outputs in the order they were
//! started.

use std::collections::HashMap;
use std::future::Future;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::oneshot;

/// Most requests of one connection in flight at once.
pub const MAX_PIPELINE_DEPTH: usize = 128;

/// Completes when a request has finished.
type Done = Shared<BoxFuture<'static, ()>>;
/// A started request, to its output, its sequence number and its keys.
type Running<T> = BoxFuture<'static, (T, u64, Vec<Bytes>)>;

/// The requests of a connection that have started but whose outputs are not yet taken, and
/// a barrier waiting for them to drain.
pub struct Pipeline<T, B> {
    /// Started requests, in request order.
    running: FuturesOrdered<Running<T>>,
    /// For each key, the last request touching it and a future that completes with it.
    key_tails: HashMap<Bytes, (u64, Done)>,
    /// The next request's sequence number.
    next_seq: u64,
    /// A request that runs only once everything before it has finished, and before anything
    /// after it starts.
    barrier: Option<B>,
}

impl<T: Send + 'static, B> Pipeline<T, B> {
    pub fn new() -> Self {
        Pipeline {
            running: FuturesOrdered::new(),
            key_tails: HashMap::new(),
            next_seq: 0,
            barrier: None,
        }
    }

    /// Requests running, or finished and not yet taken.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether no request is running (or finished and not yet taken).
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Whether another request may start: no barrier is waiting and the pipeline is not full.
    pub fn has_room(&self) -> bool {
        self.barrier.is_none() && self.running.len() < MAX_PIPELINE_DEPTH
    }

    /// Starts `run`, which touches `keys`: it is first polled once every earlier request on
    /// any of its keys has finished. A future already polled (one that ran with nothing
    /// before it) may be passed; with nothing before it on its keys it goes on at once.
    pub fn start<F>(&mut self, keys: Vec<Bytes>, run: F)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (seq, waits, finished) = self.register(&keys);
        self.running.push_back(
            async move {
                futures::future::join_all(waits).await;
                let output = run.await;
                drop(finished);
                (output, seq, keys)
            }
            .boxed(),
        );
    }

    /// The next request's output, in request order, once it has finished; `None` when
    /// nothing is running. Cancel-safe: nothing is lost if the future is dropped.
    pub async fn next(&mut self) -> Option<T> {
        let (output, seq, keys) = self.running.next().await?;
        self.forget(seq, &keys);
        Some(output)
    }

    /// The next request's output if it has already finished.
    pub fn ready(&mut self) -> Option<T> {
        self.next().now_or_never().flatten()
    }

    /// Holds `barrier` until every request started before it has been taken; nothing more
    /// starts meanwhile.
    pub fn hold(&mut self, barrier: B) {
        self.barrier = Some(barrier);
    }

    /// Whether a barrier is held.
    pub fn holds_barrier(&self) -> bool {
        self.barrier.is_some()
    }

    /// The barrier held, once everything before it is done.
    pub fn take_barrier(&mut self) -> Option<B> {
        if self.running.is_empty() {
            self.barrier.take()
        } else {
            None
        }
    }

    /// Gives the next request a sequence number and makes it the last holder of `keys`;
    /// returns the number, what it must wait for, and what it drops when done.
    fn register(&mut self, keys: &[Bytes]) -> (u64, Vec<Done>, oneshot::Sender<()>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let waits: Vec<Done> = keys
            .iter()
            .filter_map(|k| self.key_tails.get(k).map(|(_, done)| done.clone()))
            .collect();
        let (finished, done) = oneshot::channel::<()>();
        let done: Done = done.map(|_| ()).boxed().shared();
        for key in keys {
            self.key_tails.insert(key.clone(), (seq, done.clone()));
        }
        (seq, waits, finished)
    }

    /// Forgets key ordering entries that the finished request `seq` was the last holder of.
    fn forget(&mut self, seq: u64, keys: &[Bytes]) {
        for key in keys {
            if self.key_tails.get(key).is_some_and(|(s, _)| *s == seq) {
                self.key_tails.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// What the test requests did, in the order they did it.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn push(&self, event: String) {
            self.0.lock().unwrap().push(event);
        }

        fn events(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    /// A request named `name` that logs when it starts and when it ends, and finishes when
    /// `release` is sent (or dropped).
    fn gated(
        log: &Log,
        name: &'static str,
        release: oneshot::Receiver<()>,
    ) -> BoxFuture<'static, &'static str> {
        let log = log.clone();
        async move {
            log.push(format!("{name} starts"));
            let _ = release.await;
            log.push(format!("{name} ends"));
            name
        }
        .boxed()
    }

    fn keys(names: &[&'static str]) -> Vec<Bytes> {
        names
            .iter()
            .map(|k| Bytes::from_static(k.as_bytes()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn outputs_come_in_request_order_when_later_requests_finish_first() {
        let mut pipeline = Pipeline::<(&'static str, tokio::time::Instant), ()>::new();
        for (name, ms) in [("a", 30), ("b", 10), ("c", 20)] {
            pipeline.start(keys(&[name]), async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (name, tokio::time::Instant::now())
            });
        }
        let began = tokio::time::Instant::now();
        let mut outputs = Vec::new();
        while let Some((name, at)) = pipeline.next().await {
            outputs.push((name, (at - began).as_millis()));
        }
        // Each finished when its own sleep ended (they ran at once), and came out in order.
        assert_eq!(outputs, [("a", 30), ("b", 10), ("c", 20)]);
        assert!(pipeline.is_empty());
    }

    #[tokio::test]
    async fn later_outputs_wait_for_an_earlier_one_still_running() {
        let log = Log::default();
        let mut pipeline = Pipeline::<&'static str, &'static str>::new();
        let (release_a, a) = oneshot::channel();
        let (release_b, b) = oneshot::channel();
        pipeline.start(keys(&["ka"]), gated(&log, "a", a));
        pipeline.start(keys(&["kb"]), gated(&log, "b", b));
        release_b.send(()).unwrap();
        // ready() polls once: every request that can run gets as far as it can.
        assert_eq!(pipeline.ready(), None, "b is done, but a is not");
        assert_eq!(log.events(), ["a starts", "b starts", "b ends"]);
        release_a.send(()).unwrap();
        assert_eq!(pipeline.next().await, Some("a"));
        assert_eq!(pipeline.ready(), Some("b"), "b was already done");
        assert_eq!(pipeline.next().await, None);
    }

    #[tokio::test]
    async fn two_requests_on_one_key_run_in_order() {
        let log = Log::default();
        let mut pipeline = Pipeline::<&'static str, &'static str>::new();
        let (release_first, first) = oneshot::channel();
        let (release_second, second) = oneshot::channel();
        pipeline.start(keys(&["k"]), gated(&log, "first", first));
        // The second also touches another key: one shared key is enough to order them.
        pipeline.start(keys(&["other", "k"]), gated(&log, "second", second));
        release_second.send(()).unwrap();
        assert_eq!(pipeline.ready(), None);
        assert_eq!(log.events(), ["first starts"], "second waits for first");
        release_first.send(()).unwrap();
        assert_eq!(pipeline.next().await, Some("first"));
        assert_eq!(pipeline.next().await, Some("second"));
        assert_eq!(
            log.events(),
            ["first starts", "first ends", "second starts", "second ends"]
        );
    }

    #[tokio::test]
    async fn a_key_is_ordered_behind_its_last_holder_only() {
        let log = Log::default();
        let mut pipeline = Pipeline::<&'static str, &'static str>::new();
        let (release_one, one) = oneshot::channel();
        let (release_two, two) = oneshot::channel();
        let (release_three, three) = oneshot::channel();
        pipeline.start(keys(&["k"]), gated(&log, "one", one));
        pipeline.start(keys(&["k"]), gated(&log, "two", two));
        pipeline.start(keys(&["k"]), gated(&log, "three", three));
        release_three.send(()).unwrap();
        release_two.send(()).unwrap();
        assert_eq!(pipeline.ready(), None);
        assert_eq!(log.events(), ["one starts"]);
        release_one.send(()).unwrap();
        for name in ["one", "two", "three"] {
            assert_eq!(pipeline.next().await, Some(name));
        }
        let starts: Vec<String> = log
            .events()
            .into_iter()
            .filter(|e| e.ends_with("starts"))
            .collect();
        assert_eq!(starts, ["one starts", "two starts", "three starts"]);
        assert!(pipeline.key_tails.is_empty(), "finished keys are forgotten");
    }

    #[tokio::test]
    async fn requests_on_different_keys_run_concurrently() {
        let log = Log::default();
        let mut pipeline = Pipeline::<&'static str, &'static str>::new();
        let (release_a, a) = oneshot::channel();
        let (release_b, b) = oneshot::channel();
        let (release_c, c) = oneshot::channel();
        pipeline.start(keys(&["ka"]), gated(&log, "a", a));
        pipeline.start(keys(&["kb"]), gated(&log, "b", b));
        pipeline.start(Vec::new(), gated(&log, "c", c));
        assert_eq!(pipeline.ready(), None);
        assert_eq!(
            log.events(),
            ["a starts", "b starts", "c starts"],
            "all three run before any finishes"
        );
        release_c.send(()).unwrap();
        release_b.send(()).unwrap();
        release_a.send(()).unwrap();
        for name in ["a", "b", "c"] {
            assert_eq!(pipeline.next().await, Some(name));
        }
    }

    #[tokio::test]
    async fn a_barrier_waits_for_everything_before_it() {
        let log = Log::default();
        let mut pipeline = Pipeline::<&'static str, &'static str>::new();
        let (release_a, a) = oneshot::channel();
        let (release_b, b) = oneshot::channel();
        pipeline.start(keys(&["ka"]), gated(&log, "a", a));
        pipeline.start(keys(&["kb"]), gated(&log, "b", b));
        assert!(pipeline.has_room());
        pipeline.hold("flush_all");
        assert!(pipeline.holds_barrier());
        assert!(!pipeline.has_room(), "nothing starts behind a barrier");
        assert_eq!(pipeline.take_barrier(), None);
        release_b.send(()).unwrap();
        assert_eq!(pipeline.ready(), None);
        assert_eq!(pipeline.take_barrier(), None, "a is still running");
        release_a.send(()).unwrap();
        assert_eq!(pipeline.next().await, Some("a"));
        assert_eq!(pipeline.take_barrier(), None, "b is done but not yet taken");
        assert_eq!(pipeline.next().await, Some("b"));
        assert_eq!(pipeline.take_barrier(), Some("flush_all"));
        assert!(pipeline.has_room() && !pipeline.holds_barrier());
    }

    #[test]
    fn the_pipeline_is_full_at_its_depth() {
        let mut pipeline = Pipeline::<(), ()>::new();
        for _ in 0..MAX_PIPELINE_DEPTH {
            assert!(pipeline.has_room());
            pipeline.start(Vec::new(), futures::future::pending::<()>());
        }
        assert!(!pipeline.has_room());
        assert_eq!(pipeline.running.len(), MAX_PIPELINE_DEPTH);
    }
}
