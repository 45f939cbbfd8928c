//! The S3 store: each item is one object named `<prefix><sha1-hex-of-key>`.
//!
//! Every S3 type and status code stays in this module and its children: [`settings`]
//! (configuration and the SDK client), [`failure`] (errors in S3's terms), [`write`]
//! (PUTs, conditional ones applied exactly once), [`probe`] (startup checks and the ACL
//! fallback), [`skew`] (the offset to the store's clock). Creates are PUTs with `If-None-Match: *`, updates PUTs with
//! `If-Match: <etag>`, so read-modify-write commands are atomic across replicas on stores
//! that honour conditional writes (checked at startup). Every call counts from the moment
//! it is asked for: the wait for a slot under the global in-flight cap and the SDK's
//! attempts all fit in one operation deadline, so a stalled backend answers an error in
//! time, not a hang.

mod failure;
mod probe;
mod settings;
mod skew;
mod write;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::types::{Delete, ObjectCannedAcl, ObjectIdentifier, StorageClass};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use self::failure::Failure;
pub use self::settings::S3Settings;
use super::format::Codec;
use super::{
    is_item_name, key_hash, Entry, ListPage, ObjectInfo, PutMode, Revalidated, Store, StoreError,
    StoreInfo, Version, Versioned, CONTROL_DIR, DELETE_BATCH,
};
use crate::clock::{Clock, StoreTime};

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
    /// One operation's budget, from the moment it is asked for, slot wait included.
    operation_timeout: Duration,
    /// One attempt's budget; also the time given to settle a PUT whose answer was lost.
    attempt_timeout: Duration,
    /// Attempts per PUT (retried in [`write`], not by the SDK).
    max_attempts: u32,
    /// The store's time, as measured from its answers.
    time: &'static StoreTime,
}

/// Largest control object (flush epoch, cull lease: a few dozen bytes) that is read.
pub const MAX_CONTROL_BYTES: usize = 4096;

/// What a GET of an item object found, when it may be conditional.
enum Revalidation {
    Unchanged,
    Current(Option<(Bytes, Version)>),
}

/// What a bounded GET found.
enum Fetched {
    Missing,
    /// Still the version the GET named in `If-None-Match` (304): no body sent.
    NotModified,
    /// Larger than the caller said the object can be: not read.
    TooLarge(u64),
    Body(Bytes, Version),
}

