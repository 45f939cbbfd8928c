//! Replicas as one cache: after every write through this replica that may have changed the
//! bucket, its peers are told what changed, and drop what they hold of it.
//!
//! - **Who.** `peers` names the other replicas' peer listeners (`host:port`, DNS names
//!   re-resolved every [`RESOLVE_EVERY`], as a headless service or a compose service with
//!   several replicas gives). Each address is a link; a link that reaches this replica
//!   itself (it learns so from the listener's hello) is left alone.
//! - **What.** The tier announces each write, delete, touch and control write (the flush
//!   epoch) through a bounded queue ([`QUEUE_LEN`]; full: dropped and counted); one task
//!   batches what is queued and hands the batch to every link that is up ([`link`]), each
//!   holding at most [`LINK_QUEUE_LEN`] batches (the batches' bytes are shared by links). A peer's
//!   listener ([`listen`]) checks the batch's HMAC, drops each key from RAM and disk unless
//!   what it holds already has that write in its history (so an old message never removes a
//!   newer entry), re-reads the flush epoch when it changed, and acknowledges.
//! - **Delivery is not trusted.** A lost, late or reordered message leaves the window as the
//!   bound on staleness. The tier serves entries for the longer `peer_revalidate_after_ms`
//!   window only while this replica hears from as many peers as it has links, each within
//!   [`ACK_WITHIN`] (an idle link sends an empty batch every [`HEARTBEAT`]), and every link
//!   is up; otherwise for `revalidate_after_ms`. Batches are numbered (one sequence per
//!   sender, shared by its links, and a heartbeat carries the last number): a number skipped
//!   means a batch never arrived, and every entry is revalidated once, as it is each time
//!   the long window comes back.
//!
//! Frames are in [`wire`]; framing is tokio-util's length-delimited codec.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::flush::Flush;
use crate::stats::Stats;
use crate::tier::{Announce, Tiered};
use wire::Change;

mod link;
mod listen;
pub mod wire;

/// Changes waiting to be sent, at most.
pub const QUEUE_LEN: usize = 65_536;
/// Batches waiting on one link, at most.
const LINK_QUEUE_LEN: usize = 64;
/// How often peer names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// An idle link sends an empty batch this often, so its peer's silence is noticed.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A link whose last acknowledgement is older than this no longer vouches for its peer.
pub const ACK_WITHIN: Duration = Duration::from_secs(2);
/// A sender not heard from for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How often the window is set from the links' state.
const WINDOW_EVERY: Duration = Duration::from_millis(100);

/// Peer settings, from the configuration.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// The peers' listeners, `host:port`.
    pub peers: Vec<String>,
    /// Where this replica's listener binds, if it runs one.
    pub listen: Option<SocketAddr>,
    /// The shared secret every batch is signed with, if any.
    pub secret: Option<Vec<u8>>,
    /// The window while some peer does not vouch (`revalidate_after_ms`).
    pub short: Duration,
    /// The window while every peer vouches (`peer_revalidate_after_ms`).
    pub long: Duration,
}

/// One link's state, shared by its task, the batcher and `stats peers`.
struct LinkState {
    /// Connected, and its peer is not this replica.
    up: AtomicBool,
    /// Its peer is this replica: nothing is sent.
    itself: AtomicBool,
    /// When its peer last acknowledged a batch.
    last_ack: Mutex<Option<Instant>>,
    /// Batches for it.
    frames: mpsc::Sender<Outgoing>,
}

/// A batch on its way to one peer.
struct Outgoing {
    frame: Bytes,
    /// Its sequence number, which the ack names.
    seq: u64,
    /// How many changes it holds.
    changes: u64,
}

impl LinkState {
    fn vouches(&self, now: Instant) -> bool {
        let acked = *self.last_ack.lock().unwrap_or_else(|e| e.into_inner());
        self.up.load(Relaxed) && acked.is_some_and(|at| now.duration_since(at) < ACK_WITHIN)
    }
}

struct Link {
    state: Arc<LinkState>,
    task: JoinHandle<()>,
}

/// This replica's side of the peer protocol.
pub struct Peers {
    /// Chosen at random at start: how a replica recognises itself behind a shared name.
    instance: u64,
    settings: PeerSettings,
    queue: mpsc::Sender<Change>,
    links: Mutex<HashMap<SocketAddr, Link>>,
    /// How many links there are: with none, nothing is queued.
    link_count: AtomicU64,
    /// The listener's address, once bound.
    listening: Option<SocketAddr>,
    tier: Arc<Tiered>,
    flush: Arc<Flush>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    /// Sequence number of the last batch sent.
    seq: AtomicU64,
    /// Each sender heard from: when last, and the last sequence number it sent.
    heard: Mutex<HashMap<u64, (Instant, u64)>>,
}

