//! S3 errors in S3's terms (status, code), and what each tells about a write's fate.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::store::StoreError;

/// What failed, in S3's terms, before it becomes a [`StoreError`].
#[derive(Debug)]
pub(super) struct Failure {
    pub status: Option<u16>,
    pub code: String,
    pub message: String,
    /// The request may have reached the store and been applied: a timeout, a connection
    /// dropped before the answer, an unreadable answer or a 5xx.
    pub ambiguous: bool,
}

impl Failure {
    pub fn from_sdk<E: ProvideErrorMetadata + std::error::Error + 'static, R>(
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
        let ambiguous = match &err {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
            SdkError::ResponseError(_) => true,
            SdkError::ConstructionFailure(_) => false,
            _ => status.is_none_or(|s| s >= 500),
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
            ambiguous,
        }
    }

    /// Our own deadline cut the call short: whatever was sent may have been applied.
    pub fn timeout() -> Self {
        Failure {
            status: None,
            code: String::new(),
            message: "timeout".into(),
            ambiguous: true,
        }
    }

    pub fn unavailable(&self, op: &str) -> StoreError {
        StoreError::Unavailable(self.describe(op))
    }

    /// `S3 <op>: <status and code, or what went wrong>`.
    pub fn describe(&self, op: &str) -> String {
        let what = match (self.status, self.code.is_empty()) {
            (Some(s), false) => format!("{} {}", s, self.code),
            (Some(s), true) => s.to_string(),
            (None, _) => self.message.clone(),
        };
        format!("S3 {op}: {what}")
    }

    /// S3 asked us to slow down (503 SlowDown, 429): the request was not applied.
    pub fn throttled(&self) -> bool {
        matches!(self.status, Some(429 | 503))
    }

    pub fn is(&self, status: u16) -> bool {
        self.status == Some(status)
    }
}

/// The HTTP status of a raw response, so [`Failure`] needs no SDK-internal types by name.
pub(super) trait HasStatus {
    fn status(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}
