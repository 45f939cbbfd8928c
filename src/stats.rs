//! Counters behind the `stats` command, named as memcached names them where one exists.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Process-wide counters; all monotonic except where noted.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(pub $name: AtomicU64,)*
        }

        impl Stats {
            /// Name and value of every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)*]
            }

            /// `stats reset`: zero every counter except gauges.
            pub fn reset(&self) {
                $(if !GAUGES.contains(&stringify!($name)) { self.$name.store(0, Relaxed); })*
            }
        }
    };
}

counters!(
    curr_connections,
    total_connections,
    rejected_connections,
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
    auth_cmds,
    auth_errors,
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
    tier_misses,
    tier_revalidated_unchanged,
    tier_evictions,
    backend_gets,
    backend_revalidations,
    backend_puts,
    backend_deletes,
    backend_lists,
    backend_control_gets,
    culler_restarts,
);

/// Counters that describe the present, not a running total: `stats reset` leaves them.
const GAUGES: &[&str] = &[
    "curr_connections",
    "curr_items",
    "cull_last_pass_unix",
    "cull_last_duration_ms",
];

impl Stats {
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
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
