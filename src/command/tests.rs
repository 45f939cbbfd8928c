//! Command semantics against the memory store, with paused time for TTLs.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::*;
use crate::culler::WriteHint;
use crate::protocol::{parse, Limits};
use crate::store::memory::MemoryStore;
use crate::store::test_utils::Layer;
use crate::store::{PutMode, Store};
use std::sync::atomic::Ordering::Relaxed;

async fn ctx() -> Ctx {
    ctx_over(Arc::new(MemoryStore::new())).await
}

async fn ctx_over(backend: Arc<dyn Store>) -> Ctx {
    ctx_with_flush_window(backend, Duration::ZERO).await
}

/// A context whose flush epoch is re-read once per `window` (zero: on every read).
async fn ctx_with_flush_window(backend: Arc<dyn Store>, window: Duration) -> Ctx {
    // The near tier is on, as in production: single-node semantics must not change.
    let stats = Arc::new(Stats::default());
    let tier = crate::tier::TierConfig {
        ram_bytes: 1 << 20,
        revalidate_after: Duration::from_secs(1),
        longest: Duration::from_secs(1),
        stream_above: usize::MAX,
    };
    let store = Arc::new(Tiered::new(backend, tier, stats.clone()));
    let flush = Arc::new(Flush::load(store.clone(), window).await.unwrap());
    Ctx::new(
        store,
        flush,
        stats,
        Clock::tokio(),
        Settings::default(),
        Arc::new(WriteHint::new(0)),
    )
}