impl S3Store {
    /// Connects, optionally creates the bucket, and probes conditional-write support.
    pub async fn connect(s: S3Settings) -> Result<Self, StoreError> {
        let time = StoreTime::leak(s.clock_skew_ms);
        let store = S3Store {
            client: s.client(time).await,
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
            attempt_timeout: s.attempt_timeout,
            max_attempts: s.max_attempts.max(1),
            time,
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

    /// A clock that reads the store's time (measured from every answer, first at connect),
    /// for stamping items and flush epochs alike on every replica.
    pub fn clock(&self) -> Clock {
        Clock::Store(self.time)
    }

    fn object_name(&self, key: &[u8]) -> String {
        format!("{}{}", self.prefix, key_hash(key))
    }

    fn control_name(&self, name: &str) -> String {
        format!("{}{}/{}", self.prefix, CONTROL_DIR, name)
    }

    /// When an operation asked for now must have answered.
    fn deadline(&self) -> Instant {
        Instant::now() + self.operation_timeout
    }

    /// A slot under the in-flight cap, or `None` if none frees up before `deadline`.
    async fn slot(&self, deadline: Instant) -> Option<SemaphorePermit<'_>> {
        tokio::time::timeout_at(deadline, self.in_flight.acquire())
            .await
            .ok()?
            .ok()
    }

    /// Runs one S3 call under the in-flight cap, within one operation deadline counted from
    /// now: the wait for a slot is part of it.
    async fn call<T, F>(&self, op: &str, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = self.deadline();
        let Some(_slot) = self.slot(deadline).await else {
            return Err(StoreError::Unavailable(format!("S3 {op}: timeout")));
        };
        // The SDK's own deadline starts later, after the slot; this one also covers the body.
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!("S3 {op}: timeout"))),
        }
    }

    /// One GET within `deadline`, reading at most `max_bytes` of body: a larger object is
    /// reported, not downloaded (its length is checked before reading, and again as it comes).
    async fn read_object(
        &self,
        name: &str,
        max_bytes: usize,
        deadline: Instant,
    ) -> Result<Fetched, StoreError> {
        self.read_object_unless(name, None, max_bytes, deadline)
            .await
    }

    /// A bounded GET, with `If-None-Match: <etag>` when `unless` is given: S3 then answers
    /// 304 Not Modified, with no body, if the object is still that version.
    async fn read_object_unless(
        &self,
        name: &str,
        unless: Option<&Version>,
        max_bytes: usize,
        deadline: Instant,
    ) -> Result<Fetched, StoreError> {
        let Some(_slot) = self.slot(deadline).await else {
            return Err(StoreError::Unavailable("S3 GetObject: timeout".into()));
        };
        let read = async {
            let get = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(name)
                .set_if_none_match(unless.map(|v| v.0.clone()));
            let mut out = match get.send().await {
                Ok(out) => out,
                Err(e) => {
                    let f = Failure::from_sdk(e);
                    // The SDK reports 304 as an error: it is the answer a revalidation asks for.
                    return match f.status {
                        Some(404) => Ok(Fetched::Missing),
                        Some(304) if unless.is_some() => Ok(Fetched::NotModified),
                        _ => Err(f.unavailable("GetObject")),
                    };
                }
            };
            let declared = out.content_length().unwrap_or(0).max(0) as u64;
            if declared > max_bytes as u64 {
                return Ok(Fetched::TooLarge(declared));
            }
            let etag = Version(out.e_tag().unwrap_or_default().to_owned());
            let mut body = BytesMut::with_capacity(declared as usize);
            while let Some(chunk) = out.body.next().await {
                let chunk = chunk
                    .map_err(|e| StoreError::Unavailable(format!("S3 GetObject body: {e}")))?;
                if body.len() + chunk.len() > max_bytes {
                    return Ok(Fetched::TooLarge((body.len() + chunk.len()) as u64));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Fetched::Body(body.freeze(), etag))
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("S3 GetObject: timeout".into())),
        }
    }

    /// One GET of an item object: the body and its ETag, `None` when absent or larger than
    /// any item can be (a foreign object: logged, not downloaded).
    async fn get_item_object(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        match self.get_item_unless(name, None).await? {
            Revalidation::Current(read) => Ok(read),
            Revalidation::Unchanged => Err(StoreError::Unavailable(
                "S3 GetObject: 304 without a condition".into(),
            )),
        }
    }

    /// [`get_item_object`](Self::get_item_object), or `Unchanged` when the object is still
    /// the version `unless` names.
    async fn get_item_unless(
        &self,
        name: &str,
        unless: Option<&Version>,
    ) -> Result<Revalidation, StoreError> {
        let limit = self.codec.max_object_bytes();
        let fetched = self
            .read_object_unless(name, unless, limit, self.deadline())
            .await?;
        Ok(match fetched {
            Fetched::Body(body, version) => Revalidation::Current(Some((body, version))),
            Fetched::Missing => Revalidation::Current(None),
            Fetched::NotModified => Revalidation::Unchanged,
            Fetched::TooLarge(bytes) => {
                tracing::warn!(
                    object = %name,
                    bytes,
                    limit,
                    "object larger than any item can be; treated as a miss, not downloaded"
                );
                Revalidation::Current(None)
            }
        })
    }
}

#[async_trait]
impl Store for S3Store {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let name = self.object_name(key);
        let Some((raw, version)) = self.get_item_object(&name).await? else {
            return Ok(None);
        };
        Ok(self
            .codec
            .decode_item(&raw, key, &name)
            .map(|entry| Versioned { entry, version }))
    }

    async fn get_if_changed(
        &self,
        key: &[u8],
        version: &Version,
    ) -> Result<Revalidated, StoreError> {
        let name = self.object_name(key);
        Ok(match self.get_item_unless(&name, Some(version)).await? {
            Revalidation::Unchanged => Revalidated::Unchanged,
            Revalidation::Current(None) => Revalidated::Changed(None),
            Revalidation::Current(Some((raw, version))) => Revalidated::Changed(
                self.codec
                    .decode_item(&raw, key, &name)
                    .map(|entry| Versioned { entry, version }),
            ),
        })
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
        self.delete_raw(&name, version).await
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
        let raw = self.get_item_object(name).await?;
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
        let full = self.control_name(name);
        match self
            .read_object(&full, MAX_CONTROL_BYTES, self.deadline())
            .await?
        {
            Fetched::Body(body, version) => Ok(Some((body, version))),
            Fetched::Missing => Ok(None),
            Fetched::NotModified => Err(StoreError::Unavailable(
                "S3 GetObject: 304 without a condition".into(),
            )),
            // Read on every request: a huge object here is an error, never a download.
            Fetched::TooLarge(bytes) => Err(StoreError::Unavailable(format!(
                "S3 GetObject: control object {full} is {bytes} bytes, not s3cached's"
            ))),
        }
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
