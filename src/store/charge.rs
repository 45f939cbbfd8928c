//! What a store read's body is charged to before it is read: the memory budget's meter of
//! the retrieval running on this task, if any ([`crate::budget::meter`] sets it). The store
//! knows only this trait, so it depends on nothing above it.

use std::future::Future;
use std::sync::Arc;

/// Takes a charge for a body about to be read, if it can now.
pub trait BodyCharge: Send + Sync {
    /// False when `bytes` cannot be taken now: the body must not be read.
    fn charge_body(&self, bytes: u64) -> bool;
}

tokio::task_local! {
    static CHARGE: Arc<dyn BodyCharge>;
}

/// Runs `future` with `charge` as what its store reads are charged to.
pub async fn scope<F: Future>(charge: Arc<dyn BodyCharge>, future: F) -> F::Output {
    CHARGE.scope(charge, future).await
}

/// What this task's reads are charged to, if anything.
pub fn current() -> Option<Arc<dyn BodyCharge>> {
    CHARGE.try_with(Arc::clone).ok()
}

/// Charges a body of `bytes` to this task's retrieval, if any; `Err(bytes)` when it cannot
/// take it now.
pub fn charge_body(bytes: u64) -> Result<(), u64> {
    match current() {
        Some(charge) if !charge.charge_body(bytes) => Err(bytes),
        _ => Ok(()),
    }
}
