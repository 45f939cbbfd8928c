//! The S3 store: each item is one object named `<prefix><sha1-hex-of-key>`.
//!
//! Every S3 type and status code stays in this file. Creates are PUTs with
//! `If-None-Match: *`, updates PUTs with `If-Match: <etag>`, so read-modify-write commands
//! are atomic across replicas on stores that honour conditional writes (checked at
//! startup). Every call waits for a slot under a global in-flight cap and runs under the
//! SDK's attempt and operation deadlines, so a stalled backend answers an error, not a hang.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketCannedAcl, CreateBucketConfiguration, Delete, ObjectCannedAcl, ObjectIdentifier,
    StorageClass,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::format::Codec;
use super::{
    is_item_name, key_hash, normalize_prefix, Entry, ListPage, ObjectInfo, PutMode, Store,
    StoreError, StoreInfo, Version, Versioned, CONTROL_DIR, DELETE_BATCH,
};
use crate::config::Config;

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
}

impl S3Settings {
    pub fn from_config(c: &Config) -> Self {
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
            codec: Codec {
                gzip_min_bytes: c.is_gzipped.then_some(c.gzip_min_bytes),
                max_value_bytes: c.max_item_size,
            },
        }
    }
}

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    codec: Codec,
    storage_class: Option<StorageClass>,
    /// The canned ACL to send; cleared (once, with a warning) if the bucket refuses ACLs.
    acl: std::sync::RwLock<Option<ObjectCannedAcl>>,
    acl_refused: AtomicBool,
    /// Whether the store enforced a conditional write when probed.
    atomic: AtomicBool,
    in_flight: Arc<Semaphore>,
    operation_timeout: Duration,
}

/// What failed, in S3's terms, before it becomes a [`StoreError`].
#[derive(Debug)]
struct Failure {
    status: Option<u16>,
    code: String,
    message: String,
}

impl Failure {
    fn from_sdk<E: ProvideErrorMetadata + std::error::Error + 'static, R>(
        err: SdkError<E, R>,
    ) -> Self
    where
        R: std::fmt::Debug + HasStatus,
    {
        let status = err.raw_response().map(HasStatus::status);
        let kind = match &err {
            SdkError::TimeoutError(_) => "timeout",
            SdkError::DispatchFailure(_) => "connection failed",
            SdkError::ResponseError(_) => "bad response",
            SdkError::ConstructionFailure(_) => "request construction failed",
            _ => "",
        };
        let (code, message) = match err.as_service_error() {
            Some(e) => (
                e.code().unwrap_or_default().to_owned(),
                e.message().unwrap_or_default().to_owned(),
            ),
            None => (String::new(), kind.to_owned()),
        };
        Failure {
            status,
            code,
            message,
        }
    }

    fn unavailable(&self, op: &str) -> StoreError {
        let what = match (self.status, self.code.is_empty()) {
            (Some(s), false) => format!("{} {}", s, self.code),
            (Some(s), true) => s.to_string(),
            (None, _) => self.message.clone(),
        };
        StoreError::Unavailable(format!("S3 {op}: {what}"))
    }

    fn is(&self, status: u16) -> bool {
        self.status == Some(status)
    }
}

/// The HTTP status of a raw response, so [`Failure`] needs no SDK-internal types by name.
trait HasStatus {
    fn status(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

impl S3Store {
    /// Connects, optionally creates the bucket, and probes conditional-write support.
    pub async fn connect(s: S3Settings) -> Result<Self, StoreError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(s.attempt_timeout)
                    .operation_attempt_timeout(s.attempt_timeout)
                    .operation_timeout(s.operation_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(s.max_attempts));
        if !s.region.is_empty() {
            loader = loader.region(Region::new(s.region.clone()));
        }
        if let Some((id, secret)) = &s.access_key {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "s3cached-config",
            ));
        }
        let sdk = loader.load().await;
        let mut builder =
            aws_sdk_s3::config::Builder::from(&sdk).force_path_style(s.force_path_style);
        if sdk.region().is_none() {
            builder = builder.region(Region::new("us-east-1"));
        }
        if !s.endpoint_url.is_empty() {
            builder = builder.endpoint_url(&s.endpoint_url);
        }
        if !s.checksum_when_supported {
            builder = builder
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        let client = Client::from_conf(builder.build());
        let store = S3Store {
            client,
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            codec: s.codec,
            storage_class: s.storage_class.as_deref().map(StorageClass::from),
            acl: std::sync::RwLock::new(
                (!s.default_acl.is_empty()).then(|| ObjectCannedAcl::from(s.default_acl.as_str())),
            ),
            acl_refused: AtomicBool::new(false),
            atomic: AtomicBool::new(true),
            in_flight: Arc::new(Semaphore::new(s.max_in_flight)),
            operation_timeout: s.operation_timeout,
        };
        if s.create_bucket {
            let acl = if s.bucket_acl.is_empty() {
                &s.default_acl
            } else {
                &s.bucket_acl
            };
            store.ensure_bucket(acl, &s.region).await?;
        }
        let atomic = store.probe_conditional_writes().await?;
        store.atomic.store(atomic, Relaxed);
        if atomic {
            tracing::info!(bucket = %s.bucket, prefix = %s.prefix, "S3 store ready; conditional writes enforced");
        } else {
            tracing::warn!(
                bucket = %s.bucket,
                "the S3 store ignores conditional writes (If-None-Match / If-Match): add, cas, \
                 incr/decr, append/prepend and touch are NOT atomic across replicas"
            );
        }
        Ok(store)
    }

