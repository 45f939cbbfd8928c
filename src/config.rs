//! Configuration: CLI flags over environment variables over a TOML file over defaults,
//! validated once, before any port is bound.
//!
//! Every option is declared once, in the `options!` table below, with its environment
//! variable, type, default and meaning. Unknown keys in the file are rejected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A secret string: never printed, never logged.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// "set" or "unset": all that is ever shown of a secret.
    pub fn state(&self) -> &'static str {
        if self.0.is_empty() {
            "unset"
        } else {
            "set"
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

macro_rules! options {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, env $env:literal; )*) => {
        /// Every option, each optional: one layer of configuration (CLI+env, or the file).
        #[derive(clap::Args, Deserialize, Debug, Default, Clone)]
        #[serde(deny_unknown_fields)]
        pub struct Options {
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env)]
                pub $name: Option<$ty>,
            )*
        }

        /// The resolved configuration: every option has a value.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Options {
            /// Takes each option from `self`, else from `below`.
            fn over(self, below: Options) -> Options {
                Options { $( $name: self.$name.or(below.$name), )* }
            }

            /// Fills what is unset with defaults.
            fn resolve(self) -> Config {
                Config { $( $name: self.$name.unwrap_or_else(|| $default), )* }
            }
        }

        impl Config {
            /// Name and value of every option, secrets shown only as set or unset
            /// (`stats settings`).
            pub fn rows(&self) -> Vec<(String, String)> {
                vec![ $( (stringify!($name).to_owned(), OptionValue::setting(&self.$name)), )* ]
            }

            /// Every option as a line of TOML that `--config` reads back, secrets as comments.
            pub fn toml_lines(&self) -> Vec<String> {
                vec![ $( OptionValue::toml_line(&self.$name, stringify!($name)), )* ]
            }

            /// Every option's value as the reference shows it, in table order.
            fn doc_values(&self) -> Vec<String> {
                vec![ $( OptionValue::doc_value(&self.$name), )* ]
            }
        }

        /// `(key, environment variable)` of every option, for docs and tests.
        pub const KEYS: &[(&str, &str)] = &[ $( (stringify!($name), $env), )* ];

        /// Key, environment variable, type and meaning of every option, in table order
        /// (the reference in docs/configuration.md).
        pub const OPTION_DOCS: &[OptionDoc] = &[ $( OptionDoc {
            key: stringify!($name),
            env: $env,
            ty: stringify!($ty),
            doc: concat!($($doc),*),
        }, )* ];
    };
}

/// What the reference says of one option, taken from its line in the `options!` table.
#[derive(Debug, Clone, Copy)]
pub struct OptionDoc {
    /// The key in the TOML file; `--key-with-dashes` on the command line.
    pub key: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// The Rust type, as written in the table.
    pub ty: &'static str,
    /// The option's `///` comment, its lines joined.
    pub doc: &'static str,
}

/// Default memcached port on loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:11211";
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_ITEM_SIZE_BYTES: usize = 1024 * 1024;
/// memcached's largest `-I`, and s3cached's largest `max_item_size`.
pub const MAX_ITEM_SIZE_BYTES: usize = 1024 * 1024 * 1024;
/// Values longer than this are streamed by default.
pub const DEFAULT_STREAM_ABOVE_BYTES: usize = 1024 * 1024;
/// Default item bound with a bucket: large, so an application never sees its own fresh
/// items evicted by count (memcached users expect a bound in bytes, not 300 items), while a
/// culler pass still lists a bounded number of objects (1,000 per LIST request).
pub const DEFAULT_S3_MAX_ENTRIES: u64 = 1_000_000;
/// Default byte bound on the local-directory store: a bound in bytes, as memcached's `-m`,
/// sized for a disk rather than RAM.
pub const DEFAULT_DIR_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// The default of `max_entries` and `max_bytes` until the backend is known (see
/// [`Config::backend_defaults`]); this value cannot be configured.
const BY_BACKEND: u64 = u64::MAX;
pub const DEFAULT_CULL_FREQUENCY: u64 = 3;
pub const DEFAULT_CULL_INTERVAL_SECS: u64 = 60;
pub const DEFAULT_GZIP_MIN_BYTES: usize = 1024;
pub const DEFAULT_S3_ATTEMPT_TIMEOUT_MS: u64 = 2000;
pub const DEFAULT_S3_OPERATION_TIMEOUT_MS: u64 = 5000;
pub const DEFAULT_S3_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_S3_MAX_IN_FLIGHT: usize = 256;
/// Hedged GETs: at most 10 % more GETs, after the recent 90th percentile, between 10 ms (S3
/// Express One Zone answers in single-digit milliseconds) and 1 s (half an attempt's time).
pub const DEFAULT_S3_HEDGE_PERCENT: u32 = 20;
pub const DEFAULT_S3_HEDGE_MIN_MS: u64 = 10;
pub const DEFAULT_S3_HEDGE_MAX_MS: u64 = 1000;
/// The window while every peer is heard from: 30 times the default one, so a hot key costs
/// one revalidation per 30 s per replica instead of one per second. Heartbeats and batch
/// numbers catch a peer gone silent or a batch lost within about 2 s; this bounds only what
/// they cannot see.
pub const DEFAULT_PEER_REVALIDATE_AFTER_MS: u64 = 30_000;
/// How long a client has to finish its TLS handshake before it is dropped.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Most TLS handshakes in progress at once: a burst of 256 clients connecting in the same
/// moment; past it, the oldest silent handshake gives way to a newcomer.
pub const DEFAULT_MAX_TLS_HANDSHAKES: usize = 256;
/// Default request timeout: a 1 MiB set may arrive at 35 KB/s; a client trickling bytes
/// holds its slot and buffer no longer than this.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
/// Default write timeout: the largest reply (64 MiB) written at 2.2 MB/s, a 1 MiB value at
/// 35 KB/s; a client that stops reading holds its slot and replies no longer than this.
pub const DEFAULT_WRITE_TIMEOUT_SECS: u64 = 30;

