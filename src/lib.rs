//! s3cached: a memcached-protocol cache server whose storage is S3 or any S3-compatible store.
//!
//! Data flows one way: socket → [`connection`] (buffers) → [`protocol`] (bytes → request) →
//! [`command`] (request + [`store`] → response) → [`protocol`] encode → socket. Side rooms:
//! [`config`], [`culler`], [`flush`], [`stats`]; [`tier`] keeps hot items in RAM in front of
//! the store; [`app`] wires them together.
#![forbid(unsafe_code)]

pub mod app;
pub mod binary;
pub mod check;
pub mod clock;
pub mod command;
pub mod config;
pub mod connection;
pub mod culler;
pub mod flush;
pub mod protocol;
pub mod sasl;
pub mod server;
pub mod stats;
pub mod store;
pub mod throttle;
pub mod tier;
pub mod tls;
