//! Every translation of the configuration into the settings a room takes: the S3 store's,
//! the codec's, the disk tier's, TLS's. The rooms know nothing of `Config`.

use std::time::Duration;

use std::sync::Arc;

use super::{secs, Config, ConfigError};
use crate::budget::Budget;
use crate::connection::ConnectionConfig;
use crate::peers::PeerSettings;
use crate::protocol::Limits;
use crate::stats::Stats;
use crate::store::format::Codec;
use crate::store::normalize_prefix;
use crate::store::s3::S3Settings;

impl Config {
    /// The peers' settings, when this replica has peers or hears them; `short` is the
    /// tier's window otherwise.
    pub fn peer_settings(&self, short: Duration) -> Option<PeerSettings> {
        let peers = self.peer_names();
        if peers.is_empty() && self.peer_listen.is_empty() {
            return None;
        }
        let secret = self.peer_secret.expose();
        Some(PeerSettings {
            peers,
            listen: self.peer_listen.parse().ok(),
            secret: (!secret.is_empty()).then(|| secret.as_bytes().to_vec()),
            short,
            long: Duration::from_millis(self.peer_revalidate_after_ms).max(short),
        })
    }

    /// The S3 store's settings, taken from the configuration: all the store sees of it.
    pub fn s3_settings(&self) -> S3Settings {
        let c = self;
        S3Settings {
            bucket: c.storage_bucket_name.clone(),
            prefix: normalize_prefix(&c.location),
            region: c.region.clone(),
            endpoint_url: c.endpoint_url.clone(),
            force_path_style: c.force_path_style,
            access_key: (!c.access_key_id.expose().is_empty()).then(|| {
                (
                    c.access_key_id.expose().to_owned(),
                    c.secret_access_key.expose().to_owned(),
                )
            }),
            default_acl: c.default_acl.clone(),
            bucket_acl: c.bucket_acl.clone(),
            storage_class: c.effective_storage_class().map(str::to_owned),
            create_bucket: c.create_bucket,
            checksum_when_supported: c.request_checksum == "when_supported",
            attempt_timeout: Duration::from_millis(c.s3_attempt_timeout_ms),
            operation_timeout: Duration::from_millis(c.s3_operation_timeout_ms),
            max_attempts: c.s3_max_attempts,
            max_in_flight: c.s3_max_in_flight,
            codec: c.codec(),
            clock_skew_ms: c.clock_offset_ms,
            server_side_encryption: Some(c.server_side_encryption.clone())
                .filter(|s| !s.is_empty()),
            sse_kms_key_id: Some(c.sse_kms_key_id.clone()).filter(|s| !s.is_empty()),
            prices: c.s3_prices(),
            hedge: crate::store::s3::HedgeSettings {
                percent: c.s3_hedge_percent,
                min: Duration::from_millis(c.s3_hedge_min_ms),
                max: Duration::from_millis(c.s3_hedge_max_ms),
            },
        }
    }

    /// The value codec every store writes items with, built from the config once.
    pub fn codec(&self) -> Codec {
        let config = self;
        Codec {
            gzip_min_bytes: config.is_gzipped.then_some(config.gzip_min_bytes),
            max_value_bytes: config.max_item_size,
            stream_above: config.stream_above_bytes,
        }
    }

    /// The disk tier's settings, when `disk_cache_dir` is set.
    pub fn disk_tier(&self) -> Option<crate::tier::disk::DiskConfig> {
        (!self.disk_cache_dir.as_os_str().is_empty()).then(|| crate::tier::disk::DiskConfig {
            dir: self.disk_cache_dir.clone(),
            bytes: self.disk_cache_bytes,
            max_item_bytes: self.whole_value_bytes(),
        })
    }

    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        (!self.tls_cert.as_os_str().is_empty()).then(|| crate::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: (!self.tls_ca.as_os_str().is_empty()).then(|| self.tls_ca.clone()),
        })
    }

    /// How TLS handshakes are bounded: each by the timeout, together by the pool.
    pub fn tls_handshakes(&self) -> crate::tls::HandshakeLimits {
        crate::tls::HandshakeLimits {
            timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
            max_in_progress: self.max_tls_handshakes,
        }
    }

    /// Most client sockets open at once: the connections, and with TLS the handshakes in
    /// progress, which hold no connection slot.
    pub fn client_sockets(&self) -> usize {
        match self.tls_files() {
            Some(_) => self.max_connections.saturating_add(self.max_tls_handshakes),
            None => self.max_connections,
        }
    }

    /// The S3 prices the cost estimate uses.
    pub fn s3_prices(&self) -> crate::store::s3::S3Prices {
        crate::store::s3::S3Prices {
            get_per_1000: self.s3_price_get_per_1000,
            put_per_1000: self.s3_price_put_per_1000,
            delete_per_1000: self.s3_price_delete_per_1000,
        }
    }

    /// The connections' settings, with a budget that shows its use in `stats`; fails if
    /// the SASL users file cannot be read.
    pub fn connection_config(&self, stats: Arc<Stats>) -> Result<ConnectionConfig, ConfigError> {
        Ok(ConnectionConfig {
            limits: Limits {
                max_item_bytes: self.max_item_size,
                stream_above: self.stream_above_bytes,
                ..Limits::default()
            },
            idle_timeout: self.idle_timeout(),
            request_timeout: secs(self.request_timeout_secs),
            write_timeout: secs(self.write_timeout_secs),
            budget: Budget::with_stats(self.memory_limit_bytes, Some(stats)),
            sasl: self.sasl_users()?.map(Arc::new),
            text_auth: self.text_auth,
            failed_logins: Arc::default(),
            client: None,
        })
    }
}