options! {
    /// Address to listen on.
    listen: String = DEFAULT_LISTEN.into(), env "S3CACHED_LISTEN";
    /// Once every listener is bound, write their addresses here (`listen ADDR`, then
    /// `admin ADDR` when the admin listener runs), so whoever started the server on port 0
    /// learns where it listens ("" = no file; memcached's MEMCACHED_PORT_FILENAME).
    addr_file: PathBuf = PathBuf::new(), env "S3CACHED_ADDR_FILE";
    /// Most client connections at once; more get memcached's "ERROR Too many open connections".
    max_connections: usize = DEFAULT_MAX_CONNECTIONS, env "S3CACHED_MAX_CONNECTIONS";
    /// Largest item value in bytes (memcached's -I), up to 1 GiB.
    max_item_size: usize = DEFAULT_MAX_ITEM_SIZE_BYTES, env "S3CACHED_MAX_ITEM_SIZE";
    /// Values longer than this are streamed between client and store, a piece at a time,
    /// never held whole; they stay out of RAM and the disk tier.
    stream_above_bytes: usize = DEFAULT_STREAM_ABOVE_BYTES, env "S3CACHED_STREAM_ABOVE_BYTES";
    /// Close connections idle this long (0 = never, as memcached).
    idle_timeout_secs: u64 = 0, env "S3CACHED_IDLE_TIMEOUT_SECS";
    /// Log filter: error, warn, info, debug, trace (or a tracing filter directive).
    log_level: String = "info".into(), env "S3CACHED_LOG_LEVEL";
    /// Log format: text or json.
    log_format: String = "text".into(), env "S3CACHED_LOG_FORMAT";
    /// Allow flush_all (memcached's -F turns it off).
    flush_enabled: bool = true, env "S3CACHED_FLUSH_ENABLED";
    /// Let the `shutdown` command stop the server, draining as on SIGTERM (memcached's -A).
    shutdown_enabled: bool = false, env "S3CACHED_SHUTDOWN_ENABLED";
    /// Answer a failed backend read as a miss instead of SERVER_ERROR.
    miss_on_backend_error: bool = false, env "S3CACHED_MISS_ON_BACKEND_ERROR";
    /// Directory for the local store, used when no bucket is set.
    data_dir: PathBuf = PathBuf::from("s3cached-data"), env "S3CACHED_DATA_DIR";
    /// Prefix (folder) for every object, in the bucket or under data_dir.
    location: String = String::new(), env "S3CACHED_LOCATION";
    /// Bucket name; when set, items live in S3.
    storage_bucket_name: String = String::new(), env "S3CACHED_STORAGE_BUCKET_NAME";
    /// Access key; unset = the standard AWS chain (environment, profile, instance role).
    access_key_id: Secret = Secret(String::new()), env "S3CACHED_ACCESS_KEY_ID";
    /// Secret key; unset = the standard AWS chain.
    secret_access_key: Secret = Secret(String::new()), env "S3CACHED_SECRET_ACCESS_KEY";
    /// Canned ACL sent with each object ("" = none).
    default_acl: String = "private".into(), env "S3CACHED_DEFAULT_ACL";
    /// Canned ACL for a bucket this server creates ("" = default_acl).
    bucket_acl: String = String::new(), env "S3CACHED_BUCKET_ACL";
    /// Store objects with the REDUCED_REDUNDANCY storage class.
    reduced_redundancy: bool = false, env "S3CACHED_REDUCED_REDUNDANCY";
    /// Storage class for objects ("" = the bucket's default); overrides reduced_redundancy.
    storage_class: String = String::new(), env "S3CACHED_STORAGE_CLASS";
    /// Gzip values of at least gzip_min_bytes.
    is_gzipped: bool = false, env "S3CACHED_IS_GZIPPED";
    /// Smallest value that is gzipped when is_gzipped is on.
    gzip_min_bytes: usize = DEFAULT_GZIP_MIN_BYTES, env "S3CACHED_GZIP_MIN_BYTES";
    /// AWS region ("" = the AWS chain, else us-east-1).
    region: String = String::new(), env "S3CACHED_REGION";
    /// S3 endpoint for MinIO and other S3-compatible stores ("" = AWS).
    endpoint_url: String = String::new(), env "S3CACHED_ENDPOINT_URL";
    /// Path-style addressing (MinIO and most S3-compatible stores need it).
    force_path_style: bool = false, env "S3CACHED_FORCE_PATH_STYLE";
    /// Create the bucket at startup if it does not exist.
    create_bucket: bool = false, env "S3CACHED_CREATE_BUCKET";
    /// Request checksums: when_required (works everywhere) or when_supported.
    request_checksum: String = "when_required".into(), env "S3CACHED_REQUEST_CHECKSUM";
    /// Deadline of one S3 attempt, in milliseconds.
    s3_attempt_timeout_ms: u64 = DEFAULT_S3_ATTEMPT_TIMEOUT_MS, env "S3CACHED_S3_ATTEMPT_TIMEOUT_MS";
    /// Deadline of one S3 operation with its retries, in milliseconds.
    s3_operation_timeout_ms: u64 = DEFAULT_S3_OPERATION_TIMEOUT_MS, env "S3CACHED_S3_OPERATION_TIMEOUT_MS";
    /// Attempts per S3 operation (1 = no retry).
    s3_max_attempts: u32 = DEFAULT_S3_MAX_ATTEMPTS, env "S3CACHED_S3_MAX_ATTEMPTS";
    /// Most S3 requests in flight at once, across all connections (a cap: the limit halves
    /// when S3 throttles and grows back as it answers).
    s3_max_in_flight: usize = DEFAULT_S3_MAX_IN_FLIGHT, env "S3CACHED_S3_MAX_IN_FLIGHT";
    /// Most GETs sent a second time because the first was slow, as a percentage of GETs
    /// (0 = never): a GET not answered after the recent 90th percentile is hedged (about a
    /// tenth of GETs; the rest is room for bursts).
    s3_hedge_percent: u32 = DEFAULT_S3_HEDGE_PERCENT, env "S3CACHED_S3_HEDGE_PERCENT";
    /// Least delay before a slow GET is hedged, in milliseconds.
    s3_hedge_min_ms: u64 = DEFAULT_S3_HEDGE_MIN_MS, env "S3CACHED_S3_HEDGE_MIN_MS";
    /// Most delay before a slow GET is hedged (and the delay until enough GETs are known).
    s3_hedge_max_ms: u64 = DEFAULT_S3_HEDGE_MAX_MS, env "S3CACHED_S3_HEDGE_MAX_MS";
    /// Server-side encryption sent on every PUT: "" (the bucket's default), AES256 or aws:kms.
    server_side_encryption: String = String::new(), env "S3CACHED_SERVER_SIDE_ENCRYPTION";
    /// KMS key for server_side_encryption = "aws:kms" ("" = the account's aws/s3 key).
    sse_kms_key_id: String = String::new(), env "S3CACHED_SSE_KMS_KEY_ID";
    /// Price of 1,000 S3 GET/HEAD requests in USD, for the cost estimate (AWS S3 Standard, us-east-1).
    s3_price_get_per_1000: f64 = crate::store::s3::AWS_S3_STANDARD_PRICES.get_per_1000, env "S3CACHED_S3_PRICE_GET_PER_1000";
    /// Price of 1,000 S3 PUT/COPY/POST/LIST requests in USD (AWS S3 Standard, us-east-1).
    s3_price_put_per_1000: f64 = crate::store::s3::AWS_S3_STANDARD_PRICES.put_per_1000, env "S3CACHED_S3_PRICE_PUT_PER_1000";
    /// Price of 1,000 S3 DELETE requests in USD (free on AWS).
    s3_price_delete_per_1000: f64 = crate::store::s3::AWS_S3_STANDARD_PRICES.delete_per_1000, env "S3CACHED_S3_PRICE_DELETE_PER_1000";
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz); "" = off.
    admin_listen: String = String::new(), env "S3CACHED_ADMIN_LISTEN";
    /// Most items kept; the culler removes some when the count reaches it (0 = no limit; default 1000000 on S3, 0 on the directory store and on S3 Express directory buckets).
    max_entries: u64 = BY_BACKEND, env "S3CACHED_MAX_ENTRIES";
    /// At max_entries, remove 1/cull_frequency of the items (0 = remove all).
    cull_frequency: u64 = DEFAULT_CULL_FREQUENCY, env "S3CACHED_CULL_FREQUENCY";
    /// Most bytes of objects kept (0 = no limit; default 1 GiB on the directory store, 0 on S3).
    max_bytes: u64 = BY_BACKEND, env "S3CACHED_MAX_BYTES";
    /// Seconds between culler passes.
    cull_interval_secs: u64 = DEFAULT_CULL_INTERVAL_SECS, env "S3CACHED_CULL_INTERVAL_SECS";
    /// Bytes of RAM for the near tier of hot items (0 = off).
    ram_cache_bytes: u64 = crate::tier::DEFAULT_RAM_CACHE_BYTES, env "S3CACHED_RAM_CACHE_BYTES";
    /// Serve a tier entry this long (ms) before asking the store again; also how often the
    /// shared flush epoch is re-read. 0 = strict: every read asks the store.
    revalidate_after_ms: u64 = crate::tier::DEFAULT_REVALIDATE_AFTER_MS, env "S3CACHED_REVALIDATE_AFTER_MS";
    /// Directory for the optional disk tier behind the RAM tier ("" = off): items survive a
    /// restart there and the hot set may exceed RAM. Give each replica its own directory.
    disk_cache_dir: PathBuf = PathBuf::new(), env "S3CACHED_DISK_CACHE_DIR";
    /// Bytes of disk the disk tier may use (at least 8 blocks; a block holds the largest item).
    disk_cache_bytes: u64 = crate::tier::disk::DEFAULT_DISK_CACHE_BYTES, env "S3CACHED_DISK_CACHE_BYTES";
    /// Directory store: fsync each write (file and directory) before acknowledging it.
    dir_fsync: bool = false, env "S3CACHED_DIR_FSYNC";
    /// PEM certificate chain for TLS on the memcached port ("" = plain TCP; memcached's
    /// ssl_chain_cert). Re-read with the key on SIGHUP.
    tls_cert: PathBuf = PathBuf::new(), env "S3CACHED_TLS_CERT";
    /// PEM private key of tls_cert (memcached's ssl_key).
    tls_key: PathBuf = PathBuf::new(), env "S3CACHED_TLS_KEY";
    /// PEM CA certificates; when set, clients must present a certificate they signed
    /// (memcached's ssl_ca_cert with ssl_verify_mode=2). "" = no client certificates.
    tls_ca: PathBuf = PathBuf::new(), env "S3CACHED_TLS_CA";
    /// Drop a client that has not finished its TLS handshake within this many ms.
    tls_handshake_timeout_ms: u64 = DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS, env "S3CACHED_TLS_HANDSHAKE_TIMEOUT_MS";
    /// Most TLS handshakes in progress at once, apart from max_connections (a client takes a
    /// connection slot only once its handshake is done); past it, the oldest handshake whose
    /// client has sent nothing is dropped for the newcomer (with none silent, the oldest).
    max_tls_handshakes: usize = DEFAULT_MAX_TLS_HANDSHAKES, env "S3CACHED_MAX_TLS_HANDSHAKES";
    /// Memory budget in bytes for read buffers, values in flight and replies waiting to be
    /// written, across all connections; a connection past its share waits for its replies.
    memory_limit_bytes: u64 = crate::budget::DEFAULT_MEMORY_LIMIT_BYTES, env "S3CACHED_MEMORY_LIMIT_BYTES";
    /// Close a connection whose started request is not complete after this many seconds (0 = never).
    request_timeout_secs: u64 = DEFAULT_REQUEST_TIMEOUT_SECS, env "S3CACHED_REQUEST_TIMEOUT_SECS";
    /// Close a connection whose replies are not all written after this many seconds (0 = never).
    write_timeout_secs: u64 = DEFAULT_WRITE_TIMEOUT_SECS, env "S3CACHED_WRITE_TIMEOUT_SECS";
    /// SASL users file, lines of `user:password` (memcached's -Y format); when set, every
    /// client must log in: binary clients with SASL PLAIN, text clients as text_auth says.
    /// A failed login is answered after 250 ms; each client address (IPv4, IPv6 /64) has 8
    /// failures at once, then 4 a second, across all its connections.
    sasl_users_file: PathBuf = PathBuf::new(), env "S3CACHED_SASL_USERS_FILE";
    /// With sasl_users_file: let text clients log in with memcached's `set` of
    /// `user password`; off = text connections are refused.
    text_auth: bool = false, env "S3CACHED_TEXT_AUTH";
    /// Other replicas' peer listeners, `host:port` (comma-separated; DNS names re-resolved
    /// every 30 s): after each write this replica tells them what changed, and they drop it at
    /// once. "" = none known: other replicas' writes are seen within revalidate_after_ms.
    /// "none" = this replica is the only one using the bucket: its tier is never revalidated.
    peers: String = String::new(), env "S3CACHED_PEERS";
    /// Address to hear peers on ("" = off); beyond loopback only with peer_secret.
    peer_listen: String = String::new(), env "S3CACHED_PEER_LISTEN";
    /// The replicas' shared secret: every batch between peers carries an HMAC-SHA256 under it.
    peer_secret: Secret = Secret(String::new()), env "S3CACHED_PEER_SECRET";
    /// How long an entry is served without asking the store (ms) while every peer is heard
    /// from; revalidate_after_ms applies whenever one is not.
    peer_revalidate_after_ms: u64 = DEFAULT_PEER_REVALIDATE_AFTER_MS, env "S3CACHED_PEER_REVALIDATE_AFTER_MS";
    /// Testing only: shift this server's clock by this many ms, to simulate clock skew.
    clock_offset_ms: i64 = 0, env "S3CACHED_CLOCK_OFFSET_MS";
}

