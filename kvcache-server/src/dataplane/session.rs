//! A connection whose bytes move outside its frames: over the node's shared-memory socket, or
//! after an RDMA upgrade of a TCP connection. Both lease and stage the same way, so both are
//! one [`Session`]: a staging window the client writes blocks into, and a table of the leases
//! it holds while it reads blocks straight out of the pool.
//!
//! - lease-get (`LeaseGet`): leases the blocks and answers where they lie in the pool and the
//!   checksum of each block's trailer; the client copies (or READs) the bytes and checks every
//!   chunk as it lands, then sends `Release` (one-way). A lease held past the session's timeout
//!   is revoked; a client that then reads a reused page fails its check and reports a miss.
//! - staged put (`StagedPut`): the client writes blocks into its staging window; the node
//!   copies them into the pool, checksumming each chunk while it is in cache, and commits.
//!   Clients never get write access to the pool.
//!
//! Everything a session holds (leases, its window, the byte path's own state) is released
//! when the connection closes, so a client that dies leaks nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kvcache_core::BlockKey;
use kvcache_core::wire::{
    self, ErrorCode, FrameHeader, LeaseGetReply, LeaseGetRequest, PutReply, PutStatus,
    ReleaseRequest, StagedPutRequest,
};
use kvcache_transport::{LockMode, MemoryRegion, ShmRegion};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::AsyncWrite;

use crate::auth::Access;
use crate::dataplane::blocks::{confirm_suspect, lease_all, may_block, put_refused};
use crate::dataplane::request::{
    ConnResult, Outcome, ServiceContext, keyed, send_control, warn_allowed,
};
use crate::metrics::Via;
use kvcache_store::{CommitOutcome, Lease};

/// Most unreleased lease batches one connection may hold; a client past it gets an error.
const MAX_LEASE_BATCHES: usize = 4096;

/// Staging windows are whole pages.
const STAGING_ALIGN: u64 = 4096;

/// A byte path a TCP connection can switch to mid-stream (RDMA): built by the server when the
/// node can serve it, reached by the request loop only through this trait.
pub trait Upgrade: Send + Sync {
    /// What clients are told in `Ping` (the device's name).
    fn advertise(&self) -> &str;
    /// Sets the path up from the client's request: the connection's session from now on, and
    /// the reply's encoded control message. Synchronous: setup is a few verbs calls.
    fn upgrade(&self, h: &FrameHeader, control: &[u8]) -> Result<(Session, Vec<u8>), Outcome>;
}

/// The byte path TCP connections may upgrade to, or why there is none (logged once at start,
/// and the reason a client's `RdmaConnect` is refused with).
pub enum UpgradePath {
    Open(Arc<dyn Upgrade>),
    Off(String),
}

/// One client of a byte path outside the frames: its staging window and the leases it holds.
pub struct Session {
    /// What the byte path needs while the window is in use (an RDMA queue pair and
    /// registration); dropped before the window.
    held: Option<Box<dyn Send + Sync>>,
    staging: ShmRegion,
    leases: Mutex<LeaseTable>,
    lease_timeout: Duration,
    via: Via,
}

/// A connection's leases. However often it leases a block, the connection holds one lease on
/// it in the store, counted here: one client cannot saturate a block's lease count (and so
/// turn everyone else's reads of it into misses), and releasing a batch is linear in its size.
#[derive(Default)]
struct LeaseTable {
    next_id: u64,
    batches: HashMap<u64, LeaseBatch>,
    held: HashMap<BlockKey, Held>,
    /// Bytes of the distinct blocks held, checked against `--max-leased-bytes`.
    bytes: u64,
}

struct Held {
    lease: Lease,
    uses: u32,
}

struct LeaseBatch {
    deadline: Instant,
    keys: Vec<BlockKey>,
}

impl LeaseTable {
    /// Ends one batch: each of its blocks is used once less, and released at its last use.
    fn end(&mut self, batch: &LeaseBatch) {
        for key in &batch.keys {
            if let Some(held) = self.held.get_mut(key) {
                held.uses -= 1;
                if held.uses == 0 {
                    self.bytes -= held.lease.len() as u64;
                    self.held.remove(key);
                }
            }
        }
    }
}

