//! Counters behind the `stats` command, named as memcached names them where one exists.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::metrics::Timings;
use crate::store::s3::S3Requests;

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Process-wide counters; all monotonic except where noted.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(pub $name: AtomicU64,)*
            /// Latency histograms and commands by kind and result (for `/metrics`).
            pub timings: Timings,
            /// S3 requests by price class, when the store is S3 (else `None`).
            pub s3: Option<Arc<S3Requests>>,
            /// Each peer link and its state (`stats peers`), kept current by `peers`.
            pub peers: std::sync::Mutex<Vec<(String, String)>>,
        }

        impl Stats {
            /// Name and value of every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                let mut rows = vec![$((stringify!($name), self.$name.load(Relaxed)),)*];
                if let Some(s3) = &self.s3 {
                    rows.extend(s3.snapshot());
                }
                rows
            }

            /// `stats reset`: zero every counter except gauges.
            pub fn reset(&self) {
                $(if !GAUGES.contains(&stringify!($name)) { self.$name.store(0, Relaxed); })*
                if let Some(s3) = &self.s3 {
                    s3.reset();
                }
            }
        }
    };
}

counters!(
    curr_connections,
    total_connections,
    rejected_connections,
    tls_handshakes_dropped,
    accept_errors,
    cmd_get,
    cmd_set,
    cmd_flush,
    cmd_touch,
    get_hits,
    get_misses,
    get_expired,
    get_flushed,
    delete_misses,
    delete_hits,
    incr_misses,
    incr_hits,
    decr_misses,
    decr_hits,
    cas_misses,
    cas_hits,
    cas_badval,
    touch_hits,
    touch_misses,
    idle_kicks,
    request_timeouts,
    write_timeouts,
    streamed_gets,
    streamed_sets,
    stream_failures,
    budget_waits,
    budget_timeouts,
    memory_limit_bytes,
    memory_used_bytes,
    memory_peak_bytes,
    auth_cmds,
    auth_errors,
    auth_throttled,
    bytes_read,
    bytes_written,
    total_items,
    curr_items,
    evictions,
    backend_errors,
    backend_retries,
    backend_retries_exhausted,
    cull_passes,
    cull_requests,
    cull_last_pass_unix,
    cull_last_duration_ms,
    flush_objects_removed,
    tier_hits,
    tier_miss_hits,
    tier_stale,
    tier_misses,
    tier_revalidated_unchanged,
    tier_evictions,
    tier_disk_hits,
    tier_disk_misses,
    tier_disk_errors,
    tier_disk_bytes,
    backend_gets,
    backend_revalidations,
    backend_puts,
    backend_deletes,
    backend_lists,
    backend_control_gets,
    culler_restarts,
    peer_invalidations_sent,
    peer_invalidations_received,
    peer_invalidations_applied,
    peer_invalidations_dropped,
    peers_configured,
    peers_up,
    tier_window_ms,
);

/// Counters that describe the present, not a running total: `stats reset` leaves them.
pub const GAUGES: &[&str] = &[
    "curr_connections",
    "curr_items",
    "cull_last_pass_unix",
    "cull_last_duration_ms",
    "memory_limit_bytes",
    "memory_used_bytes",
    "memory_peak_bytes",
    "tier_disk_bytes",
    "peers_configured",
    "peers_up",
    "tier_window_ms",
];

impl Stats {
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

impl Stats {
    /// Counters for a server whose store reports S3 requests into `s3`.
    pub fn with_s3(s3: Option<Arc<S3Requests>>) -> Self {
        Stats {
            s3,
            ..Stats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_keeps_gauges() {
        let stats = Stats::default();
        Stats::incr(&stats.cmd_get);
        Stats::incr(&stats.curr_connections);
        stats.reset();
        assert_eq!(stats.cmd_get.load(Relaxed), 0);
        assert_eq!(stats.curr_connections.load(Relaxed), 1);
    }
}
