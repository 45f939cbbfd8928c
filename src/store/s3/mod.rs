//! The S3 store: each item is one object named `<prefix><sha1-hex-of-key>`.
//!
//! Every S3 type and status code stays in this module and its children: [`settings`]
//! (the store's settings and the SDK client), [`failure`] (errors in S3's terms),
//! [`read`] (bounded GETs, hedged by [`hedge`] when slow), [`write`] (PUTs and DELETEs, conditional ones applied exactly
//! once, and their only retry), [`acl`] (the ACL fallback for buckets that refuse ACLs),
//! [`probe`] (bucket creation and the startup check of conditional writes), [`list`]
//! (listing and batch deletes), [`skew`] (the offset to the store's clock).
//! Creates are PUTs with `If-None-Match: *`, updates PUTs with
//! `If-Match: <etag>`, so read-modify-write commands are atomic across replicas on stores
//! that honour conditional writes (checked at startup). Every call counts from the moment
//! it is asked for: the wait for a slot under the global in-flight cap and the SDK's
//! attempts all fit in one operation deadline, so a stalled backend answers an error in
//! time, not a hang.

mod acl;
mod counts;
mod failure;
mod hedge;
pub mod lifecycle;
mod limit;
mod list;
mod probe;
mod read;
mod requests;
mod settings;
mod skew;
mod upload;
mod write;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::types::StorageClass;
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::time::Instant;

use self::acl::Acl;
pub use self::counts::{RequestClass, S3Prices, S3Requests, AWS_S3_STANDARD_PRICES};
use self::failure::Failure;
pub use self::hedge::HedgeSettings;
use self::read::{Fetched, Object, Revalidation};
pub use self::settings::S3Settings;
use crate::clock::{Clock, StoreTime};
use crate::store::body::{Body, Chunks};
use crate::store::format::Codec;
use crate::store::{
    key_hash, Entry, ListPage, PutMode, Revalidated, Store, StoreError, StoreInfo, Version,
    Versioned, CONTROL_DIR,
};

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    codec: Codec,
    storage_class: Option<StorageClass>,
    /// The canned ACL to send, until the bucket refuses ACLs.
    acl: Acl,
    /// Whether the store enforced a conditional write when probed at startup.
    atomic: bool,
    /// One operation's budget, from the moment it is asked for, slot wait included.
    operation_timeout: Duration,
    /// One attempt's budget; also the time given to settle a PUT whose answer was lost.
    attempt_timeout: Duration,
    /// Attempts per PUT (retried in [`write`], not by the SDK).
    max_attempts: u32,
    /// The store's time, as measured from its answers.
    time: &'static StoreTime,
    /// Every request sent, by price class (shared with the server's stats).
    requests: Arc<S3Requests>,
    /// Encryption at rest asked for on every PUT.
    sse: write::Encryption,
}

/// Largest control object (flush epoch, cull lease: a few dozen bytes) that is read.
pub const MAX_CONTROL_BYTES: usize = 4096;