impl Session {
    pub fn new(staging: ShmRegion, lease_timeout: Duration, via: Via) -> Self {
        Self {
            held: None,
            staging,
            leases: Mutex::new(LeaseTable::default()),
            lease_timeout,
            via,
        }
    }

    /// Keeps `what` alive exactly as long as the session, and drops it before the window.
    pub fn hold(mut self, what: Box<dyn Send + Sync>) -> Self {
        self.held = Some(what);
        self
    }

    /// The staging window's size in bytes.
    pub fn staging_len(&self) -> usize {
        self.staging.len()
    }

    /// Revokes every lease batch past its deadline; returns the blocks released.
    fn expire(&self, now: Instant) -> usize {
        let mut table = self.leases.lock();
        let expired: Vec<u64> = table
            .batches
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        let mut revoked = 0;
        for id in expired {
            if let Some(batch) = table.batches.remove(&id) {
                revoked += batch.keys.len();
                table.end(&batch);
            }
        }
        revoked
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The byte path's state (a registration of the window) goes before the window.
        self.held.take();
    }
}

/// A connection's staging window: what the client asked for, within a page and `max`, in
/// whole pages (shared memory and RDMA connections alike).
pub fn staging_window(name: &str, asked: u64, max: u64) -> anyhow::Result<ShmRegion> {
    let len = asked
        .clamp(STAGING_ALIGN, max)
        .next_multiple_of(STAGING_ALIGN);
    Ok(ShmRegion::new_writable_by_peers(
        name,
        len as usize,
        LockMode::Off,
    )?)
}

/// Starts revoking the session's expired leases; the task ends by itself once the session is
/// gone, and may be aborted earlier.
pub(crate) fn spawn_reaper(
    session: &Arc<Session>,
    ctx: &Arc<ServiceContext>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(reap(Arc::downgrade(session), Arc::clone(ctx)))
}

/// Revokes expired leases of one session until it ends. Leases expire between one and one and
/// a half timeouts after they were granted.
async fn reap(session: Weak<Session>, ctx: Arc<ServiceContext>) {
    loop {
        let Some(period) = session.upgrade().map(|s| s.lease_timeout / 2) else {
            return;
        };
        tokio::time::sleep(period.max(Duration::from_millis(5))).await;
        let Some(s) = session.upgrade() else { return };
        let revoked = s.expire(Instant::now());
        if revoked > 0 {
            ctx.metrics.shm_leases_revoked(revoked);
            if warn_allowed() {
                tracing::warn!(blocks = revoked, timeout = ?s.lease_timeout, "revoked leases held past the timeout");
            }
        }
    }
}

/// Serves `RdmaConnect` (or any later [`Upgrade`]): on success `session` holds the
/// connection's byte path, staging window and leases from now on.
pub(crate) async fn upgrade<W: AsyncWrite + Unpin>(
    ctx: &Arc<ServiceContext>,
    path: &UpgradePath,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
    session: &mut Option<Arc<Session>>,
) -> ConnResult<Outcome> {
    if session.is_some() {
        return Ok(Outcome::Refused(
            "this connection already moves bytes through shared memory or RDMA".into(),
        ));
    }
    let path = match path {
        UpgradePath::Open(path) => path,
        UpgradePath::Off(why) => {
            return Ok(Outcome::Refused(format!("this node serves no RDMA: {why}")));
        }
    };
    let (new, reply) = match path.upgrade(h, control) {
        Ok(built) => built,
        Err(outcome) => return Ok(outcome),
    };
    let new = Arc::new(new);
    // The reaper ends by itself once the session is gone.
    drop(spawn_reaper(&new, ctx));
    *session = Some(new);
    send_control(wr, h.op, h.request_id, &reply).await?;
    Ok(Outcome::Done)
}

