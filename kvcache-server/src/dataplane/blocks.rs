//! Store steps every byte path shares: leasing a request's blocks (promoting misses from the
//! tier below off the async workers), allocating without stalling them, counting refusals, and
//! checking the blocks clients report as failing their own check.

use std::sync::Arc;

use kvcache_core::BlockKey;
use kvcache_core::wire::PutStatus;

use crate::dataplane::request::ServiceContext;
use crate::metrics::PutRejection;
use kvcache_store::{AllocError, Lease, Store};

/// Runs store work that may wait on a lower tier (an eviction that hands blocks down to a full
/// disk queue, RocksDB lookups) without stalling the other connections served by this worker
/// thread. Without a lower tier the store never blocks and `f` runs inline.
pub(crate) fn may_block<T>(store: &Store, f: impl FnOnce() -> T) -> T {
    if store.has_lower() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Checks a block a client reported as failing its own check: a block that fails here too is
/// dropped (by the check itself); one that passes stays, so a client cannot evict by lying.
/// Counts the verdict either way.
pub(crate) fn confirm_suspect(ctx: &ServiceContext, key: BlockKey, lease: &Lease) {
    let confirmed = lease.verified_bytes().is_err();
    ctx.metrics.suspect(confirmed);
    if !confirmed {
        tracing::warn!(%key, "a client reported a block corrupt but it verifies here; it was damaged on its way to the client, or the client's lease was revoked mid-copy");
    }
}

/// The status of a block that could not be allocated, counted in the metrics.
pub(crate) fn put_refused(ctx: &ServiceContext, e: AllocError) -> PutStatus {
    let (status, why) = match e {
        AllocError::AlreadyPresent => return PutStatus::AlreadyPresent,
        AllocError::TooLarge { .. } => (PutStatus::TooLarge, PutRejection::TooLarge),
        AllocError::PoolFull => (PutStatus::PoolFull, PutRejection::PoolFull),
        AllocError::Empty => (PutStatus::Empty, PutRejection::Empty),
    };
    ctx.metrics.put_rejected(why);
    status
}

/// Leases every key's block, in order (`None` for a miss). Keys memory misses are brought up
/// from the disk tier, if there is one, on a blocking thread.
pub(crate) async fn lease_all(store: &Arc<Store>, keys: &[BlockKey]) -> Vec<Option<Lease>> {
    let mut leases: Vec<Option<Lease>> = keys.iter().map(|&k| store.lease(k)).collect();
    if !store.has_lower() {
        return leases;
    }
    let missed: Vec<(usize, BlockKey)> = leases
        .iter()
        .zip(keys)
        .enumerate()
        .filter(|(_, (l, _))| l.is_none())
        .map(|(i, (_, &k))| (i, k))
        .collect();
    if missed.is_empty() {
        return leases;
    }
    let store = Arc::clone(store);
    let promoted = tokio::task::spawn_blocking(move || {
        missed
            .into_iter()
            .map(|(i, k)| (i, store.lease_or_promote(k)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (i, lease) in promoted {
        leases[i] = lease;
    }
    leases
}
