//! The S3 store's settings, taken from the configuration, and the SDK client built from them.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::Client;

use super::skew::DateProbe;
use crate::clock::StoreTime;
use crate::config::Config;
use crate::store::format::Codec;
use crate::store::normalize_prefix;

/// Settings of the S3 store, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub endpoint_url: String,
    pub force_path_style: bool,
    pub access_key: Option<(String, String)>,
    pub default_acl: String,
    pub bucket_acl: String,
    pub storage_class: Option<String>,
    pub create_bucket: bool,
    pub checksum_when_supported: bool,
    pub attempt_timeout: Duration,
    pub operation_timeout: Duration,
    pub max_attempts: u32,
    pub max_in_flight: usize,
    pub codec: Codec,
    /// Testing only: this replica's clock error, in ms (`clock_offset_ms`).
    pub clock_skew_ms: i64,
}

impl S3Settings {
    /// The settings `c` gives, writing items with `codec`.
    pub fn from_config(c: &Config, codec: Codec) -> Self {
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
            codec,
            clock_skew_ms: c.clock_offset_ms,
        }
    }

    /// The SDK client: attempt and operation deadlines, bounded retries (for idempotent
    /// calls; PUTs turn them off and retry in [`write`](super::write)), and the `Date`
    /// probe that keeps `time` on the store's clock.
    pub(super) async fn client(&self, time: &'static StoreTime) -> Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.attempt_timeout)
                    .operation_attempt_timeout(self.attempt_timeout)
                    .operation_timeout(self.operation_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts));
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
            .interceptor(DateProbe::new(time));
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
