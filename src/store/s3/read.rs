//! Bounded GETs: an object's body and ETag, never more bytes than the caller can use, and
//! revalidation with `If-None-Match`; item GETs are hedged when slow ([`super::hedge`]).

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::failure::Failure;
use super::limit::slow_down;
use super::S3Store;
use crate::store::{charge, StoreError, Version};

/// What a GET of an item object found, when it may be conditional.
pub(super) enum Revalidation {
    Unchanged,
    Current(Option<(Bytes, Version)>),
}

/// What a bounded GET found.
pub(super) enum Fetched {
    Missing,
    /// Still the version the GET named in `If-None-Match` (304): no body sent.
    NotModified,
    /// Larger than the caller said the object can be: not read.
    TooLarge(u64),
    Body(Bytes, Version),
}

impl S3Store {
    /// One GET within `deadline`, reading at most `max_bytes` of body: a larger object is
    /// reported, not downloaded (its length is checked before reading, and again as it comes).
    pub(super) async fn read_object(
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
            let mut throttles = 0;
            let mut out = loop {
                let get = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(name)
                    .set_if_none_match(unless.map(|v| v.0.clone()));
                let sent = Instant::now();
                let answered = get.send().await;
                let hedging = &self.requests.hedging;
                let f = match answered {
                    Ok(out) => {
                        hedging.record(sent.elapsed());
                        break out;
                    }
                    Err(e) => Failure::from_sdk(e),
                };
                // The SDK reports 304 as an error: it is the answer a revalidation asks for.
                return match f.status {
                    Some(404) => {
                        hedging.record(sent.elapsed());
                        Ok(Fetched::Missing)
                    }
                    Some(304) if unless.is_some() => {
                        hedging.record(sent.elapsed());
                        Ok(Fetched::NotModified)
                    }
                    // Still throttled after the SDK's retries: slower, until the deadline.
                    _ if f.throttled() && slow_down(&mut throttles, deadline).await => continue,
                    _ => Err(f.unavailable("GetObject")),
                };
            };
            let declared = out.content_length().unwrap_or(0).max(0) as u64;
            if declared > max_bytes as u64 {
                return Ok(Fetched::TooLarge(declared));
            }
            // A retrieval's memory budget takes the body before it is read, or it is not.
            charge::charge_body(declared).map_err(StoreError::OverBudget)?;
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
    pub(super) async fn get_item_object(
        &self,
        name: &str,
    ) -> Result<Option<(Bytes, Version)>, StoreError> {
        match self.get_item_unless(name, None).await? {
            Revalidation::Current(read) => Ok(read),
            Revalidation::Unchanged => Err(StoreError::Unavailable(
                "S3 GetObject: 304 without a condition".into(),
            )),
        }
    }

    /// [`get_item_object`](Self::get_item_object), or `Unchanged` when the object is still
    /// the version `unless` names.
    pub(super) async fn get_item_unless(
        &self,
        name: &str,
        unless: Option<&Version>,
    ) -> Result<Revalidation, StoreError> {
        let limit = self.codec.max_object_bytes();
        let deadline = self.deadline();
        // A slow GET is sent again (never while S3 throttles): the first answer wins.
        let may_hedge = !self.requests.in_flight.throttling();
        let fetched = (self.requests.hedging)
            .run(may_hedge, || {
                self.read_object_unless(name, unless, limit, deadline)
            })
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
