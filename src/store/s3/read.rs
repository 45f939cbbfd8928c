//! Bounded GETs: an object's body and ETag, never more bytes than the caller can use, and
//! revalidation with `If-None-Match`; item GETs are hedged when slow ([`super::hedge`]).

use std::future::Future;

use aws_sdk_s3::primitives::ByteStream;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::time::Instant;

use super::failure::Failure;
use super::limit::slow_down;
use super::S3Store;
use crate::store::body::{self, Body};
use crate::store::format::{decode_head, Head, CHECKSUM_BYTES, MAX_HEAD_BYTES};
use crate::store::{charge, StoreError, Version};

/// What a GET of an item object found, when it may be conditional.
pub(super) enum Revalidation {
    Unchanged,
    Current(Option<Object>),
}

/// An item object as read: whole, or its head alone (a value to stream).
pub(super) enum Object {
    Whole(Bytes, Version),
    /// The object's head and its whole length.
    Head(Head, Version, u64),
}

/// What a bounded GET found.
pub(super) enum Fetched {
    Missing,
    /// Still the version the GET named in `If-None-Match` (304): no body sent.
    NotModified,
    /// Larger than the caller said the object can be: not read.
    TooLarge(u64),
    Body(Bytes, Version),
    /// Its value is longer than the caller streams above: only the head was read (its
    /// bytes, and the object's length).
    Head(Head, Version, u64),
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
        self.read_object_unless(name, None, max_bytes, None, deadline)
            .await
    }

    /// A bounded GET, with `If-None-Match: <etag>` when `unless` is given: S3 then answers
    /// 304 Not Modified, with no body, if the object is still that version. An object whose
    /// value is surely longer than `stream_above` is read up to its head only.
    async fn read_object_unless(
        &self,
        name: &str,
        unless: Option<&Version>,
        max_bytes: usize,
        stream_above: Option<usize>,
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
            let etag = Version(out.e_tag().unwrap_or_default().to_owned());
            let mut body = BytesMut::new();
            let beyond = MAX_HEAD_BYTES + CHECKSUM_BYTES;
            if stream_above.is_some_and(|above| declared > above.saturating_add(beyond) as u64) {
                match read_head(&mut out.body, &mut body).await? {
                    Some(head) if !head.gzipped => {
                        return Ok(Fetched::Head(head, etag, declared));
                    }
                    // Gzipped (by an older release) or foreign: read whole, as any other.
                    _ => {}
                }
            }
            // A retrieval's memory budget takes the body before it is read, or it is not.
            charge::charge_body(declared).map_err(StoreError::OverBudget)?;
            body.reserve(declared as usize - body.len());
            while let Some(chunk) = out.body.next().await {
                let chunk = chunk.map_err(body_failed)?;
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

    /// `read` (a GET), sent again when slow, never while S3 throttles: the first answer
    /// wins ([`super::hedge`]).
    pub(super) async fn hedged<F, Fut>(&self, read: F) -> Result<Fetched, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Fetched, StoreError>>,
    {
        let may_hedge = !self.requests.in_flight.throttling();
        self.requests.hedging.run(may_hedge, read).await
    }

    /// One GET of an item object: the body and its ETag, `None` when absent or larger than
    /// any item can be (a foreign object: logged, not downloaded). Its head alone when its
    /// value is longer than `stream_above`.
    pub(super) async fn get_item_object(
        &self,
        name: &str,
        stream_above: Option<usize>,
    ) -> Result<Option<Object>, StoreError> {
        match self.get_item_unless(name, None, stream_above).await? {
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
        stream_above: Option<usize>,
    ) -> Result<Revalidation, StoreError> {
        let limit = self.codec.max_object_bytes();
        let deadline = self.deadline();
        let fetched = self
            .hedged(|| self.read_object_unless(name, unless, limit, stream_above, deadline))
            .await?;
        Ok(match fetched {
            Fetched::Body(body, version) => {
                Revalidation::Current(Some(Object::Whole(body, version)))
            }
            Fetched::Head(head, version, len) => {
                Revalidation::Current(Some(Object::Head(head, version, len)))
            }
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

/// Reads `body` into `into` until an object's head is in it: the head, or `None` when the
/// object is not an item's (its first bytes stay in `into`).
async fn read_head(body: &mut ByteStream, into: &mut BytesMut) -> Result<Option<Head>, StoreError> {
    loop {
        match decode_head(into) {
            Ok(Some(head)) => return Ok(Some(head)),
            Err(_) => return Ok(None),
            Ok(None) if into.len() > MAX_HEAD_BYTES => return Ok(None),
            Ok(None) => {}
        }
        match body.next().await {
            Some(chunk) => into.extend_from_slice(&chunk.map_err(body_failed)?),
            None => return Ok(None),
        }
    }
}

fn body_failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("S3 GetObject body: {e}"))
}

impl S3Store {
    /// The value of the item object `name`, for `key`, streamed if the object is still at
    /// `version` (`None`: it changed or is gone). The GET is not hedged (a second copy of a
    /// long value costs more than a slow first byte); its answer and head come within the
    /// operation deadline, and then each piece within the operation timeout of the last.
    pub(super) async fn open_item(
        &self,
        name: &str,
        key: &[u8],
        version: &Version,
    ) -> Result<Option<Body>, StoreError> {
        let deadline = self.deadline();
        let Some(slot) = self.slot(deadline).await else {
            return Err(StoreError::Unavailable("S3 GetObject: timeout".into()));
        };
        let open = async {
            let get = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(name)
                .if_match(version.0.clone());
            let mut out = match get.send().await {
                Ok(out) => out,
                Err(e) => {
                    let f = Failure::from_sdk(e);
                    return match f.status {
                        Some(404 | 412) => Ok(None),
                        _ => Err(f.unavailable("GetObject")),
                    };
                }
            };
            let declared = out.content_length().unwrap_or(0).max(0) as u64;
            let mut first = BytesMut::new();
            let head = match read_head(&mut out.body, &mut first).await? {
                Some(head) if !head.gzipped && head.entry.key == key => head,
                _ => return Err(body_failed("not the streamed item it was")),
            };
            if head.object_len() as u64 != declared {
                return Err(body_failed("length does not match its header"));
            }
            Ok(Some((head, first, out.body)))
        };
        let (head, mut first, rest) = match tokio::time::timeout_at(deadline, open).await {
            Ok(Ok(Some(opened))) => opened,
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(StoreError::Unavailable("S3 GetObject: timeout".into())),
        };
        // The slot bounds requests being sent, not bodies waiting for a slow reader.
        drop(slot);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&first[..head.value_at]);
        let after_head = first.split_off(head.value_at).freeze();
        let timeout = self.operation_timeout;
        let pieces = futures::stream::unfold(Some(rest), move |rest| async move {
            let mut rest = rest?;
            match tokio::time::timeout(timeout, rest.next()).await {
                Ok(Some(Ok(piece))) => Some((Ok(piece), Some(rest))),
                Ok(Some(Err(e))) => Some((Err(body_failed(e)), None)),
                Ok(None) => None,
                Err(_) => Some((Err(body_failed("timeout")), None)),
            }
        });
        let rest = futures::stream::iter([Ok(after_head)])
            .chain(pieces)
            .boxed();
        let len = head.value_len as u64;
        Ok(Some(Body {
            len,
            chunks: body::value_stream(crc, rest, len, head.checksum),
        }))
    }
}