/// Sends wire text, returns the wire replies.
async fn run(ctx: &Ctx, input: &str) -> String {
    let mut buf = input.as_bytes();
    let mut out = BytesMut::new();
    while let Some(parsed) = parse(buf, &Limits::default()) {
        buf = &buf[parsed.consumed..];
        execute(ctx, parsed.request).await.encode(&mut out);
    }
    String::from_utf8(out.to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn set_get_delete() {
    let c = ctx().await;
    assert_eq!(run(&c, "set k 7 0 2\r\nhi\r\n").await, "STORED\r\n");
    assert_eq!(
        run(&c, "get k nope\r\n").await,
        "VALUE k 7 2\r\nhi\r\nEND\r\n"
    );
    assert_eq!(run(&c, "delete k\r\n").await, "DELETED\r\n");
    assert_eq!(run(&c, "delete k\r\n").await, "NOT_FOUND\r\n");
    assert_eq!(run(&c, "get k\r\n").await, "END\r\n");
}

#[tokio::test(start_paused = true)]
async fn add_replace_append_prepend() {
    let c = ctx().await;
    assert_eq!(run(&c, "replace k 0 0 1\r\na\r\n").await, "NOT_STORED\r\n");
    assert_eq!(run(&c, "append k 0 0 1\r\na\r\n").await, "NOT_STORED\r\n");
    assert_eq!(run(&c, "add k 3 0 1\r\nb\r\n").await, "STORED\r\n");
    assert_eq!(run(&c, "add k 0 0 1\r\nc\r\n").await, "NOT_STORED\r\n");
    assert_eq!(run(&c, "append k 9 0 1\r\n>\r\n").await, "STORED\r\n");
    assert_eq!(run(&c, "prepend k 9 0 1\r\n<\r\n").await, "STORED\r\n");
    assert_eq!(run(&c, "get k\r\n").await, "VALUE k 3 3\r\n<b>\r\nEND\r\n");
    assert_eq!(run(&c, "replace k 4 0 1\r\nz\r\n").await, "STORED\r\n");
    assert_eq!(run(&c, "get k\r\n").await, "VALUE k 4 1\r\nz\r\nEND\r\n");
}

fn cas_of(reply: &str) -> u64 {
    reply.split_whitespace().nth(4).unwrap().parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn cas_tokens_change_on_every_mutation() {
    let c = ctx().await;
    assert_eq!(run(&c, "cas k 0 0 1 1\r\na\r\n").await, "NOT_FOUND\r\n");
    run(&c, "set k 0 0 1\r\na\r\n").await;
    let first = cas_of(&run(&c, "gets k\r\n").await);
    assert_eq!(
        run(&c, &format!("cas k 0 0 1 {}\r\nb\r\n", first + 1)).await,
        "EXISTS\r\n"
    );
    assert_eq!(
        run(&c, &format!("cas k 0 0 1 {first}\r\nb\r\n")).await,
        "STORED\r\n"
    );
    let second = cas_of(&run(&c, "gets k\r\n").await);
    assert_ne!(first, second);
    assert_eq!(
        run(&c, &format!("cas k 0 0 1 {first}\r\nc\r\n")).await,
        "EXISTS\r\n"
    );
    run(&c, "append k 0 0 1\r\nx\r\n").await;
    assert_ne!(cas_of(&run(&c, "gets k\r\n").await), second);
}

#[tokio::test(start_paused = true)]
async fn incr_decr_rules() {
    let c = ctx().await;
    assert_eq!(run(&c, "incr n 1\r\n").await, "NOT_FOUND\r\n");
    run(&c, "set n 5 0 20\r\n18446744073709551615\r\n").await;
    assert_eq!(run(&c, "incr n 2\r\n").await, "1\r\n", "wraps at 2^64");
    assert_eq!(run(&c, "decr n 5\r\n").await, "0\r\n", "stops at 0");
    assert_eq!(
        run(&c, "get n\r\n").await,
        "VALUE n 5 20\r\n0                   \r\nEND\r\n",
        "flags kept; padded to the old length in place, as memcached does"
    );
    run(&c, "set t 0 0 2\r\nab\r\n").await;
    assert_eq!(
        run(&c, "incr t 1\r\n").await,
        "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    );
    assert_eq!(
        run(&c, "incr n x\r\n").await,
        "CLIENT_ERROR invalid numeric delta argument\r\n"
    );
}

#[tokio::test(start_paused = true)]
async fn ttls_expire_with_time() {
    let c = ctx().await;
    run(&c, "set a 0 2 1\r\na\r\n").await;
    run(&c, "set never 0 0 1\r\nn\r\n").await;
    run(&c, "set gone 0 -1 1\r\ng\r\n").await;
    assert_eq!(
        run(&c, "get gone\r\n").await,
        "END\r\n",
        "negative exptime: already expired"
    );
    assert_eq!(run(&c, "get a\r\n").await, "VALUE a 0 1\r\na\r\nEND\r\n");
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(run(&c, "get a\r\n").await, "END\r\n");
    assert_eq!(run(&c, "touch a 10\r\n").await, "NOT_FOUND\r\n");
    assert_eq!(
        run(&c, "get never\r\n").await,
        "VALUE never 0 1\r\nn\r\nEND\r\n"
    );
    // touch and gat move the expiry.
    assert_eq!(run(&c, "touch never 5\r\n").await, "TOUCHED\r\n");
    assert_eq!(
        run(&c, "gat 100 never\r\n").await,
        "VALUE never 0 1\r\nn\r\nEND\r\n"
    );
    tokio::time::advance(Duration::from_secs(50)).await;
    assert_eq!(
        run(&c, "get never\r\n").await,
        "VALUE never 0 1\r\nn\r\nEND\r\n"
    );
    tokio::time::advance(Duration::from_secs(51)).await;
    assert_eq!(run(&c, "get never\r\n").await, "END\r\n");
    // An absolute Unix time in the past is expired.
    run(&c, "set abs 0 2592001 1\r\nx\r\n").await;
    assert_eq!(run(&c, "get abs\r\n").await, "END\r\n");
}

#[tokio::test(start_paused = true)]
async fn flush_all_now_and_later() {
    let c = ctx().await;
    run(&c, "set a 0 0 1\r\na\r\n").await;
    assert_eq!(run(&c, "flush_all 10\r\n").await, "OK\r\n");
    assert_eq!(
        run(&c, "get a\r\n").await,
        "VALUE a 0 1\r\na\r\nEND\r\n",
        "not yet"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(run(&c, "get a\r\n").await, "END\r\n");
    run(&c, "set b 0 0 1\r\nb\r\n").await;
    assert_eq!(
        run(&c, "get b\r\n").await,
        "VALUE b 0 1\r\nb\r\nEND\r\n",
        "later sets survive"
    );
    assert_eq!(run(&c, "flush_all noreply\r\n").await, "");
    assert_eq!(run(&c, "get b\r\n").await, "END\r\n");
}

#[tokio::test(start_paused = true)]
async fn flush_can_be_disabled() {
    let mut c = ctx().await;
    c.settings.flush_enabled = false;
    assert_eq!(
        run(&c, "flush_all\r\n").await,
        "CLIENT_ERROR flush_all not allowed\r\n"
    );
}

#[tokio::test(start_paused = true)]
async fn too_large_set_removes_the_old_item() {
    let c = ctx().await;
    run(&c, "set k 0 0 1\r\na\r\n").await;
    let r = execute(
        &c,
        Request::TooLarge {
            key: Bytes::from("k"),
            remove_old: true,
            noreply: false,
        },
    )
    .await;
    let mut out = BytesMut::new();
    r.encode(&mut out);
    assert_eq!(&out[..], b"SERVER_ERROR object too large for cache\r\n");
    assert_eq!(run(&c, "get k\r\n").await, "END\r\n");
}

#[tokio::test(start_paused = true)]
async fn noreply_suppresses_replies_and_errors() {
    // As memcached 1.6: an error of a command that carries noreply is not sent either.
    let c = ctx().await;
    assert_eq!(run(&c, "set k 0 0 1 noreply\r\na\r\n").await, "");
    assert_eq!(run(&c, "incr k 1 noreply\r\n").await, "");
    assert_eq!(
        run(&c, "incr k 1\r\n").await,
        "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    );
    assert_eq!(run(&c, "delete k noreply\r\n").await, "");
    assert_eq!(run(&c, "get k\r\n").await, "END\r\n");
}

#[tokio::test(start_paused = true)]
async fn stats_count_hits_and_reset() {
    let c = ctx().await;
    run(&c, "set k 0 0 1\r\na\r\nget k\r\nget missing\r\n").await;
    let stats = run(&c, "stats\r\n").await;
    assert!(stats.contains("STAT get_hits 1\r\n"), "{stats}");
    assert!(stats.contains("STAT get_misses 1\r\n"));
    assert!(stats.contains("STAT cmd_set 1\r\n"));
    assert!(stats.ends_with("END\r\n"));
    assert_eq!(run(&c, "stats reset\r\n").await, "RESET\r\n");
    assert!(run(&c, "stats\r\n").await.contains("STAT get_hits 0\r\n"));
    assert_eq!(run(&c, "stats nonsense\r\n").await, "ERROR\r\n");
}

#[tokio::test(start_paused = true)]
async fn concurrent_incrs_on_one_key_all_count() {
    let c = Arc::new(ctx().await);
    run(&c, "set n 0 0 1\r\n0\r\n").await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { run(&c, "incr n 1\r\n").await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(run(&c, "get n\r\n").await, "VALUE n 0 2\r\n50\r\nEND\r\n");
}

#[tokio::test(start_paused = true)]
async fn cas_uniques_chain_and_fit_32_bits() {
    let c = ctx().await;
    run(&c, "set k 0 0 1\r\n1\r\n").await;
    let first = cas_of(&run(&c, "gets k\r\n").await);
    assert!(first > 0 && first <= u64::from(u32::MAX));
    run(&c, "incr k 1\r\n").await;
    assert_eq!(cas_of(&run(&c, "gets k\r\n").await), first % MAX_CAS + 1);
    let old = Entry {
        cas: MAX_CAS,
        ..Entry::default()
    };
    assert_eq!(c.next_cas(Some(&old)), 1, "wraps, never 0");
}

#[tokio::test(start_paused = true)]
async fn oversized_retrieval_replies_are_refused_as_memcached_does() {
    let c = ctx().await;
    let value = Bytes::from(vec![b'x'; 1024 * 1024]);
    let count = MAX_RESPONSE_BYTES / value.len() + 1;
    for i in 0..count {
        let entry = Entry {
            key: Bytes::from(format!("k{i}")),
            value: value.clone(),
            stored_at_us: c.clock.now_us(),
            ..Entry::default()
        };
        c.store.put(&entry, PutMode::Overwrite).await.unwrap();
    }
    let keys: Vec<String> = (0..count).map(|i| format!("k{i}")).collect();
    assert_eq!(
        run(&c, &format!("get {}\r\n", keys.join(" "))).await,
        "SERVER_ERROR out of memory writing get response\r\n"
    );
    let fewer = &keys[..count - 2];
    assert!(run(&c, &format!("get {}\r\n", fewer.join(" ")))
        .await
        .ends_with("END\r\n"));
}

/// A memory store on which another writer wins the next `losses` conditional writes
/// (puts over a version, conditional deletes) just before they land.
struct Racing {
    inner: MemoryStore,
    losses: std::sync::atomic::AtomicUsize,
}

impl Racing {
    fn new(losses: usize) -> Arc<Self> {
        Arc::new(Racing {
            inner: MemoryStore::new(),
            losses: losses.into(),
        })
    }

    fn loses(&self) -> bool {
        self.losses
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[async_trait::async_trait]
impl Layer for Racing {
    fn inner(&self) -> &MemoryStore {
        &self.inner
    }
    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<crate::store::Version, StoreError> {
        if matches!(mode, PutMode::Update(_)) && self.loses() {
            return Err(StoreError::Changed);
        }
        self.inner.put(entry, mode).await
    }
    async fn delete(
        &self,
        key: &[u8],
        version: Option<&crate::store::Version>,
    ) -> Result<bool, StoreError> {
        if version.is_some() && self.loses() {
            return Err(StoreError::Changed);
        }
        self.inner.delete(key, version).await
    }
}

fn counter(c: &Ctx, name: &str) -> u64 {
    let snapshot = c.stats.snapshot();
    snapshot.iter().find(|(n, _)| *n == name).unwrap().1
}

#[tokio::test(start_paused = true)]
async fn every_conditional_write_retries_under_one_counted_policy() {
    // Each command loses its first two races; the policy retries it and counts each retry.
    let cases = [
        ("incr n 1\r\n", "2\r\n"),
        ("touch n 100\r\n", "TOUCHED\r\n"),
        ("mg n T30 t v\r\n", "VA 1 t30\r\n1\r\n"),
        ("md n I\r\n", "HD\r\n"),
        ("delete n\r\n", "DELETED\r\n"),
    ];
    for (command, reply) in cases {
        let store = Racing::new(0);
        let c = ctx_over(store.clone()).await;
        assert_eq!(run(&c, "set n 0 0 1\r\n1\r\n").await, "STORED\r\n");
        store.losses.store(2, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(run(&c, command).await, reply, "{command}");
        assert_eq!(counter(&c, "backend_retries"), 2, "{command}");
        assert_eq!(counter(&c, "backend_retries_exhausted"), 0, "{command}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_write_that_always_loses_gives_up_after_the_policy_s_attempts() {
    let store = Racing::new(0);
    let c = ctx_over(store.clone()).await;
    run(&c, "set k 0 0 1\r\na\r\n").await;
    store
        .losses
        .store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
    let begun = tokio::time::Instant::now();
    assert_eq!(
        run(&c, "append k 0 0 1\r\nb\r\n").await,
        "SERVER_ERROR too much contention on key\r\n"
    );
    let retries = item::RETRY.max_attempts as u64 - 1;
    assert_eq!(counter(&c, "backend_retries"), retries);
    assert_eq!(counter(&c, "backend_retries_exhausted"), 1);
    let most = Duration::from_millis(item::RETRY.max_backoff_ms) * retries as u32;
    assert!(begun.elapsed() <= most, "pauses are bounded");
    assert_eq!(run(&c, "get k\r\n").await, "VALUE k 0 1\r\na\r\nEND\r\n");
}

#[tokio::test]
async fn cache_memlimit_resizes_the_ram_tier_within_memcacheds_bounds() {
    let c = ctx().await;
    let too_small = "MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n";
    assert_eq!(run(&c, "cache_memlimit 7\r\n").await, too_small);
    assert_eq!(run(&c, "cache_memlimit 4294967296\r\n").await, too_small);
    assert_eq!(
        run(&c, "cache_memlimit 1000000001\r\n").await,
        "MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"
    );
    assert_eq!(c.store.ram_bytes(), 1 << 20, "refusals change nothing");
    assert_eq!(run(&c, "cache_memlimit 50\r\n").await, "OK\r\n");
    assert_eq!(c.store.ram_bytes(), 50 << 20);
    assert_eq!(run(&c, "cache_memlimit 9 noreply\r\n").await, "");
    assert_eq!(c.store.ram_bytes(), 9 << 20);
    assert_eq!(
        run(&c, "cache_memlimit 7 noreply\r\nmn\r\n").await,
        "MN\r\n"
    );
}

#[tokio::test]
async fn cache_memlimit_cannot_turn_an_absent_ram_tier_on() {
    let stats = Arc::new(Stats::default());
    let off = crate::tier::TierConfig {
        ram_bytes: 0,
        revalidate_after: Duration::ZERO,
        longest: Duration::ZERO,
        stream_above: usize::MAX,
    };
    let store = Arc::new(Tiered::new(
        Arc::new(MemoryStore::new()),
        off,
        stats.clone(),
    ));
    let flush = Arc::new(Flush::load(store.clone(), Duration::ZERO).await.unwrap());
    let hint = Arc::new(WriteHint::new(0));
    let settings = Settings::default();
    let c = Ctx::new(store, flush, stats, Clock::tokio(), settings, hint);
    assert_eq!(
        run(&c, "cache_memlimit 64\r\n").await,
        "MEMLIMIT_ADJUST_FAILED out of bounds or unable to adjust\r\n"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_refused_unless_enabled_then_closes_and_asks_for_the_drain() {
    let mut c = ctx().await;
    assert_eq!(
        run(&c, "shutdown\r\nshutdown graceful\r\nshutdown noreply\r\n").await,
        "ERROR: shutdown not enabled\r\n".repeat(3)
    );
    assert!(!c.stop.is_cancelled());
    c.settings.shutdown_enabled = true;
    assert_eq!(
        run(&c, "shutdown x\r\n").await,
        "CLIENT_ERROR invalid shutdown mode\r\n"
    );
    assert!(!c.stop.is_cancelled());
    let request = parse(b"shutdown graceful\r\n", &Limits::default()).unwrap();
    assert_eq!(execute(&c, request.request).await, Response::Close);
    assert!(c.stop.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn verbosity_is_kept_up_to_memcacheds_highest_level() {
    let c = ctx().await;
    assert_eq!(run(&c, "verbosity 1\r\n").await, "OK\r\n");
    assert_eq!(c.verbosity.load(Relaxed), 1);
    assert_eq!(run(&c, "verbosity 99 noreply\r\n").await, "");
    assert_eq!(c.verbosity.load(Relaxed), 2);
    assert_eq!(run(&c, "slabs automove 1\r\n").await, "OK\r\n");
    assert_eq!(c.verbosity.load(Relaxed), 2);
}

/// Runs a dump to its end, following its pages; returns the pages' bytes and their count.
async fn dump_all(c: &Ctx, line: &str) -> (String, usize) {
    let mut request = parse(line.as_bytes(), &Limits::default()).unwrap().request;
    let mut out = BytesMut::new();
    for pages in 1.. {
        let response = execute(c, request).await;
        response.encode(&mut out);
        match response {
            Response::Dump {
                more: Some(next), ..
            } => request = *next,
            _ => return (String::from_utf8(out.to_vec()).unwrap(), pages),
        }
    }
    unreachable!()
}

#[tokio::test(start_paused = true)]
async fn metadump_and_mgdump_list_live_items_page_by_page() {
    let c = ctx().await;
    let now = c.clock.now_secs();
    run(&c, "set a 0 0 1\r\na\r\nset b%20c 5 100 3\r\nabc\r\n").await;
    run(&c, "set gone 0 1 1\r\na\r\n").await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let (dump, pages) = dump_all(&c, "lru_crawler metadump all\r\n").await;
    assert_eq!(pages, 1);
    let mut lines: Vec<&str> = dump.split_inclusive('\n').collect();
    assert_eq!(lines.pop(), Some("END\r\n"));
    lines.sort();
    assert_eq!(lines.len(), 2, "the expired item is left out: {dump}");
    assert!(lines[0].starts_with("key=a exp=-1 la="), "{dump}");
    let expires = format!("key=b%2520c exp={} la=", now + 100);
    assert!(lines[1].starts_with(&expires), "{dump}");
    assert!(lines[1].contains(" fetch=no cls=1 size="), "{dump}");
    let (mg, _) = dump_all(&c, "lru_crawler mgdump 1,2\r\n").await;
    let mut keys: Vec<&str> = mg.split_inclusive("\r\n").collect();
    assert_eq!(keys.pop(), Some("EN\r\n"));
    keys.sort();
    assert_eq!(keys, ["mg a\r\n", "mg b%20c\r\n"]);
    assert_eq!(dump_all(&c, "lru_crawler mgdump 2\r\n").await.0, "EN\r\n");
    // Many items come in pages of DUMP_PAGE_ITEMS; flushed ones are left out.
    run(&c, "flush_all\r\n").await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let n = dump::DUMP_PAGE_ITEMS * 2 + 10;
    for i in 0..n {
        run(&c, &format!("set k{i} 0 0 1\r\nv\r\n")).await;
    }
    let (mg, pages) = dump_all(&c, "lru_crawler mgdump all\r\n").await;
    assert_eq!(pages, 3);
    assert_eq!(mg.matches("\r\nmg ").count() + 1, n, "every item once");
    assert!(!mg.contains("mg a\r\n") && mg.ends_with("\r\nEN\r\n"));
}

#[tokio::test(start_paused = true)]
async fn the_crawler_turns_off_and_on_and_refuses_bad_classes() {
    let c = ctx().await;
    let reply = |line: &'static str| {
        let c = &c;
        async move { run(c, line).await }
    };
    assert_eq!(
        reply("lru_crawler metadump 0\r\n").await,
        "BADCLASS invalid class id\r\n"
    );
    assert_eq!(
        reply("lru_crawler crawl x\r\n").await,
        "BADCLASS invalid class id\r\n"
    );
    assert_eq!(
        reply("lru_crawler metadump ,\r\n").await,
        "NOTSTARTED no items to crawl\r\n"
    );
    assert_eq!(reply("lru_crawler crawl all\r\n").await, "OK\r\n");
    assert_eq!(reply("lru_crawler tocrawl 5\r\n").await, "OK\r\n");
    let running = "ERROR failed to start lru crawler thread\r\n";
    assert_eq!(reply("lru_crawler enable\r\n").await, running);
    assert_eq!(reply("lru_crawler disable\r\n").await, "OK\r\n");
    let disabled = "CLIENT_ERROR lru crawler disabled\r\n";
    assert_eq!(reply("lru_crawler metadump all\r\n").await, disabled);
    assert_eq!(reply("lru_crawler mgdump 0\r\n").await, disabled);
    assert_eq!(reply("lru_crawler crawl 1\r\n").await, disabled);
    assert_eq!(reply("lru_crawler enable\r\n").await, "OK\r\n");
    assert_eq!(reply("lru_crawler metadump all\r\n").await, "END\r\n");
}

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_dump_has_its_crawler_off_for_good() {
    // `Racing` forwards everything but `dump`, as a store without cheap listings answers.
    let c = ctx_over(Racing::new(0)).await;
    let disabled = "CLIENT_ERROR lru crawler disabled\r\n";
    assert_eq!(run(&c, "lru_crawler metadump all\r\n").await, disabled);
}

fn label_count(c: &Ctx, command: &'static str, result: &'static str) -> u64 {
    let labels = crate::metrics::CommandLabels { command, result };
    c.stats.timings.commands.get_or_create(&labels).get()
}

/// The `stats detail` counts of `prefix`: get, hit, set, delete.
fn detail_of(c: &Ctx, prefix: &[u8]) -> [u64; 4] {
    let dump = c.detail.dump();
    dump.iter()
        .find(|(p, _)| &p[..] == prefix)
        .map_or([0; 4], |(_, counts)| *counts)
}

/// A binary-protocol GET of `key`, decoded as the binary connection decodes it.
fn binary_get(key: &[u8]) -> Request {
    let mut frame = vec![0x80, 0x00];
    frame.extend_from_slice(&(key.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // extras, data type, vbucket
    frame.extend_from_slice(&(key.len() as u32).to_be_bytes());
    frame.extend_from_slice(&[0; 12]); // opaque, cas
    frame.extend_from_slice(key);
    let decoded = crate::protocol::binary::decode(&frame, &Limits::default(), false).unwrap();
    match decoded.frame.action {
        crate::protocol::binary::Action::Run(request) => request,
        _ => panic!("a GET runs"),
    }
}

#[tokio::test(start_paused = true)]
async fn one_get_path_counts_alike_whether_ram_or_the_store_answers() {
    let c = ctx_with_flush_window(Arc::new(MemoryStore::new()), Duration::from_secs(1)).await;
    run(&c, "stats detail on\r\n").await;
    assert_eq!(run(&c, "set p:k 0 0 1\r\nv\r\n").await, "STORED\r\n");
    let get = || Request::Get {
        keys: vec![Bytes::from_static(b"p:k")],
        cas: false,
        end: true,
    };
    // The near tier answers with no I/O...
    let fast = answer_from_tier(&c, &get(), Instant::now(), |_| true).expect("fresh in RAM");
    // ...and the same get through the store path (RAM answers inside Tiered::get).
    let slow = execute(&c, get()).await;
    assert_eq!(fast, slow);
    // A binary GET: a classic get in meta form.
    execute(&c, binary_get(b"p:k")).await;
    assert_eq!(counter(&c, "cmd_get"), 3);
    assert_eq!(counter(&c, "get_hits"), 3);
    assert_eq!(counter(&c, "tier_hits"), 3);
    assert_eq!(
        label_count(&c, "get", "hit"),
        3,
        "text and binary gets, either path"
    );
    assert_eq!(label_count(&c, "mg", "hit"), 0);
    assert_eq!(
        detail_of(&c, b"p")[..2],
        [3, 3],
        "get and hit counts of prefix p"
    );
    // A meta get counts as a get, not in `stats detail` (as memcached 1.6 counts it).
    assert_eq!(run(&c, "mg p:k v\r\n").await, "VA 1\r\nv\r\n");
    assert_eq!(counter(&c, "get_hits"), 4);
    assert_eq!(detail_of(&c, b"p")[..2], [3, 3]);
}

#[tokio::test(start_paused = true)]
async fn every_read_is_a_tier_hit_a_stale_entry_or_a_miss() {
    let c = ctx_with_flush_window(Arc::new(MemoryStore::new()), Duration::from_secs(1)).await;
    assert_eq!(run(&c, "set a 0 0 1\r\nv\r\n").await, "STORED\r\n");
    let get = |key: &'static [u8]| Request::Get {
        keys: vec![Bytes::from_static(key)],
        cas: false,
        end: true,
    };
    for _ in 0..3 {
        if answer_from_tier(&c, &get(b"a"), Instant::now(), |_| true).is_none() {
            execute(&c, get(b"a")).await;
        }
    }
    execute(&c, get(b"missing")).await;
    tokio::time::advance(Duration::from_secs(2)).await; // past the window: stale
    execute(&c, get(b"a")).await;
    execute(&c, get(b"a")).await; // revalidated just now: fresh again
    let reads = counter(&c, "cmd_get");
    assert_eq!(reads, 6);
    assert_eq!(counter(&c, "tier_stale"), 1);
    assert_eq!(counter(&c, "tier_misses"), 1);
    assert_eq!(
        counter(&c, "tier_hits") + counter(&c, "tier_stale") + counter(&c, "tier_misses"),
        reads
    );
}

/// A request's future is moved whole into the connection's box (and before that, from
/// frame to frame): each command's own future is boxed, so this one stays small whatever
/// the largest command needs.
#[tokio::test]
async fn a_request_future_stays_small() {
    let ctx = ctx().await;
    let set = Request::Store {
        mode: crate::protocol::StoreMode::Set,
        key: Bytes::from_static(b"k"),
        flags: 0,
        exptime: 0,
        data: Bytes::from_static(b"v"),
        cas_unique: 0,
        noreply: false,
    };
    let running = super::execute_arrived(&ctx, set, Instant::now());
    let size = std::mem::size_of_val(&running);
    assert!(size <= 256, "a request's future takes {size} bytes");
    assert_eq!(running.await, Response::Stored);
}