/// A configuration that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

const CANNED_ACLS: &[&str] = &[
    "",
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
];
const STORAGE_CLASSES: &[&str] = &[
    "",
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "EXPRESS_ONEZONE",
];

impl Config {
    /// Merges `overrides` (flags and environment, already combined by clap) over the TOML
    /// file at `path`, if any, then validates.
    pub fn load(path: Option<&Path>, overrides: Options) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => read_file(path)?,
            None => Options::default(),
        };
        let config = overrides.over(file).resolve().backend_defaults();
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document over defaults (for tests and tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let options: Options =
            toml::from_str(text).map_err(|e| ConfigError(format!("config file: {e}")))?;
        let config = options.resolve().backend_defaults();
        config.validate()?;
        Ok(config)
    }

    /// Fills the bounds left unset with the backend's defaults: a byte bound on the local
    /// store, a large item bound on S3. Values set by the user are kept.
    fn backend_defaults(mut self) -> Config {
        let s3 = self.uses_s3();
        if self.max_entries == BY_BACKEND {
            // The culler cannot list a directory bucket (see `validate_directory_bucket`).
            let cull = s3 && !self.directory_bucket();
            self.max_entries = if cull { DEFAULT_S3_MAX_ENTRIES } else { 0 };
        }
        if self.max_bytes == BY_BACKEND {
            self.max_bytes = if s3 { 0 } else { DEFAULT_DIR_MAX_BYTES };
        }
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if self.listen.parse::<SocketAddr>().is_err() {
            return fail(format!(
                "listen: {:?} is not an address like 127.0.0.1:11211",
                self.listen
            ));
        }
        self.validate_s3()?;
        if !(1024..=MAX_ITEM_SIZE_BYTES).contains(&self.max_item_size) {
            return fail("max_item_size must be between 1024 bytes and 1 GiB".into());
        }
        if !(256 * 1024..=MAX_ITEM_SIZE_BYTES).contains(&self.stream_above_bytes) {
            return fail("stream_above_bytes must be between 256 KiB and 1 GiB".into());
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return fail(format!(
                "log_format: {:?} is not text or json",
                self.log_format
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return fail(format!(
                "log_level: {:?} is not a log level",
                self.log_level
            ));
        }
        if !CANNED_ACLS.contains(&self.default_acl.as_str()) {
            return fail(format!(
                "default_acl: {:?} is not a canned ACL",
                self.default_acl
            ));
        }
        if !CANNED_ACLS.contains(&self.bucket_acl.as_str()) {
            return fail(format!(
                "bucket_acl: {:?} is not a canned ACL",
                self.bucket_acl
            ));
        }
        if !STORAGE_CLASSES.contains(&self.storage_class.as_str()) {
            return fail(format!(
                "storage_class: {:?} is not a storage class",
                self.storage_class
            ));
        }
        if !["when_required", "when_supported"].contains(&self.request_checksum.as_str()) {
            return fail(format!(
                "request_checksum: {:?} is not when_required or when_supported",
                self.request_checksum
            ));
        }
        let scheme_ok = ["http://", "https://"]
            .iter()
            .any(|p| self.endpoint_url.starts_with(p));
        if !self.endpoint_url.is_empty() && !scheme_ok {
            return fail(format!(
                "endpoint_url: {:?} must start with http:// or https://",
                self.endpoint_url
            ));
        }
        if self.access_key_id.expose().is_empty() != self.secret_access_key.expose().is_empty() {
            return fail("access_key_id and secret_access_key must be set together".into());
        }
        self.validate_ops()?;
        self.validate_memory()?;
        if self.location.split('/').any(|part| part == "..") {
            return fail("location must not contain '..'".into());
        }
        self.validate_ranges()?;
        self.validate_tls()?;
        self.validate_peers()?;
        self.sasl_users().map(|_| ())
    }

    /// Every number within a range the server can work with: a count it can allocate, a
    /// duration it can add to a clock without overflow. Checked here, so a value that
    /// passes `--check-config` never fails later (a panic in the accept loop, say).
    fn validate_ranges(&self) -> Result<(), ConfigError> {
        const DAY_MS: i128 = 86_400_000;
        const YEAR_SECS: i128 = 365 * 86_400;
        const TIB: i128 = 1 << 40;
        let n = |v: u64| i128::from(v);
        within_ranges(&[
            (
                "max_connections",
                self.max_connections as i128,
                1,
                1_000_000,
            ),
            ("idle_timeout_secs", n(self.idle_timeout_secs), 0, YEAR_SECS),
            (
                "request_timeout_secs",
                n(self.request_timeout_secs),
                0,
                YEAR_SECS,
            ),
            (
                "write_timeout_secs",
                n(self.write_timeout_secs),
                0,
                YEAR_SECS,
            ),
            (
                "s3_attempt_timeout_ms",
                n(self.s3_attempt_timeout_ms),
                1,
                DAY_MS,
            ),
            (
                "s3_operation_timeout_ms",
                n(self.s3_operation_timeout_ms),
                1,
                DAY_MS,
            ),
            ("s3_max_attempts", i128::from(self.s3_max_attempts), 1, 100),
            ("s3_max_in_flight", self.s3_max_in_flight as i128, 1, 65_536),
            (
                "cull_interval_secs",
                n(self.cull_interval_secs),
                1,
                YEAR_SECS,
            ),
            (
                "revalidate_after_ms",
                n(self.revalidate_after_ms),
                0,
                DAY_MS,
            ),
            (
                "tls_handshake_timeout_ms",
                n(self.tls_handshake_timeout_ms),
                1,
                DAY_MS,
            ),
            (
                "max_tls_handshakes",
                self.max_tls_handshakes as i128,
                1,
                65_536,
            ),
            (
                "clock_offset_ms",
                i128::from(self.clock_offset_ms),
                -DAY_MS,
                DAY_MS,
            ),
            ("ram_cache_bytes", n(self.ram_cache_bytes), 0, TIB),
            ("disk_cache_bytes", n(self.disk_cache_bytes), 0, 1024 * TIB),
            ("memory_limit_bytes", n(self.memory_limit_bytes), 0, TIB),
            (
                "gzip_min_bytes",
                self.gzip_min_bytes as i128,
                0,
                i128::from(u32::MAX),
            ),
        ])
    }

    /// Whether the bucket is an S3 Express One Zone directory bucket (`name--zone--x-s3`).
    pub fn directory_bucket(&self) -> bool {
        self.uses_s3() && self.storage_bucket_name.ends_with("--x-s3")
    }

    /// Hedging's bounds, and what a directory bucket allows.
    fn validate_s3(&self) -> Result<(), ConfigError> {
        within_ranges(&[
            (
                "s3_hedge_percent",
                i128::from(self.s3_hedge_percent),
                0,
                100,
            ),
            (
                "s3_hedge_min_ms",
                i128::from(self.s3_hedge_min_ms),
                1,
                86_400_000,
            ),
            (
                "s3_hedge_max_ms",
                i128::from(self.s3_hedge_max_ms),
                1,
                86_400_000,
            ),
        ])?;
        if self.s3_hedge_min_ms > self.s3_hedge_max_ms {
            return Err(ConfigError(format!(
                "s3_hedge_min_ms ({}) is more than s3_hedge_max_ms ({})",
                self.s3_hedge_min_ms, self.s3_hedge_max_ms
            )));
        }
        self.validate_directory_bucket()
    }

    /// A directory bucket takes virtual-hosted-style requests only, and its listing (not in
    /// key order, no `StartAfter`) is not one the culler can page through.
    fn validate_directory_bucket(&self) -> Result<(), ConfigError> {
        if !self.directory_bucket() {
            return Ok(());
        }
        if self.force_path_style {
            return Err(ConfigError(
                "force_path_style: directory buckets (--x-s3) take virtual-hosted-style requests only"
                    .into(),
            ));
        }
        if self.max_entries != 0 || self.max_bytes != 0 {
            return Err(ConfigError(
                "max_entries and max_bytes must be 0 on a directory bucket (--x-s3): the culler \
                 cannot list one yet; bound it with a lifecycle rule"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The disk tier must hold a few blocks, each of which must hold the largest item.
    fn validate_disk_tier(&self) -> Result<(), ConfigError> {
        let Some(disk) = self.disk_tier() else {
            return Ok(());
        };
        let min = crate::tier::disk::MIN_DISK_BLOCKS * disk.block_bytes() as u64;
        if disk.bytes < min {
            return Err(ConfigError(format!(
                "disk_cache_bytes must be at least {min} (8 blocks of {} bytes: the largest value held whole and 64 KiB, at least 1 MiB)",
                disk.block_bytes()
            )));
        }
        if disk.dir.exists() && !disk.dir.is_dir() {
            return Err(ConfigError(format!(
                "disk_cache_dir: {} is not a directory",
                disk.dir.display()
            )));
        }
        Ok(())
    }

    /// The admin listener, encryption at rest, the S3 prices and the disk tier.
    fn validate_ops(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if !self.admin_listen.is_empty() && self.admin_listen.parse::<SocketAddr>().is_err() {
            return fail(format!(
                "admin_listen: {:?} is not an address like 127.0.0.1:9211",
                self.admin_listen
            ));
        }
        if !["", "AES256", "aws:kms"].contains(&self.server_side_encryption.as_str()) {
            return fail(format!(
                "server_side_encryption: {:?} is not AES256 or aws:kms",
                self.server_side_encryption
            ));
        }
        if !self.sse_kms_key_id.is_empty() && self.server_side_encryption != "aws:kms" {
            return fail("sse_kms_key_id needs server_side_encryption = \"aws:kms\"".into());
        }
        let prices = [
            self.s3_price_get_per_1000,
            self.s3_price_put_per_1000,
            self.s3_price_delete_per_1000,
        ];
        if prices.iter().any(|p| !p.is_finite() || *p < 0.0) {
            return fail("S3 prices must be finite and not negative".into());
        }
        self.validate_disk_tier()
    }

    /// TLS needs a certificate and its key together; a CA only with them.
    fn validate_peers(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        let window = i128::from(self.peer_revalidate_after_ms);
        within_ranges(&[("peer_revalidate_after_ms", window, 0, 86_400_000)])?;
        if !self.peer_listen.is_empty() {
            let Ok(addr) = self.peer_listen.parse::<SocketAddr>() else {
                return fail(format!(
                    "peer_listen: {:?} is not an address like 127.0.0.1:11212",
                    self.peer_listen
                ));
            };
            if !addr.ip().is_loopback() && self.peer_secret.expose().is_empty() {
                return fail(
                    "peer_listen beyond loopback needs peer_secret: anyone could drop entries"
                        .into(),
                );
            }
        }
        for peer in self.peer_names() {
            let port = peer.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
            if !matches!(port, Some(Ok(p)) if p > 0) {
                return fail(format!("peers: {peer:?} is not host:port"));
            }
        }
        let has_peers = !self.peer_names().is_empty() || !self.peer_listen.is_empty();
        if has_peers && !self.uses_s3() {
            return fail(
                "peers and peer_listen need a bucket: the directory store has one server".into(),
            );
        }
        if self.alone() && !self.peer_listen.is_empty() {
            return fail("peers = \"none\" and a peer_listen: a replica alone has no peers".into());
        }
        Ok(())
    }

    /// The peers' `host:port` names, if any.
    pub fn peer_names(&self) -> Vec<String> {
        if self.alone() {
            return Vec::new();
        }
        let names = self.peers.split(',').map(str::trim);
        names.filter(|p| !p.is_empty()).map(str::to_owned).collect()
    }

    /// `peers = "none"`: this replica is the only one using the bucket.
    pub fn alone(&self) -> bool {
        self.peers.trim() == "none"
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let (cert, key, ca) = (
            self.tls_cert.as_os_str().is_empty(),
            self.tls_key.as_os_str().is_empty(),
            self.tls_ca.as_os_str().is_empty(),
        );
        if cert != key {
            return Err(ConfigError(
                "tls_cert and tls_key must be set together".into(),
            ));
        }
        if cert && !ca {
            return Err(ConfigError("tls_ca needs tls_cert and tls_key".into()));
        }
        if self.tls_handshake_timeout_ms == 0 {
            return Err(ConfigError(
                "tls_handshake_timeout_ms must be at least 1".into(),
            ));
        }
        // Read the files now, so --check-config catches a bad certificate too.
        if let Some(files) = self.tls_files() {
            crate::tls::Tls::load(files, self.tls_handshakes())
                .map_err(|e| ConfigError(format!("TLS: {e}")))?;
        }
        Ok(())
    }

    /// The SASL users, read from `sasl_users_file` (`None` when unset: no login needed).
    pub fn sasl_users(&self) -> Result<Option<crate::sasl::Users>, ConfigError> {
        if self.sasl_users_file.as_os_str().is_empty() {
            if self.text_auth {
                return Err(ConfigError("text_auth needs sasl_users_file".into()));
            }
            return Ok(None);
        }
        crate::sasl::Users::load(&self.sasl_users_file)
            .map(Some)
            .map_err(ConfigError)
    }

    /// The memory budget must hold a request of the largest value held whole, or of a
    /// streamed one: one request may take half the budget, and a set up to three times its
    /// item.
    fn validate_memory(&self) -> Result<(), ConfigError> {
        let held = self.whole_value_bytes() as u64;
        let streamed = match self.max_item_size > self.stream_above_bytes {
            true => crate::store::body::STREAM_HOLD_BYTES as u64,
            false => 0,
        };
        let min = crate::budget::MIN_MEMORY_LIMIT_BYTES.max(8 * held.max(streamed));
        if self.memory_limit_bytes < min {
            return Err(ConfigError(format!(
                "memory_limit_bytes must be at least {min} (8 MiB, 8 x the largest value \
                 held whole, min(max_item_size, stream_above_bytes), and 8 x what a \
                 streamed value holds, {} bytes, when values are streamed)",
                crate::store::body::STREAM_HOLD_BYTES
            )));
        }
        Ok(())
    }

    /// The largest value held whole: longer ones are streamed.
    pub fn whole_value_bytes(&self) -> usize {
        self.max_item_size.min(self.stream_above_bytes)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.parse().expect("validated")
    }

    /// The admin listener's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listen.parse().ok()
    }

    pub fn uses_s3(&self) -> bool {
        !self.storage_bucket_name.is_empty()
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }

    /// The effective storage class, if any.
    pub fn effective_storage_class(&self) -> Option<&str> {
        if !self.storage_class.is_empty() {
            Some(&self.storage_class)
        } else if self.reduced_redundancy {
            Some("REDUCED_REDUNDANCY")
        } else {
            None
        }
    }

    /// The resolved configuration as a TOML document that `--config` accepts back.
    pub fn to_toml(&self) -> String {
        let mut text = String::from(
            "# s3cached configuration, resolved from defaults, file, environment and flags.\n",
        );
        for line in self.toml_lines() {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

/// Fails on the first `(name, value, min, max)` whose value is outside `min..=max`.
fn within_ranges(ranges: &[(&str, i128, i128, i128)]) -> Result<(), ConfigError> {
    for &(name, value, min, max) in ranges {
        if !(min..=max).contains(&value) {
            return Err(ConfigError(format!(
                "{name} must be between {min} and {max}, not {value}"
            )));
        }
    }
    Ok(())
}

/// A timeout of `secs` seconds; 0 means none.
pub fn secs(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// The reference table of every option, in Markdown: key, environment variable, type,
/// default and meaning, generated from the `options!` table (docs/configuration.md holds a
/// copy that tests/config_doc.rs keeps current). A default that depends on the store shows
/// both values.
pub fn options_reference() -> String {
    let on_dir = Options::default().resolve().backend_defaults();
    let with_bucket = Options {
        storage_bucket_name: Some("bucket".into()),
        ..Options::default()
    };
    let mut on_s3 = with_bucket.resolve().backend_defaults();
    // Only the defaults that follow from having a bucket should differ.
    on_s3.storage_bucket_name = on_dir.storage_bucket_name.clone();
    let mut text = String::from(
        "| key | environment variable | type | default | meaning |\n|---|---|---|---|---|\n",
    );
    let values = on_dir.doc_values().into_iter().zip(on_s3.doc_values());
    for (option, (dir, s3)) in OPTION_DOCS.iter().zip(values) {
        let (dir, s3) = (with_size(option.key, dir), with_size(option.key, s3));
        let default = if dir == s3 {
            dir
        } else {
            format!("{dir} on the directory store, {s3} on S3")
        };
        let meaning = option.doc.split_whitespace().collect::<Vec<_>>().join(" ");
        text.push_str(&format!(
            "| `{}` | `{}` | {} | {default} | {} |\n",
            option.key,
            option.env,
            type_name(option.ty),
            meaning.replace('|', "\\|"),
        ));
    }
    text
}

/// A type as the reference names it.
fn type_name(rust: &str) -> &str {
    match rust {
        "String" => "string",
        "PathBuf" => "path",
        "Secret" => "secret string",
        "bool" => "boolean",
        "f64" => "number",
        "u32" | "u64" | "usize" => "integer",
        "i64" => "signed integer",
        other => other,
    }
}

/// A default in bytes with its size in MiB or GiB beside it, when it is a whole number of them.
fn with_size(key: &str, shown: String) -> String {
    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;
    let in_bytes = key.ends_with("_bytes") || key.ends_with("_size");
    match shown.trim_matches('`').parse::<u64>() {
        Ok(n) if in_bytes && n > 0 && n % GIB == 0 => format!("{shown} ({} GiB)", n / GIB),
        Ok(n) if in_bytes && n > 0 && n % MIB == 0 => format!("{shown} ({} MiB)", n / MIB),
        _ => shown,
    }
}

/// How one option's value is shown: in `stats settings`, as a line of TOML and in the
/// reference.
pub trait OptionValue {
    /// The value as `stats settings` shows it.
    fn setting(&self) -> String;
    /// `key = value` in TOML, typed as the file expects it.
    fn toml_line(&self, key: &str) -> String;
    /// The value as the options reference shows a default: TOML, in backticks.
    fn doc_value(&self) -> String;
}

impl<T: serde::Serialize> OptionValue for T {
    fn setting(&self) -> String {
        match toml::Value::try_from(self) {
            Ok(toml::Value::String(s)) => s,
            Ok(v) => v.to_string(),
            Err(e) => format!("<{e}>"),
        }
    }

    fn toml_line(&self, key: &str) -> String {
        match toml::Value::try_from(self) {
            Ok(v) => format!("{key} = {v}"),
            Err(e) => format!("# {key}: cannot be written as TOML: {e}"),
        }
    }

    fn doc_value(&self) -> String {
        match toml::Value::try_from(self) {
            Ok(v) => format!("`{v}`"),
            Err(e) => format!("<{e}>"),
        }
    }
}

impl OptionValue for Secret {
    fn setting(&self) -> String {
        self.state().to_owned()
    }

    fn toml_line(&self, key: &str) -> String {
        format!("# {key} = <redacted: {}>", self.state())
    }

    fn doc_value(&self) -> String {
        self.state().to_owned()
    }
}

fn read_file(path: &Path) -> Result<Options, ConfigError> {
    let bytes = crate::files::read_regular(path)
        .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))
}

mod settings;
#[cfg(test)]
mod tests;
