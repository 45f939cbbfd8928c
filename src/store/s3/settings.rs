//! The S3 store's settings (made by [`app`](crate::app) from the configuration), and the SDK
//! client built from them.

use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::Client;

use super::counts::{S3Prices, S3Requests};
use super::requests::RequestCounter;
use super::skew::DateProbe;
use crate::clock::StoreTime;
use crate::store::format::Codec;

/// Everything the S3 store needs to know, and nothing more: the store never reads the
/// whole configuration.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// The bucket items live in.
    pub bucket: String,
    /// Prepended to every object name: empty, or a folder ending in `/`.
    pub prefix: String,
    /// The region to sign for; empty: the SDK's chain, else us-east-1.
    pub region: String,
    /// An S3-compatible server's URL; empty for AWS.
    pub endpoint_url: String,
    /// `host/bucket/key` URLs, as most S3-compatible servers want.
    pub force_path_style: bool,
    /// Static credentials (id, secret); `None`: the SDK's standard credential chain.
    pub access_key: Option<(String, String)>,
    /// Canned ACL sent with every PUT; empty for none.
    pub default_acl: String,
    /// Canned ACL of a bucket this store creates; empty: `default_acl`.
    pub bucket_acl: String,
    /// Storage class sent with every PUT; `None`: the bucket's default.
    pub storage_class: Option<String>,
    /// Create the bucket at startup if it does not exist.
    pub create_bucket: bool,
    /// Send the SDK's default request checksums (some S3-compatible stores reject them).
    pub checksum_when_supported: bool,
    /// One attempt's budget, connecting included.
    pub attempt_timeout: Duration,
    /// One operation's budget, every attempt and the wait for a slot included.
    pub operation_timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// S3 calls in flight at once, across all connections.
    pub max_in_flight: usize,
    /// How items become object bodies.
    pub codec: Codec,
    /// Testing only: this replica's clock error, in ms (`clock_offset_ms`).
    pub clock_skew_ms: i64,
    /// `server_side_encryption`: AES256 or aws:kms, sent on every PUT.
    pub server_side_encryption: Option<String>,
    /// `sse_kms_key_id`: the KMS key for aws:kms.
    pub sse_kms_key_id: Option<String>,
    /// Prices per 1,000 requests, for the cost estimate.
    pub prices: S3Prices,
    /// When a slow GET is sent a second time.
    pub hedge: super::HedgeSettings,
}

impl S3Settings {
    /// The SDK client: attempt and operation deadlines, bounded retries (for idempotent
    /// calls; PUTs turn them off and retry in [`write`](super::write)), and the `Date`
    /// probe that keeps `time` on the store's clock.
    pub(super) async fn client(
        &self,
        time: &'static StoreTime,
        requests: Arc<S3Requests>,
    ) -> Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.attempt_timeout)
                    .operation_attempt_timeout(self.attempt_timeout)
                    .operation_timeout(self.operation_timeout)
                    .build(),
            )
            // Throttled reads (503 SlowDown, 429) back off from 50 ms with jitter, not the
            // SDK's 1 s, so they fit the operation deadline.
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(self.max_attempts)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_secs(1)),
            );
        if !self.region.is_empty() {
            loader = loader.region(Region::new(self.region.clone()));
        }
        if let Some((id, secret)) = &self.access_key {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "s3cached-config",
            ));
        }
        let sdk = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(self.force_path_style)
            .interceptor(DateProbe::new(time))
            .interceptor(RequestCounter::new(requests));
        if sdk.region().is_none() {
            builder = builder.region(Region::new("us-east-1"));
        }
        if !self.endpoint_url.is_empty() {
            builder = builder.endpoint_url(&self.endpoint_url);
        }
        if !self.checksum_when_supported {
            builder = builder
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Client::from_conf(builder.build())
    }
}
