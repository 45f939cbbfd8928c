//! s3cached: a memcached-protocol cache server whose storage is S3 or any S3-compatible store.
//!
//! Data flows one way: socket → [`connection`] (buffers) → [`protocol`] (bytes → request) →
//! [`command`] (request + [`store`] → response) → [`protocol`] encode → socket. Side rooms:
//! [`config`], [`culler`], [`flush`], [`stats`]; [`tier`] keeps hot items in RAM in front of
//! the store; [`app`] wires them together.
#![forbid(unsafe_code)]
// Style rules that lints enforce; thresholds and banned items are in clippy.toml.
#![warn(clippy::too_many_lines, clippy::unwrap_used)]

// Lets test code shared with the integration tests name this crate as they do
// (see `store::conformance`).
#[cfg(test)]
extern crate self as s3cached;

pub mod admin;
pub mod app;
pub mod budget;
pub mod check;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod connection;
pub mod conns;
pub mod culler;
pub mod files;
pub mod flush;
pub mod lifecycle;
pub mod metrics;
pub mod peers;
pub mod protocol;
pub mod sasl;
pub mod server;
pub mod stats;
pub mod store;
pub mod throttle;
pub mod tier;
pub mod tls;

/// The memcached release whose protocol s3cached speaks, as a literal for `concat!`.
macro_rules! memcached_release {
    () => {
        "1.6.18"
    };
}

/// The memcached release whose protocol s3cached speaks; clients parse it.
pub const MEMCACHED_COMPAT_VERSION: &str = memcached_release!();

/// What `version` answers and `stats` reports: the memcached release, then s3cached's own.
pub const VERSION: &str = concat!(
    memcached_release!(),
    "-s3cached-",
    env!("CARGO_PKG_VERSION")
);