impl Peers {
    /// Binds the listener (if any), hooks into the tier and starts the tasks.
    pub async fn start(
        settings: PeerSettings,
        tier: Arc<Tiered>,
        flush: Arc<Flush>,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Arc<Peers>> {
        let listener = match settings.listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
            None => None,
        };
        let listening = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let (queue, changes) = mpsc::channel(QUEUE_LEN);
        let peers = Arc::new(Peers {
            instance: rand::random(),
            settings,
            queue,
            links: Mutex::new(HashMap::new()),
            link_count: AtomicU64::new(0),
            listening,
            tier,
            flush,
            stats,
            shutdown: shutdown.clone(),
            seq: AtomicU64::new(0),
            heard: Mutex::new(HashMap::new()),
        });
        let announce: std::sync::Weak<Peers> = Arc::downgrade(&peers);
        peers.tier.announce_to(announce);
        if let Some(listener) = listener {
            tokio::spawn(listen::serve(listener, peers.clone()));
        }
        tokio::spawn(peers.clone().batch(changes));
        tokio::spawn(peers.clone().resolve_names());
        tokio::spawn(peers.clone().set_window());
        Ok(peers)
    }

    /// Where the listener listens, if it runs.
    pub fn listening(&self) -> Option<SocketAddr> {
        self.listening
    }

