//! PUTs, conditional ones applied exactly once: this is the only place a PUT is retried.
//!
//! The SDK would retry a PUT after a timeout, a dropped connection or a 5xx. For a
//! conditional PUT that is wrong: if the first attempt was applied and only its answer was
//! lost, the retry finds its own write and gets 412, which reads as a lost race, and the
//! command applies again (an `incr` twice; an `add` that succeeded answers `NOT_STORED`).
//! So PUTs are sent with SDK retries off and retried here, and an attempt whose fate is
//! unknown is settled at once by reading the object back ([`Settled`]):
//! - an item carries the ids of the writes that led to it ([`History`]), so a write that was
//!   applied is recognised by its id even after other writers followed it;
//! - a write that was not applied finds the version it was written over still stored (it is
//!   sent again, the same bytes under the same condition, so at most one attempt lands) or
//!   followed by another writer's (a lost race: the command decides again on a fresh read);
//! - when the object cannot tell (the base deleted, the history overrun or restarted by a
//!   blind `set`), the command answers `SERVER_ERROR ... outcome unknown` rather than risk
//!   applying twice, counted in `s3_write_outcomes_unknown`.
//!
//! Control objects have no history: the stored bytes being ours (every body is unique) is
//! the only proof there. DELETEs likewise: after an unknown outcome, the object gone means
//! the delete took effect, the version still there that it did not.

use aws_config::retry::RetryConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ObjectCannedAcl, ServerSideEncryption};
use bytes::Bytes;
use tokio::time::Instant;

use super::failure::Failure;
use super::limit::{pause, slow_down};
use super::read::Fetched;
use super::{S3Settings, S3Store};
use crate::store::{History, PutMode, StoreError, Version};

/// How often a 409 conflict is retried before giving up.
const MAX_CONFLICT_RETRIES: u32 = 5;
/// First pause before retrying a PUT whose fate is unknown; doubles each time.
const RETRY_BASE_MS: u64 = 25;

/// Encryption at rest (`server_side_encryption`, `sse_kms_key_id`), sent on every PUT:
/// items, control objects and the startup probe alike, so a bucket policy that refuses
/// unencrypted uploads refuses none of ours.
#[derive(Debug, Clone, Default)]
pub(super) struct Encryption {
    pub(super) mode: Option<ServerSideEncryption>,
    pub(super) kms_key_id: Option<String>,
}

impl Encryption {
    pub fn new(s: &S3Settings) -> Self {
        Encryption {
            mode: s
                .server_side_encryption
                .as_deref()
                .map(ServerSideEncryption::from),
            kms_key_id: s.sse_kms_key_id.clone(),
        }
    }
}

/// What one PUT attempt tells.
enum Attempt {
    Applied(Version),
    /// Definitely not applied (an answer came back).
    Refused(Failure),
    /// Maybe applied: no answer, or a 5xx.
    Unknown(Failure),
    /// S3 asked us to slow down (503 SlowDown, 429): not applied, to be sent again later.
    Throttled(Failure),
}

/// What the object read after an attempt whose answer was lost tells of that attempt.
#[derive(Debug)]
enum Settled {
    /// It was applied: its version, or [`Version::superseded`] when others wrote after it.
    Applied(Version),
    /// It was not, and the precondition still holds: the same bytes may be sent again.
    NotApplied,
    /// It was not, and never will be: another writer's write took its place.
    Lost(StoreError),
}

