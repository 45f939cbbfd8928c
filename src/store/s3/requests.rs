//! Counts every S3 request attempt by price class and answer, and times it by operation:
//! an SDK interceptor, so retries made by the SDK are counted as S3 bills them.

use std::sync::Arc;

use aws_sdk_s3::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use tokio::time::Instant;

use super::counts::{RequestClass, S3Requests};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// When the current attempt was handed to the HTTP client (kept in its config bag).
#[derive(Debug, Clone)]
struct Transmitted(Option<Instant>);

impl Storable for Transmitted {
    type Storer = StoreReplace<Self>;
}

/// The interceptor: counts into an [`S3Requests`] shared with the server's stats.
#[derive(Debug)]
pub(super) struct RequestCounter {
    requests: Arc<S3Requests>,
}

impl RequestCounter {
    pub fn new(requests: Arc<S3Requests>) -> Self {
        RequestCounter { requests }
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "s3cached-request-counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let query = request.uri().split_once('?').map_or("", |(_, q)| q);
        self.requests
            .sent(RequestClass::of(request.method(), query));
        cfg.interceptor_state()
            .store_put(Transmitted(Some(Instant::now())));
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // Only attempts that reached the wire: one that failed before is no request.
        let Some(Transmitted(Some(sent))) = cfg.load::<Transmitted>().cloned() else {
            return Ok(());
        };
        cfg.interceptor_state().store_put(Transmitted(None));
        let status = context.response().map(|r| r.status().as_u16());
        self.requests.answered(status);
        let operation = cfg.load::<Metadata>().map_or("unknown", |m| m.name());
        self.requests
            .latency
            .record(operation, status, sent.elapsed());
        Ok(())
    }
}
