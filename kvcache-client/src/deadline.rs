//! One deadline per public call: a get of many chunks finishes (with its answers so far, or a
//! timeout) within the configured timeout in all, never one timeout per chunk (audit M6). A
//! cluster call sets one per round (the owners, then each rank of replicas, asked in
//! parallel), so a partitioned owner costs one timeout and leaves its replicas time to answer.
//!
//! The deadline travels with the call's task: the outermost call sets it, and every request
//! under it (a node's chunks, a cluster's fan-out, which run in the same task) takes the
//! earlier of it and its own.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `call` under a deadline `timeout` from now, unless an outer call already set one.
pub(crate) async fn within<F: Future>(timeout: Duration, call: F) -> F::Output {
    if DEADLINE.try_with(|_| ()).is_ok() {
        call.await
    } else {
        DEADLINE.scope(Instant::now() + timeout, call).await
    }
}

/// When a request started now with `timeout` must end: the call's deadline if it is earlier.
pub(crate) fn until(timeout: Duration) -> Instant {
    let own = Instant::now() + timeout;
    DEADLINE.try_with(|d| (*d).min(own)).unwrap_or(own)
}