impl S3Store {
    /// Writes `body` under `name` as `mode` allows, exactly once, within one operation deadline
    /// (plus one attempt's time to settle each unknown outcome). `history` is the item's
    /// (control objects have none).
    pub(super) async fn put_raw(
        &self,
        name: &str,
        body: Bytes,
        mode: &PutMode,
        history: Option<&History>,
    ) -> Result<Version, StoreError> {
        let deadline = self.deadline();
        let conditional = *mode != PutMode::Overwrite;
        // An attempt whose answer was lost may still land (a timeout cuts our wait, not the
        // request): a later refusal may be its doing, and the object decides.
        let mut maybe_applied = false;
        let (mut attempts, mut conflicts, mut throttles) = (0u32, 0u32, 0u32);
        let err = loop {
            attempts += 1;
            let acl = self.acl.current();
            let sent_acl = acl.is_some();
            let f = match self.put_once(name, &body, mode, acl, deadline).await {
                Attempt::Applied(version) => return Ok(version),
                Attempt::Throttled(f) => {
                    // Not applied, by S3's word; should a store ever apply one anyway, a
                    // refusal of a later attempt is settled by reading, as after a lost answer.
                    maybe_applied |= conditional;
                    attempts -= 1;
                    if !slow_down(&mut throttles, deadline).await {
                        break f.unavailable("PutObject");
                    }
                    continue;
                }
                Attempt::Unknown(f) if conditional => {
                    maybe_applied = true;
                    match self.settled(name, &body, mode, history, &f).await? {
                        Settled::NotApplied => {}
                        Settled::Applied(version) => return Ok(version),
                        Settled::Lost(e) => return Err(e),
                    }
                    if attempts >= self.max_attempts || Instant::now() >= deadline {
                        // Settled as not applied, but out of time to send it again: a
                        // delayed copy may still land, so the client hears "unknown".
                        self.requests.settled(None);
                        return Err(unknown("PutObject", &f));
                    }
                    pause(RETRY_BASE_MS << (attempts - 1).min(6), deadline).await;
                    continue;
                }
                Attempt::Unknown(f) => {
                    if attempts >= self.max_attempts || Instant::now() >= deadline {
                        break f.unavailable("PutObject");
                    }
                    pause(RETRY_BASE_MS << (attempts - 1).min(6), deadline).await;
                    continue;
                }
                Attempt::Refused(f) => f,
            };
            // Refused for its ACL alone (see [`acl`](super::acl)): not applied, send it again.
            if sent_acl && self.acl.refused_by(&f, &self.bucket) {
                continue;
            }
            let err = match (f.status, mode) {
                (Some(412), PutMode::Create) => StoreError::Exists,
                // The object changed since it was read (412), or was deleted: AWS answers
                // an If-Match on a missing key with 404 NoSuchKey, not 412 (MinIO and moto
                // answer 412). Both mean the version the caller read is gone.
                (Some(412), _) | (Some(404), PutMode::Update(_)) => StoreError::Changed,
                // Real S3 occasionally answers 409 ConditionalRequestConflict when
                // conditional writes to one key are in flight at once. The write was not
                // applied and no newer version is known to have won, so it is retried here,
                // briefly and a bounded number of times, rather than reported as a lost race.
                (Some(409), _) if conflicts < MAX_CONFLICT_RETRIES => {
                    conflicts += 1;
                    pause(5 << conflicts, deadline).await;
                    continue;
                }
                (Some(409), _) => {
                    StoreError::Unavailable("S3 PutObject: repeated conflicts".into())
                }
                _ => f.unavailable("PutObject"),
            };
            break if maybe_applied && matches!(err, StoreError::Exists | StoreError::Changed) {
                // Refused because an earlier attempt landed late, or lost to another writer.
                match self.settled(name, &body, mode, history, &f).await? {
                    Settled::Applied(version) => return Ok(version),
                    Settled::Lost(e) => e,
                    // Refused, yet the precondition holds again: a race with a delete or a
                    // rewrite; the command decides again.
                    Settled::NotApplied => err,
                }
            } else {
                err
            };
        };
        Err(err)
    }