/// `LeaseGet`: leases the blocks this connection does not hold yet and says where each lies.
pub(crate) async fn lease_get(
    ctx: &ServiceContext,
    access: &Access,
    session: &Session,
    h: &FrameHeader,
    control: &[u8],
) -> Result<LeaseGetReply, Outcome> {
    let (req, keys) = keyed(ctx, access, h, control, |r: &LeaseGetRequest| &r.keys)?;
    // Keys this connection does not hold yet, each once: only these take store leases (and
    // may be brought up from a lower tier).
    let fresh: Vec<BlockKey> = {
        let table = session.leases.lock();
        if table.batches.len() >= MAX_LEASE_BATCHES {
            return Err(Outcome::Refused(format!(
                "{MAX_LEASE_BATCHES} lease batches are unreleased on this connection; release them first"
            )));
        }
        if table.bytes >= ctx.max_leased_bytes {
            return Err(Outcome::Denied(
                ErrorCode::LimitExceeded,
                format!(
                    "this connection holds {} bytes of leases, the node's --max-leased-bytes: release some first",
                    table.bytes
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(keys.len());
        keys.iter()
            .copied()
            .filter(|k| !table.held.contains_key(k) && seen.insert(*k))
            .collect()
    };
    let mut leased = lease_all(&ctx.store, &fresh).await;
    // The table's lock is never held across an await.
    let mut table = session.leases.lock();
    let table = &mut *table;
    let mut taken = Vec::with_capacity(fresh.len());
    for (key, lease) in fresh.into_iter().zip(leased.iter_mut()) {
        let Some(lease) = lease.take() else { continue };
        let len = lease.len() as u64;
        // Past the cap the block is a miss for this connection, and its lease ends here.
        if table.bytes + len <= ctx.max_leased_bytes {
            table.bytes += len;
            table.held.insert(key, Held { lease, uses: 0 });
            taken.push(key);
        }
    }
    let mut reply = LeaseGetReply {
        lease_id: 0,
        offsets: Vec::with_capacity(keys.len()),
        lens: Vec::with_capacity(keys.len()),
        trailer_checksums: Vec::with_capacity(keys.len()),
    };
    let mut checked: HashMap<BlockKey, bool> = HashMap::new();
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    for &key in &keys {
        let held = table.held.get_mut(&key).filter(|held| {
            // Each distinct block is checked once per request, however often it is named.
            !req.verify || *checked.entry(key).or_insert_with(|| intact(&held.lease))
        });
        match held {
            Some(held) => {
                held.uses += 1;
                reply.offsets.push(held.lease.pool_offset());
                reply.lens.push(held.lease.len() as u32);
                reply.trailer_checksums.push(held.lease.trailer_checksum());
                bytes += held.lease.len() as u64;
                batch.push(key);
            }
            None => {
                reply.offsets.push(0);
                reply.lens.push(0);
                reply.trailer_checksums.push(0);
            }
        }
    }
    // Blocks leased for this request that it did not use (failed checks) are let go.
    for key in taken {
        if table.held.get(&key).is_some_and(|held| held.uses == 0) {
            let held = table.held.remove(&key).expect("just looked up");
            table.bytes -= held.lease.len() as u64;
        }
    }
    ctx.metrics.blocks(h.op, keys.len(), batch.len());
    ctx.metrics.bytes_out(session.via, bytes);
    if !batch.is_empty() {
        table.next_id += 1;
        reply.lease_id = table.next_id;
        let batch = LeaseBatch {
            deadline: Instant::now() + session.lease_timeout,
            keys: batch,
        };
        table.batches.insert(reply.lease_id, batch);
    }
    Ok(reply)
}

/// Whether a leased block passes every check; one that fails is dropped by the store.
fn intact(lease: &Lease) -> bool {
    lease.verified_bytes().is_ok()
}

/// `Release`: ends a lease (one-way: nothing is sent back). Suspect blocks are verified by the
/// node itself before the lease ends, each once; one that fails is dropped, one that passes
/// stays.
pub(crate) fn release(
    ctx: &ServiceContext,
    access: &Access,
    session: &Session,
    control: &[u8],
) -> Outcome {
    let Ok(req) = ReleaseRequest::decode(control) else {
        return Outcome::Close("undecodable release".into());
    };
    let Ok(suspect) = wire::decode_keys(&req.suspect) else {
        return Outcome::Close("release with a ragged suspect list".into());
    };
    let mut table = session.leases.lock();
    let Some(batch) = table.batches.remove(&req.lease_id) else {
        // Revoked after the timeout, or never granted; either way nothing is held.
        tracing::debug!(
            lease = req.lease_id,
            "release of an unknown or revoked lease"
        );
        return Outcome::Done;
    };
    if !suspect.is_empty() {
        let in_batch: HashSet<BlockKey> = batch.keys.iter().copied().collect();
        let suspect: HashSet<BlockKey> = suspect.into_iter().map(|k| access.fold(k)).collect();
        for key in suspect.intersection(&in_batch) {
            let Some(held) = table.held.get(key) else {
                continue;
            };
            confirm_suspect(ctx, *key, &held.lease);
        }
    }
    table.end(&batch);
    Outcome::Done
}

/// `StagedPut`: copies blocks the client wrote into its staging window into the pool.
pub(crate) fn staged_put(
    ctx: &ServiceContext,
    access: &Access,
    session: &Session,
    h: &FrameHeader,
    control: &[u8],
) -> Result<PutReply, Outcome> {
    let (req, keys) = keyed(ctx, access, h, control, |r: &StagedPutRequest| &r.keys)?;
    if keys.len() != req.lens.len() || keys.len() != req.offsets.len() {
        return Err(Outcome::Refused(format!(
            "{} names {} keys, {} lengths and {} offsets",
            h.op.name(),
            keys.len(),
            req.lens.len(),
            req.offsets.len()
        )));
    }
    let window = session.staging.len() as u64;
    for (&off, &len) in req.offsets.iter().zip(&req.lens) {
        if off.checked_add(len as u64).is_none_or(|end| end > window) {
            return Err(Outcome::Refused(format!(
                "a block of {len} bytes at offset {off} overruns the {window}-byte staging window"
            )));
        }
    }
    ctx.metrics.blocks(h.op, keys.len(), 0);
    let mut statuses = Vec::with_capacity(keys.len());
    let mut bytes = 0u64;
    for ((&key, &len), &off) in keys.iter().zip(&req.lens).zip(&req.offsets) {
        let status = match may_block(&ctx.store, || ctx.store.allocate(key, len as usize)) {
            Ok(mut alloc) => {
                // SAFETY: `off + len` lies inside the staging mapping (checked above), which
                // lives as long as the session. The client may write the window while we
                // read it; that can only change its own block, and `fill_chunk` checksums
                // exactly the bytes it stores.
                let src = unsafe {
                    std::slice::from_raw_parts(
                        session.staging.base().add(off as usize),
                        len as usize,
                    )
                };
                for i in 0..alloc.chunk_count() {
                    alloc.fill_chunk(
                        i,
                        &src[kvcache_core::checksum::chunk_range(len as usize, i)],
                    );
                }
                bytes += len as u64;
                match alloc.commit() {
                    CommitOutcome::Stored => PutStatus::Stored,
                    CommitOutcome::AlreadyPresent => PutStatus::AlreadyPresent,
                }
            }
            Err(e) => put_refused(ctx, e),
        };
        statuses.push(status as i32);
    }
    ctx.metrics.bytes_in(session.via, bytes);
    Ok(PutReply { statuses })
}

#[cfg(test)]
mod tests {
    use kvcache_core::BlockKey;
    use kvcache_transport::LockMode;

    use super::intact;
    use kvcache_store::{Store, StoreConfig};

    #[test]
    fn a_verified_lease_turns_a_corrupt_block_into_a_miss_and_keeps_the_rest() {
        let store = Store::new(&StoreConfig {
            capacity: 1 << 20,
            lock: LockMode::Off,
            ..StoreConfig::default()
        })
        .unwrap();
        for k in 1..=3u128 {
            let mut a = store.allocate(BlockKey(k), 200_000).unwrap();
            a.bytes_mut().fill(k as u8);
            a.commit();
        }
        assert!(store.corrupt_block_for_test(BlockKey(2)));
        let leases: Vec<_> = (1..=4u128).map(|k| store.lease(BlockKey(k))).collect();
        assert!(
            leases[1].is_some(),
            "the trailer is intact: the plain lease succeeds"
        );
        let held: Vec<bool> = leases
            .iter()
            .map(|l| l.as_ref().is_some_and(intact))
            .collect();
        assert_eq!(held, [true, false, true, false]);
        drop(leases);
        assert!(!store.contains(BlockKey(2)), "the corrupt block is dropped");
        assert_eq!(store.stats().checksum_failures, 1);
    }
}