    fn object_name(&self, key: &[u8]) -> String {
        format!("{}{}", self.prefix, key_hash(key))
    }

    fn control_name(&self, name: &str) -> String {
        format!("{}{}/{}", self.prefix, CONTROL_DIR, name)
    }

    /// Runs one S3 call under the in-flight cap and the operation deadline.
    async fn call<T, F>(&self, op: &str, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let _slot = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("S3 store closed".into()))?;
        // The SDK enforces the same deadline; this one also covers reading the body.
        match tokio::time::timeout(self.operation_timeout + Duration::from_millis(250), fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!("S3 {op}: timeout"))),
        }
    }

    async fn ensure_bucket(&self, acl: &str, region: &str) -> Result<(), StoreError> {
        let head = self.client.head_bucket().bucket(&self.bucket).send().await;
        match head {
            Ok(_) => return Ok(()),
            Err(e) => {
                let f = Failure::from_sdk(e);
                if !f.is(404) {
                    return Err(f.unavailable("HeadBucket"));
                }
            }
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        if !acl.is_empty() {
            create = create.acl(BucketCannedAcl::from(acl));
        }
        if !region.is_empty() && region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(region.into())
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "created bucket");
                Ok(())
            }
            Err(e) => {
                let f = Failure::from_sdk(e);
                match f.code.as_str() {
                    "BucketAlreadyOwnedByYou" | "BucketAlreadyExists" => Ok(()),
                    _ => Err(f.unavailable("CreateBucket")),
                }
            }
        }
    }

    /// Writes a probe object twice with `If-None-Match: *`: the second must be refused.
    async fn probe_conditional_writes(&self) -> Result<bool, StoreError> {
        let name = self.control_name(&format!("probe-{:016x}", rand::random::<u64>()));
        let body = Bytes::from_static(b"probe");
        self.put_raw(&name, body.clone(), &PutMode::Create).await?;
        let second = self.put_raw(&name, body, &PutMode::Create).await;
        let _ = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&name)
            .send()
            .await;
        match second {
            Err(StoreError::Exists) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One PUT with the precondition of `mode`; retries a 409 conflict.
    async fn put_raw(
        &self,
        name: &str,
        body: Bytes,
        mode: &PutMode,
    ) -> Result<Version, StoreError> {
        const MAX_CONFLICT_RETRIES: usize = 5;
        for attempt in 0..=MAX_CONFLICT_RETRIES {
            let acl = self.acl.read().expect("acl lock").clone();
            let mut put = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(name)
                .body(ByteStream::from(body.clone()))
                .set_acl(acl.clone())
                .set_storage_class(self.storage_class.clone());
            match mode {
                PutMode::Overwrite => {}
                PutMode::Create => put = put.if_none_match("*"),
                PutMode::Update(Version(etag)) => put = put.if_match(etag),
            }
            let result = self
                .call("PutObject", async { Ok(put.send().await) })
                .await?;
            let f = match result {
                Ok(out) => return Ok(Version(out.e_tag().unwrap_or_default().to_owned())),
                Err(e) => Failure::from_sdk(e),
            };
            if f.code == "AccessControlListNotSupported" && acl.is_some() {
                if !self.acl_refused.swap(true, Relaxed) {
                    tracing::warn!(
                        bucket = %self.bucket,
                        "the bucket refuses ACLs (Object Ownership: bucket owner enforced); \
                         writing without default_acl from now on"
                    );
                }
                *self.acl.write().expect("acl lock") = None;
                continue;
            }
            match (f.status, mode) {
                (Some(412), PutMode::Create) => return Err(StoreError::Exists),
                (Some(412), _) | (Some(404), PutMode::Update(_)) => {
                    return Err(StoreError::Changed)
                }
                (Some(409), _) if attempt < MAX_CONFLICT_RETRIES => {
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                    continue;
                }
                _ => return Err(f.unavailable("PutObject")),
            }
        }
        Err(StoreError::Unavailable(
            "S3 PutObject: repeated conflicts".into(),
        ))
    }

    /// One GET: the body and its ETag, `None` when absent.
    async fn get_raw(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        self.call("GetObject", async {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(name)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let f = Failure::from_sdk(e);
                    return if f.is(404) {
                        Ok(None)
                    } else {
                        Err(f.unavailable("GetObject"))
                    };
                }
            };
            let etag = Version(out.e_tag().unwrap_or_default().to_owned());
            let body = out
                .body
                .collect()
                .await
                .map_err(|e| StoreError::Unavailable(format!("S3 GetObject body: {e}")))?
                .into_bytes();
            Ok(Some((body, etag)))
        })
        .await
    }
}

