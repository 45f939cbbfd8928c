//! `stats detail`: per-prefix counts of gets, hits, sets and deletes, as memcached keeps them.
//!
//! A key's prefix is what comes before its first `:` (memcached's default delimiter); keys
//! without one are not counted. Off until `stats detail on`; `stats reset` clears it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use bytes::Bytes;

/// memcached's default prefix delimiter (its `-D`).
const PREFIX_DELIMITER: u8 = b':';
/// Most prefixes tracked; further ones are not counted, so a client cannot grow the table
/// without bound.
pub const MAX_DETAIL_PREFIXES: usize = 10_000;

/// The counts of one prefix: gets, hits, sets, deletes.
pub type PrefixCounts = [u64; 4];

#[derive(Debug, Default)]
pub struct PrefixStats {
    enabled: AtomicBool,
    counts: Mutex<BTreeMap<Bytes, PrefixCounts>>,
}

impl PrefixStats {
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Relaxed);
    }

    /// Whether counting is on (`stats settings` shows it as `detail_enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    fn record(&self, key: &[u8], field: usize, by: u64) {
        if !self.enabled.load(Relaxed) {
            return;
        }
        let Some(at) = key.iter().position(|&b| b == PREFIX_DELIMITER) else {
            return;
        };
        let prefix = &key[..at];
        let mut counts = self.counts.lock().expect("detail lock");
        if let Some(c) = counts.get_mut(prefix) {
            c[field] += by;
        } else if counts.len() < MAX_DETAIL_PREFIXES {
            let mut c = PrefixCounts::default();
            c[field] = by;
            counts.insert(Bytes::copy_from_slice(prefix), c);
        }
    }

    /// A get of `key`, a hit or not.
    pub fn get(&self, key: &[u8], hit: bool) {
        self.record(key, 0, 1);
        if hit {
            self.record(key, 1, 1);
        }
    }

    pub fn set(&self, key: &[u8]) {
        self.record(key, 2, 1);
    }

    pub fn delete(&self, key: &[u8]) {
        self.record(key, 3, 1);
    }

    pub fn clear(&self) {
        self.counts.lock().expect("detail lock").clear();
    }

    /// Every prefix and its counts, in byte order (memcached lists them in hash order).
    pub fn dump(&self) -> Vec<(Bytes, PrefixCounts)> {
        let counts = self.counts.lock().expect("detail lock");
        counts.iter().map(|(p, c)| (p.clone(), *c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_prefix_only_when_enabled() {
        let d = PrefixStats::default();
        d.set(b"a:1");
        assert!(d.dump().is_empty());
        d.set_enabled(true);
        d.set(b"a:1");
        d.get(b"a:2", true);
        d.get(b"a:3", false);
        d.delete(b"b:x:y");
        d.set(b"nodelimiter");
        assert_eq!(
            d.dump(),
            vec![
                (Bytes::from("a"), [2, 1, 1, 0]),
                (Bytes::from("b"), [0, 0, 0, 1])
            ]
        );
        d.clear();
        assert!(d.dump().is_empty());
    }
}