    /// Sets the links to exactly `addrs` (what resolving `peers` gave): new ones start,
    /// gone ones stop.
    pub fn set_addresses(self: &Arc<Self>, addrs: &[SocketAddr]) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|addr, link| {
            let keep = addrs.contains(addr);
            if !keep {
                link.task.abort();
            }
            keep
        });
        for addr in addrs {
            if links.contains_key(addr) {
                continue;
            }
            let (frames, queued) = mpsc::channel(LINK_QUEUE_LEN);
            let state = Arc::new(LinkState {
                up: AtomicBool::new(false),
                itself: AtomicBool::new(false),
                last_ack: Mutex::new(None),
                frames,
            });
            let task = tokio::spawn(link::run(*addr, state.clone(), queued, self.clone()));
            links.insert(*addr, Link { state, task });
        }
        self.link_count.store(links.len() as u64, Relaxed);
    }

    /// Queues a change for every peer; a full queue drops it (counted).
    fn send(&self, change: Change) {
        if self.link_count.load(Relaxed) == 0 {
            return;
        }
        if self.queue.try_send(change).is_err() {
            Stats::incr(&self.stats.peer_invalidations_dropped);
        }
    }

    /// Takes what is queued, a batch at a time, and hands each batch to every link up.
    async fn batch(self: Arc<Self>, mut changes: mpsc::Receiver<Change>) {
        let secret = self.settings.secret.clone();
        let mut batch = Vec::with_capacity(wire::MAX_BATCH);
        loop {
            tokio::select! {
                n = changes.recv_many(&mut batch, wire::MAX_BATCH) => if n == 0 { return },
                () = self.shutdown.cancelled() => return,
            }
            let seq = self.seq.fetch_add(1, Relaxed) + 1;
            let frame = wire::encode_batch(self.instance, seq, &batch, secret.as_deref());
            let n = batch.len() as u64;
            batch.clear();
            let links: Vec<Arc<LinkState>> = {
                let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
                links.values().map(|l| l.state.clone()).collect()
            };
            for link in links.iter().filter(|l| !l.itself.load(Relaxed)) {
                let outgoing = Outgoing {
                    frame: frame.clone(),
                    seq,
                    changes: n,
                };
                let queued = link.up.load(Relaxed) && link.frames.try_send(outgoing).is_ok();
                if !queued {
                    Stats::add(&self.stats.peer_invalidations_dropped, n);
                }
            }
        }
    }

    /// Resolves `peers` now and every [`RESOLVE_EVERY`], or every second while some name
    /// does not resolve (replicas starting together register their names one after the
    /// other); a name that does not resolve keeps the addresses it had.
    async fn resolve_names(self: Arc<Self>) {
        if self.settings.peers.is_empty() {
            return;
        }
        let mut known: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        let mut pause = Duration::ZERO;
        loop {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.shutdown.cancelled() => return,
            }
            pause = RESOLVE_EVERY;
            for name in &self.settings.peers {
                match tokio::net::lookup_host(name.as_str()).await {
                    Ok(found) => {
                        known.insert(name.clone(), found.collect());
                    }
                    Err(e) => {
                        tracing::debug!(peer = %name, cause = %e, "cannot resolve a peer yet");
                        pause = Duration::from_secs(1);
                    }
                }
            }
            let mut addrs: Vec<SocketAddr> = known.values().flatten().copied().collect();
            addrs.sort_unstable();
            addrs.dedup();
            self.set_addresses(&addrs);
        }
    }

    /// Sets the tier's window from the links: long while every one vouches, else short.
    async fn set_window(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WINDOW_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let (mut configured, mut up, mut all_vouch) = (0u64, 0, true);
            let mut rows = Vec::new();
            {
                let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
                for (addr, link) in links.iter() {
                    let state = &link.state;
                    let what = if state.itself.load(Relaxed) {
                        "self"
                    } else {
                        configured += 1;
                        let vouches = state.vouches(now);
                        all_vouch &= vouches;
                        if state.up.load(Relaxed) {
                            up += 1;
                        }
                        match (state.up.load(Relaxed), vouches) {
                            (true, true) => "up",
                            (true, false) => "silent",
                            (false, _) => "down",
                        }
                    };
                    rows.push((format!("peer:{addr}"), what.to_owned()));
                }
            }
            rows.sort();
            let heard = {
                let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
                // A sender silent this long is gone (a peer restarts as a new instance).
                heard.retain(|_, (at, _)| now.duration_since(*at) < FORGET_AFTER);
                let recent = heard
                    .values()
                    .filter(|(at, _)| now.duration_since(*at) < ACK_WITHIN);
                recent.count() as u64
            };
            let long = configured > 0 && all_vouch && heard >= configured;
            if long && self.tier.window() < self.settings.long {
                // What was checked while some peer was not heard may have changed unseen.
                self.tier.revalidate_all();
            }
            let window = if long {
                self.settings.long
            } else {
                self.settings.short
            };
            self.tier.set_window(window);
            self.stats.peers_configured.store(configured, Relaxed);
            self.stats.peers_up.store(up, Relaxed);
            self.stats
                .tier_window_ms
                .store(self.tier.window().as_millis() as u64, Relaxed);
            *self.stats.peers.lock().unwrap_or_else(|e| e.into_inner()) = rows;
        }
    }

    /// Notes batch `seq` from `sender` (a heartbeat when it has no changes, carrying the
    /// last number sent); a number skipped means a batch was lost: every entry is
    /// revalidated once.
    fn heard(&self, sender: u64, seq: u64, heartbeat: bool) {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let last = heard.insert(sender, (now, seq)).map(|(_, last)| last);
        let lost = match last {
            Some(last) if heartbeat => seq > last,
            Some(last) => seq > last + 1,
            None => false,
        };
        if let Some(last) = last.filter(|last| *last > seq) {
            heard.insert(sender, (now, last));
        }
        if lost {
            drop(heard);
            self.tier.revalidate_all();
        }
    }

    /// Applies a batch from a peer, counting what it received and what it dropped.
    async fn apply(&self, batch: wire::Batch) {
        self.heard(batch.sender, batch.seq, batch.changes.is_empty());
        let changes = batch.changes;
        Stats::add(
            &self.stats.peer_invalidations_received,
            changes.len() as u64,
        );
        for change in changes {
            let applied = match change {
                Change::Item { key, write } => self.tier.invalidate(&key, write),
                Change::Control { name } if name == crate::flush::FLUSH_OBJECT => {
                    // A task of its own: an S3 read under the listener's future is deep.
                    let flush = self.flush.clone();
                    let read = tokio::spawn(async move { flush.refresh().await });
                    if let Ok(Err(e)) = read.await {
                        tracing::warn!(cause = %e, "cannot re-read the flush epoch a peer wrote");
                    }
                    true
                }
                Change::Control { .. } => false,
            };
            if applied {
                Stats::incr(&self.stats.peer_invalidations_applied);
            }
        }
    }
}

impl Announce for Peers {
    fn item(&self, key: &[u8], write: Option<u64>) {
        let key = Bytes::copy_from_slice(key);
        self.send(Change::Item { key, write });
    }

    fn control(&self, name: &str) {
        self.send(Change::Control { name: name.into() });
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let links = self.links.get_mut().unwrap_or_else(|e| e.into_inner());
        for link in links.values() {
            link.task.abort();
        }
    }
}