#[async_trait]
impl Store for S3Store {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let name = self.object_name(key);
        let Some((raw, version)) = self.get_raw(&name).await? else {
            return Ok(None);
        };
        Ok(self
            .codec
            .decode_item(&raw, key, &name)
            .map(|entry| Versioned { entry, version }))
    }

    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        let name = self.object_name(&entry.key);
        self.put_raw(&name, self.codec.encode(entry), &mode).await
    }

    async fn delete(&self, key: &[u8], version: Option<&Version>) -> Result<bool, StoreError> {
        let name = self.object_name(key);
        if version.is_none() {
            // S3 answers 204 whether or not the object existed: ask first.
            let head = self
                .call("HeadObject", async {
                    Ok(self
                        .client
                        .head_object()
                        .bucket(&self.bucket)
                        .key(&name)
                        .send()
                        .await)
                })
                .await?;
            if let Err(e) = head {
                let f = Failure::from_sdk(e);
                return if f.is(404) {
                    Ok(false)
                } else {
                    Err(f.unavailable("HeadObject"))
                };
            }
        }
        let mut delete = self.client.delete_object().bucket(&self.bucket).key(&name);
        if let Some(Version(etag)) = version {
            delete = delete.if_match(etag);
        }
        let result = self
            .call("DeleteObject", async { Ok(delete.send().await) })
            .await?;
        match result {
            Ok(_) => Ok(true),
            Err(e) => {
                let f = Failure::from_sdk(e);
                if f.is(412) || f.is(409) {
                    Err(StoreError::Changed)
                } else if f.is(404) {
                    Ok(false)
                } else {
                    Err(f.unavailable("DeleteObject"))
                }
            }
        }
    }

    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError> {
        let mut objects = Vec::new();
        let mut after = cursor;
        // Skip pages that hold only control objects or foreign names.
        loop {
            let req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .max_keys(limit.clamp(1, 1000) as i32)
                .set_start_after(after.clone());
            let out = self
                .call("ListObjectsV2", async { Ok(req.send().await) })
                .await?
                .map_err(|e| Failure::from_sdk(e).unavailable("ListObjectsV2"))?;
            let mut last = None;
            for o in out.contents() {
                let Some(name) = o.key() else { continue };
                last = Some(name.to_owned());
                let short = &name[self.prefix.len().min(name.len())..];
                if is_item_name(short) {
                    objects.push(ObjectInfo {
                        name: name.to_owned(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified_ms: o
                            .last_modified()
                            .map_or(0, |t| t.to_millis().unwrap_or(0).max(0) as u64),
                    });
                }
            }
            let truncated = out.is_truncated().unwrap_or(false) && last.is_some();
            if !truncated {
                return Ok(ListPage {
                    objects,
                    next: None,
                    other_bytes: 0,
                });
            }
            if !objects.is_empty() {
                return Ok(ListPage {
                    objects,
                    next: last,
                    other_bytes: 0,
                });
            }
            after = last;
        }
    }

    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        if !name.starts_with(&self.prefix) {
            return Ok(None);
        }
        let raw = self.get_raw(name).await?;
        Ok(raw.and_then(|(raw, _)| self.codec.decode(&raw).ok().map(|e| e.stored_at_us)))
    }

    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        let mut removed = 0;
        for batch in names.chunks(DELETE_BATCH) {
            let ids = batch
                .iter()
                .map(|n| ObjectIdentifier::builder().key(n).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::Unavailable(format!("S3 DeleteObjects: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::Unavailable(format!("S3 DeleteObjects: {e}")))?;
            let req = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete);
            let out = self
                .call("DeleteObjects", async { Ok(req.send().await) })
                .await?
                .map_err(|e| Failure::from_sdk(e).unavailable("DeleteObjects"))?;
            let failed = out.errors().len();
            if failed > 0 {
                tracing::warn!(failed, "some objects were not deleted");
            }
            removed += batch.len() - failed;
        }
        Ok(removed)
    }

    async fn get_control(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        self.get_raw(&self.control_name(name)).await
    }

    async fn put_control(
        &self,
        name: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<Version, StoreError> {
        self.put_raw(&self.control_name(name), body, &mode).await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "s3",
            atomic: self.atomic.load(Relaxed),
        }
    }
}