impl S3Store {
    /// Connects, optionally creates the bucket, and probes conditional-write support.
    pub async fn connect(s: S3Settings) -> Result<Self, StoreError> {
        let time = StoreTime::leak(s.clock_skew_ms);
        let requests = Arc::new(S3Requests::new(s.prices, s.max_in_flight, s.hedge));
        let mut store = S3Store {
            client: s.client(time, requests.clone()).await,
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            codec: s.codec,
            storage_class: s.storage_class.as_deref().map(StorageClass::from),
            acl: Acl::new(&s.default_acl),
            atomic: true,
            operation_timeout: s.operation_timeout,
            attempt_timeout: s.attempt_timeout,
            max_attempts: s.max_attempts.max(1),
            time,
            requests,
            sse: write::Encryption::new(&s),
        };
        if s.create_bucket {
            let acl = if s.bucket_acl.is_empty() {
                &s.default_acl
            } else {
                &s.bucket_acl
            };
            store.ensure_bucket(acl, &s.region).await?;
        }
        store.atomic = store.probe_conditional_writes().await?;
        if store.atomic {
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

    /// A slot under the in-flight limit, or `None` if none frees up before `deadline`.
    async fn slot(&self, deadline: Instant) -> Option<limit::Slot<'_>> {
        self.requests.in_flight.slot(deadline).await
    }

    /// The item in an object read for `key`: `None` (logged) when it is not one.
    fn item(&self, object: Object, key: &[u8], name: &str) -> Option<Versioned> {
        match object {
            Object::Whole(raw, version) => self
                .codec
                .decode_item(&raw, key, name)
                .map(|entry| Versioned::whole(entry, version)),
            Object::Head(head, version, len) => {
                let whole = head.object_len() as u64 == len;
                if head.entry.key != key || !whole {
                    tracing::warn!(object = %name, "foreign or damaged object; treated as a miss");
                    return None;
                }
                let value_len = head.value_len as u64;
                Some(Versioned {
                    entry: head.entry,
                    version,
                    large: Some(value_len),
                })
            }
        }
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
}

#[async_trait]
impl Store for S3Store {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let name = self.object_name(key);
        let read = self
            .get_item_object(&name, Some(self.codec.stream_above))
            .await?;
        Ok(read.and_then(|object| self.item(object, key, &name)))
    }

    async fn get_if_changed(
        &self,
        key: &[u8],
        version: &Version,
    ) -> Result<Revalidated, StoreError> {
        let name = self.object_name(key);
        let above = Some(self.codec.stream_above);
        Ok(
            match self.get_item_unless(&name, Some(version), above).await? {
                Revalidation::Unchanged => Revalidated::Unchanged,
                Revalidation::Current(None) => Revalidated::Changed(None),
                Revalidation::Current(Some(object)) => {
                    Revalidated::Changed(self.item(object, key, &name))
                }
            },
        )
    }

    async fn open(&self, key: &[u8], version: &Version) -> Result<Option<Body>, StoreError> {
        self.open_item(&self.object_name(key), key, version).await
    }

    async fn put_streamed(
        &self,
        entry: &Entry,
        len: u64,
        value: Chunks,
    ) -> Result<Version, StoreError> {
        self.put_streamed_object(entry, len, value).await
    }

    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        let name = self.object_name(&entry.key);
        // Entries written before histories (or by tools) settle by their bytes alone.
        let history = Some(&entry.history).filter(|h| h.own().is_some());
        self.put_raw(&name, self.codec.encode(entry), &mode, history)
            .await
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
        self.list_items(cursor, limit).await
    }

    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        if !name.starts_with(&self.prefix) {
            return Ok(None);
        }
        Ok(match self.get_item_object(name, Some(0)).await? {
            Some(Object::Head(head, ..)) => Some(head.entry.stored_at_us),
            Some(Object::Whole(raw, _)) => self.codec.decode(&raw).ok().map(|e| e.stored_at_us),
            None => None,
        })
    }

    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        self.delete_batches(names).await
    }

    async fn get_control(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        let full = self.control_name(name);
        let deadline = self.deadline();
        // Hedged as item GETs are: a request may wait for this read (the flush epoch).
        match self
            .hedged(|| self.read_object(&full, MAX_CONTROL_BYTES, deadline))
            .await?
        {
            Fetched::Body(body, version) => Ok(Some((body, version))),
            Fetched::Missing => Ok(None),
            Fetched::NotModified => Err(StoreError::Unavailable(
                "S3 GetObject: 304 without a condition".into(),
            )),
            // Never asked for: control objects are read whole.
            Fetched::Head(..) => Err(StoreError::Unavailable(format!(
                "S3 GetObject: control object {full} read in part"
            ))),
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
        self.put_raw(&self.control_name(name), body, &mode, None)
            .await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "s3",
            atomic: self.atomic,
            // Reading an item's key costs a GET per object: no dump (see `Store::dump`).
            dumps: false,
            exclusive: false,
        }
    }

    fn request_counts(&self) -> Option<Arc<S3Requests>> {
        Some(self.requests.clone())
    }
}
