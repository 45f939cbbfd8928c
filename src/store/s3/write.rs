//! PUTs, conditional ones applied exactly once: this is the only place a PUT is retried.
//!
//! The SDK would retry a PUT after a timeout, a dropped connection or a 5xx. For a
//! conditional PUT that is wrong: if the first attempt was applied and only its answer was
//! lost, the retry finds its own write and gets 412, which reads as a lost race, and the
//! command applies again (an `incr` twice; an `add` that succeeded answers `NOT_STORED`).
//! So PUTs are sent with SDK retries off and retried here. After an attempt whose fate is
//! unknown, a 412 (or running out of attempts) is settled by reading the object: every
//! body we write is unique (the item header holds its cas and a microsecond write stamp;
//! see [`format`](crate::store::format)), so if the stored bytes are ours, our write is the
//! one stored and the PUT succeeded. The window left: our write applied, then replaced by
//! another writer before the read; the command then re-applies, as if it had lost a race.
//! DELETEs likewise: after an unknown outcome, a 404 or 412 with the object gone means the
//! delete took effect (a `delete` that happened answers `DELETED`, not `NOT_FOUND`).

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ObjectCannedAcl, ServerSideEncryption};
use bytes::Bytes;
use tokio::time::Instant;

use super::failure::Failure;
use super::read::Fetched;
use super::{S3Settings, S3Store};
use crate::store::{PutMode, StoreError, Version};

/// How often a 409 conflict is retried before giving up.
const MAX_CONFLICT_RETRIES: u32 = 5;
/// First pause before retrying a PUT whose fate is unknown; doubles each time.
const RETRY_BASE_MS: u64 = 25;

/// Encryption at rest (`server_side_encryption`, `sse_kms_key_id`), sent on every PUT:
/// items, control objects and the startup probe alike, so a bucket policy that refuses
/// unencrypted uploads refuses none of ours.
#[derive(Debug, Clone, Default)]
pub(super) struct Encryption {
    mode: Option<ServerSideEncryption>,
    kms_key_id: Option<String>,
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
}

impl S3Store {
    /// Writes `body` under `name` as `mode` allows, exactly once, within one operation deadline
    /// (plus one attempt's time to settle an unknown outcome).
    pub(super) async fn put_raw(
        &self,
        name: &str,
        body: Bytes,
        mode: &PutMode,
    ) -> Result<Version, StoreError> {
        let deadline = self.deadline();
        let conditional = *mode != PutMode::Overwrite;
        let mut maybe_applied = false;
        let (mut attempts, mut conflicts) = (0u32, 0u32);
        let err = loop {
            attempts += 1;
            let acl = self.acl.current();
            let sent_acl = acl.is_some();
            let f = match self.put_once(name, &body, mode, acl, deadline).await {
                Attempt::Applied(version) => return Ok(version),
                Attempt::Unknown(f) => {
                    maybe_applied |= conditional;
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
            break err;
        };
        // An earlier attempt may have been applied: what is stored decides.
        if maybe_applied {
            self.settle(name, &body, err).await
        } else {
            Err(err)
        }
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
        let mut attempts = 0u32;
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
        // An earlier attempt may have removed it: gone means the delete took effect.
        let deadline = Instant::now() + self.attempt_timeout;
        match self.read_object(name, 0, deadline).await? {
            Fetched::Missing => Ok(true),
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
                if f.ambiguous {
                    Attempt::Unknown(f)
                } else {
                    Attempt::Refused(f)
                }
            }
            Err(_) => Attempt::Unknown(Failure::timeout()),
        }
    }

    /// After an attempt whose fate is unknown: reads the object, and if it holds exactly the
    /// bytes we wrote, our write is the one stored; otherwise the write answers `otherwise`.
    async fn settle(
        &self,
        name: &str,
        body: &Bytes,
        otherwise: StoreError,
    ) -> Result<Version, StoreError> {
        let deadline = Instant::now() + self.attempt_timeout;
        match self.read_object(name, body.len(), deadline).await? {
            Fetched::Body(stored, version) if stored == *body => {
                tracing::debug!(object = %name, "a PUT whose answer was lost had been applied");
                Ok(version)
            }
            _ => Err(otherwise),
        }
    }
}

/// Per-call SDK settings for writes: no retries (this module retries them).
fn no_sdk_retries() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default().retry_config(RetryConfig::disabled())
}

/// A jittered pause of up to `ms`, never past `deadline`.
async fn pause(ms: u64, deadline: Instant) {
    let ms = ms / 2 + rand::random::<u64>() % (ms / 2 + 1);
    let until = (Instant::now() + Duration::from_millis(ms)).min(deadline);
    tokio::time::sleep_until(until).await;
}