    /// Settles an attempt whose answer was lost (`why`); an outcome the object cannot tell
    /// becomes the error the command answers, counted.
    async fn settled(
        &self,
        name: &str,
        body: &Bytes,
        mode: &PutMode,
        history: Option<&History>,
        why: &Failure,
    ) -> Result<Settled, StoreError> {
        let settled = self
            .settle(name, body, mode, history)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(object = %name, cause = %e, "could not read back a write");
                None
            });
        let counts = &self.requests;
        match settled {
            Some(settled) => {
                counts.settled(Some(matches!(settled, Settled::Applied(_))));
                tracing::debug!(object = %name, ?settled, "settled a write whose answer was lost");
                Ok(settled)
            }
            None => {
                counts.settled(None);
                tracing::warn!(object = %name, "a write whose answer was lost cannot be settled");
                Err(unknown("PutObject", why))
            }
        }
    }

    /// Reads the object after an attempt whose answer was lost: what does it say of it
    /// (`None`: it cannot tell)?
    async fn settle(
        &self,
        name: &str,
        body: &Bytes,
        mode: &PutMode,
        history: Option<&History>,
    ) -> Result<Option<Settled>, StoreError> {
        let deadline = Instant::now() + self.attempt_timeout;
        let limit = self.codec.max_object_bytes().max(body.len());
        let (stored, version) = match self.read_object(name, limit, deadline).await? {
            Fetched::Body(stored, version) => (stored, version),
            // Still absent: a create was not applied (a create applied and already deleted
            // again reads the same; see docs/design.md).
            Fetched::Missing if *mode == PutMode::Create => return Ok(Some(Settled::NotApplied)),
            // The base is gone: deleted before our write, or after it.
            Fetched::Missing | Fetched::TooLarge(_) | Fetched::NotModified | Fetched::Head(..) => {
                return Ok(None)
            }
        };
        if stored == *body {
            return Ok(Some(Settled::Applied(version)));
        }
        if matches!(mode, PutMode::Update(base) if *base == version) {
            return Ok(Some(Settled::NotApplied));
        }
        let (Some(ours), Ok(current)) =
            (history.and_then(History::own), self.codec.decode(&stored))
        else {
            // No history to look in (a control object, or a foreign object now): another
            // writer's bytes are there, so ours lost, unless ours landed and was replaced.
            return Ok(match mode {
                PutMode::Create if history.is_none() => Some(Settled::Lost(StoreError::Exists)),
                PutMode::Update(_) if history.is_none() => Some(Settled::Lost(StoreError::Changed)),
                _ => None,
            });
        };
        let current = current.history;
        if let Some(after) = current.position(ours) {
            // Ours, with `after` writes since.
            self.requests
                .settled_depth_max
                .fetch_max(after as u64, std::sync::atomic::Ordering::Relaxed);
            return Ok(Some(Settled::Applied(if after == 0 {
                version
            } else {
                Version::superseded()
            })));
        }
        Ok(match mode {
            // Our base followed by another writer's write: only one write can follow a
            // version, so ours was not applied and never will be.
            PutMode::Update(_) => match history.and_then(History::base) {
                Some(base) if current.position(base).is_some_and(|at| at > 0) => {
                    Some(Settled::Lost(StoreError::Changed))
                }
                _ => None,
            },
            // The whole chain since the object's create, and ours not in it.
            PutMode::Create if current.from_create => Some(Settled::Lost(StoreError::Exists)),
            _ => None,
        })
    }

    /// Removes `name` (only if still at `version`, when given), exactly once; `Ok(false)`
    /// when nothing was there.
    pub(super) async fn delete_raw(
        &self,
        name: &str,
        version: Option<&Version>,
    ) -> Result<bool, StoreError> {
        let deadline = self.deadline();
        let mut maybe_applied = false;
        let (mut attempts, mut throttles) = (0u32, 0u32);
        let err = loop {
            attempts += 1;
            let mut delete = self.client.delete_object().bucket(&self.bucket).key(name);
            if let Some(Version(etag)) = version {
                delete = delete.if_match(etag);
            }
            let send = delete.customize().config_override(no_sdk_retries()).send();
            let Some(slot) = self.slot(deadline).await else {
                break Failure::timeout().unavailable("DeleteObject");
            };
            let result = tokio::time::timeout_at(deadline, send).await;
            drop(slot);
            let f = match result {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(e)) => Failure::from_sdk(e),
                Err(_) => Failure::timeout(),
            };
            if f.throttled() {
                // Not applied, by S3's word; as for PUTs, a refusal of a later attempt is
                // settled by reading should a store apply one anyway.
                maybe_applied = true;
                attempts -= 1;
                if !slow_down(&mut throttles, deadline).await {
                    break f.unavailable("DeleteObject");
                }
                continue;
            }
            if f.ambiguous {
                maybe_applied = true;
                if attempts >= self.max_attempts || Instant::now() >= deadline {
                    break f.unavailable("DeleteObject");
                }
                pause(RETRY_BASE_MS << (attempts - 1).min(6), deadline).await;
                continue;
            }
            break match f.status {
                // 412: the object changed since it was read. 409: S3's answer when another
                // conditional request on the key is in flight; the caller re-reads and
                // decides again, which its retry policy bounds.
                Some(412 | 409) => StoreError::Changed,
                // A conditional DELETE of a missing key: AWS answers 404 NoSuchKey rather
                // than 412 (a plain DELETE answers 204 either way, hence the HEAD before it
                // in `delete`). After an earlier attempt whose fate is unknown, gone may be
                // our own doing: the read below decides.
                Some(404) if !maybe_applied => return Ok(false),
                Some(404) => StoreError::Changed,
                _ => f.unavailable("DeleteObject"),
            };
        };
        if !maybe_applied {
            return Err(err);
        }
        // An earlier attempt may have removed it: gone means the delete took effect (or
        // another's did, which answers the same).
        let deadline = Instant::now() + self.attempt_timeout;
        match self.read_object(name, 0, deadline).await {
            Ok(Fetched::Missing) => {
                self.requests.settled(Some(true));
                Ok(true)
            }
            // Refused, yet an earlier attempt may have landed and the key been written again
            // since: which came first cannot be told.
            _ if err == StoreError::Changed => {
                self.requests.settled(None);
                tracing::warn!(object = %name, "a delete whose answer was lost cannot be settled");
                Err(StoreError::Unavailable(
                    "S3 DeleteObject: answer lost; outcome unknown".into(),
                ))
            }
            _ => Err(err),
        }
    }

    /// One PUT attempt, SDK retries off.
    async fn put_once(
        &self,
        name: &str,
        body: &Bytes,
        mode: &PutMode,
        acl: Option<ObjectCannedAcl>,
        deadline: Instant,
    ) -> Attempt {
        let mut put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(name)
            .body(ByteStream::from(body.clone()))
            .set_acl(acl)
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse.mode.clone())
            .set_ssekms_key_id(self.sse.kms_key_id.clone());
        match mode {
            PutMode::Overwrite => {}
            PutMode::Create => put = put.if_none_match("*"),
            PutMode::Update(Version(etag)) => put = put.if_match(etag),
        }
        let send = put.customize().config_override(no_sdk_retries()).send();
        let Some(slot) = self.slot(deadline).await else {
            // Never sent: as definite as a refusal, but a timeout to the client.
            return Attempt::Refused(Failure::timeout());
        };
        let result = tokio::time::timeout_at(deadline, send).await;
        drop(slot);
        match result {
            Ok(Ok(out)) => Attempt::Applied(Version(out.e_tag().unwrap_or_default().to_owned())),
            Ok(Err(e)) => {
                let f = Failure::from_sdk(e);
                if f.throttled() {
                    Attempt::Throttled(f)
                } else if f.ambiguous {
                    Attempt::Unknown(f)
                } else {
                    Attempt::Refused(f)
                }
            }
            Err(_) => Attempt::Unknown(Failure::timeout()),
        }
    }
}

/// The error of a write whose outcome cannot be known: the command answers it rather than
/// risk applying twice.
fn unknown(op: &str, why: &Failure) -> StoreError {
    StoreError::Unavailable(format!("{}; outcome unknown", why.describe(op)))
}

/// Per-call SDK settings for writes: no retries (this module retries them).
pub(super) fn no_sdk_retries() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default().retry_config(RetryConfig::disabled())
}
