//! The RDMA byte path (feature `rdma`): one queue pair per TCP connection, set up by
//! `RdmaConnect`; gets lease blocks with `LeaseGet` and READ them; puts WRITE blocks into the
//! connection's staging window at the node and send `StagedPut`.
//!
//! Memory the caller registered ([`Client::register_memory`](crate::node::Client::register_memory), e.g. the engine's KV
//! tensors, once) is used in place: a block's READ scatters straight into its KV segments
//! and its checksums are checked there; a put's WRITE gathers straight from them. Any other
//! memory goes through the connection's registered landing buffer, from which a get is
//! verify-copied (the same fused copy and check as shared memory) and into which a put is
//! staged. Either way a block that fails a check is a miss, and a failed transfer drops the
//! connection.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use kvcache_core::BlockKey;
use kvcache_core::checksum;
use kvcache_core::wire::{LeaseGetReply, Op, PutStatus, RdmaConnectReply, RdmaConnectRequest};
use kvcache_transport::rdma::verbs::{Device, Direction, Link, Registration};
use kvcache_transport::rdma::{QpEndpoint, RemoteRegion, WorkRequest, scatter_plan};
use kvcache_transport::{HostRegion, LockMode, MemoryRegion};

use crate::config::GetOutcome;
use crate::connection::Connection;
use crate::error::ClientError;
use crate::path::staged::{aligned_end, commit_staged, staged_batch};
use crate::verify::copy_verified_from;

/// What every RDMA connection of one client shares: the device and the caller's registrations.
pub(crate) struct Shared {
    device: Arc<Device>,
    registered: RwLock<Vec<Registration>>,
    /// GPU memory registered for GPU-direct: READs land there and WRITEs leave from there,
    /// but this process cannot read it, so its blocks are checked by the node.
    gpu: RwLock<Vec<Registration>>,
}

impl Shared {
    pub(crate) fn open() -> Result<Arc<Shared>, String> {
        let device = Device::open().map_err(|e| e.to_string())?;
        Ok(Arc::new(Shared {
            device,
            registered: RwLock::new(Vec::new()),
            gpu: RwLock::new(Vec::new()),
        }))
    }

    pub(crate) fn device_name(&self) -> &str {
        self.device.name()
    }

    /// # Safety
    /// The memory must stay mapped until [`Shared::unregister`] or the client is dropped.
    pub(crate) unsafe fn register(&self, addr: usize, len: usize) -> Result<(), ClientError> {
        // SAFETY: upheld by the caller.
        let reg = unsafe { self.device.register(addr as *mut u8, len, false, false) }
            .map_err(|e| ClientError::InvalidArgument(format!("cannot register memory: {e}")))?;
        self.regs_mut().push(reg);
        Ok(())
    }

    /// Registers GPU memory for GPU-direct RDMA (dmabuf, else peer memory).
    ///
    /// # Safety
    /// The memory must stay allocated until [`Shared::unregister`] or the client is dropped.
    #[cfg(feature = "cuda")]
    pub(crate) unsafe fn register_gpu(
        &self,
        gpu: &kvcache_transport::cuda::Gpu,
        addr: u64,
        len: usize,
    ) -> Result<kvcache_transport::rdma::gpudirect::Method, ClientError> {
        use kvcache_transport::rdma::gpudirect;
        // SAFETY: upheld by the caller.
        let (reg, method) =
            unsafe { gpudirect::register(&self.device, gpu, addr, len, false, false) }
                .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        write(&self.gpu).push(reg);
        Ok(method)
    }

    /// Drops the registration (host or GPU memory) that starts at `addr`; false if there is
    /// none.
    pub(crate) fn unregister(&self, addr: usize) -> bool {
        [&self.registered, &self.gpu].into_iter().any(|list| {
            let mut regs = write(list);
            let before = regs.len();
            regs.retain(|r| r.remote().addr != addr as u64);
            regs.len() != before
        })
    }

    fn regs_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Registration>> {
        write(&self.registered)
    }

    /// Every segment with the lkey of the registration holding it, if all lie in registered
    /// host memory (one lock for the whole block).
    fn registered_segments(&self, segs: &[(u64, u64)]) -> Option<Vec<(u64, u64, u32)>> {
        in_registrations(&self.registered, segs)
    }

    /// As [`Shared::registered_segments`], for GPU memory registered for GPU-direct.
    fn gpu_segments(&self, segs: &[(u64, u64)]) -> Option<Vec<(u64, u64, u32)>> {
        in_registrations(&self.gpu, segs)
    }
}

fn write(list: &RwLock<Vec<Registration>>) -> std::sync::RwLockWriteGuard<'_, Vec<Registration>> {
    list.write().unwrap_or_else(|e| e.into_inner())
}

fn in_registrations(
    list: &RwLock<Vec<Registration>>,
    segs: &[(u64, u64)],
) -> Option<Vec<(u64, u64, u32)>> {
    let regs = list.read().unwrap_or_else(|e| e.into_inner());
    segs.iter()
        .map(|&(a, l)| {
            let reg = regs.iter().find(|r| r.contains(a, l))?;
            Some((a, l, reg.lkey()))
        })
        .collect()
}

/// Why GPU memory cannot be used in place: the error for a block outside GPU registrations.
fn not_gpu_registered(block: usize) -> ClientError {
    ClientError::InvalidArgument(format!(
        "block {block}'s GPU memory is not registered for GPU-direct RDMA \
         (Client::register_gpu_memory); stage it through pinned host memory"
    ))
}

/// One connection's RDMA state.
pub(crate) struct Attached {
    shared: Arc<Shared>,
    link: Link,
    pool: RemoteRegion,
    staging: RemoteRegion,
    /// Registered local memory for gets into (and puts from) unregistered memory.
    landing: Registration,
    landing_mem: HostRegion,
    timeout: Duration,
    /// How long the node keeps a lease before revoking it.
    lease_timeout: Duration,
}

/// Sends `RdmaConnect` on a fresh TCP connection and connects the queue pairs.
pub(crate) async fn attach(
    conn: &mut Connection,
    shared: &Arc<Shared>,
    staging_bytes: u64,
    timeout: Duration,
) -> Result<Attached, ClientError> {
    let fail = |e: &dyn std::fmt::Display| ClientError::RdmaUnavailable(e.to_string());
    let mut link = Link::new(&shared.device).map_err(|e| fail(&e))?;
    let req = RdmaConnectRequest {
        endpoint: link.endpoint().encode().to_vec(),
        staging_bytes,
    };
    let reply: RdmaConnectReply = conn.call_simple(Op::RdmaConnect, &req).await?;
    let proto = |e: kvcache_transport::rdma::RdmaError| ClientError::Protocol(e.to_string());
    let node = QpEndpoint::decode(&reply.endpoint).map_err(proto)?;
    let pool = RemoteRegion::decode(&reply.pool).map_err(proto)?;
    let staging = RemoteRegion::decode(&reply.staging).map_err(proto)?;
    link.connect(&node).map_err(|e| fail(&e))?;
    let landing_mem =
        HostRegion::new(staging.len.max(4096) as usize, LockMode::Off).map_err(|e| fail(&e))?;
    // SAFETY: `landing_mem` lives in the same struct and is dropped after the registration
    // (field order).
    let landing = unsafe {
        shared
            .device
            .register(landing_mem.base(), landing_mem.len(), false, false)
    }
    .map_err(|e| fail(&e))?;
    Ok(Attached {
        shared: Arc::clone(shared),
        link,
        pool,
        staging,
        landing,
        landing_mem,
        timeout,
        lease_timeout: Duration::from_millis(reply.lease_timeout_ms as u64),
    })
}

impl Attached {
    async fn run(&mut self, dir: Direction, plan: &[WorkRequest]) -> Result<(), ClientError> {
        let remote = match dir {
            Direction::Read => self.pool,
            Direction::Write => self.staging,
        };
        // SAFETY: every piece lies in a live registration: the landing buffer (ours) or the
        // caller's memory, which `get_into`/`put` borrow for the whole call.
        let done = unsafe { self.link.transfer(dir, plan, &remote, self.timeout) }.await;
        done.map_err(|e| {
            if e.breaks_link() {
                ClientError::Io(std::io::Error::other(format!("RDMA: {e}")))
            } else {
                ClientError::Protocol(format!("RDMA: {e}"))
            }
        })
    }

    fn limits(&self) -> (usize, u32) {
        self.shared.device.limits()
    }

    fn landing_at(&self, at: usize) -> u64 {
        self.landing_mem.base() as u64 + at as u64
    }

    /// `len` bytes of the landing buffer at `at`.
    ///
    /// # Safety
    /// A completed READ put them there; nothing else writes the landing buffer while this
    /// connection is checked out.
    unsafe fn landed(&self, at: usize, len: usize) -> &[u8] {
        // SAFETY: upheld by the caller; `at + len` lies inside the buffer (planned so).
        unsafe { std::slice::from_raw_parts(self.landing_mem.base().add(at), len) }
    }

    /// Work requests moving `segs` (registered memory) to or from the remote region at `off`.
    fn plan(&self, off: u64, segs: &[(u64, u64, u32)]) -> Result<Vec<WorkRequest>, ClientError> {
        let (max_sge, max_msg) = self.limits();
        scatter_plan(off, segs, max_sge, max_msg).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Lease entry `i`, to be read into `expected` bytes: its length and offset in the pool, or
    /// None when there is nothing to read (a miss, or a size mismatch recorded in `outcomes`).
    /// A block outside the pool is a protocol error.
    fn leased_block(
        &self,
        reply: &LeaseGetReply,
        i: usize,
        expected: usize,
        outcomes: &mut [GetOutcome],
    ) -> Result<Option<(usize, u64)>, ClientError> {
        let (len, off) = (reply.lens[i] as usize, reply.offsets[i]);
        if len == 0 {
            return Ok(None);
        }
        if len != expected {
            outcomes[i] = GetOutcome::WrongSize {
                stored: len,
                expected,
            };
            return Ok(None);
        }
        if !self.pool.covers(off, checksum::stored_len(len) as u64) {
            return Err(ClientError::Protocol(format!(
                "block of {len} bytes at offset {off} lies outside the node's pool"
            )));
        }
        Ok(Some((len, off)))
    }
}

/// A get into caller segments: lease, READ, verify, release.
pub(crate) async fn get_into(
    c: &mut Connection,
    a: &mut Attached,
    keys: &[BlockKey],
    dst: &mut [Vec<&mut [u8]>],
) -> Result<Vec<GetOutcome>, ClientError> {
    let reply = c.lease(keys, false).await?;
    let result = read_leased(a, &reply, dst).await;
    release(c, keys, &reply, result).await
}

/// A get into fresh buffers, sized from the lease.
pub(crate) async fn get_vecs(
    c: &mut Connection,
    a: &mut Attached,
    keys: &[BlockKey],
) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
    let reply = c.lease(keys, false).await?;
    let mut bufs: Vec<Vec<u8>> = reply.lens.iter().map(|&l| vec![0u8; l as usize]).collect();
    let result = {
        let mut dst: Vec<Vec<&mut [u8]>> = bufs.iter_mut().map(|b| vec![&mut b[..]]).collect();
        read_leased(a, &reply, &mut dst).await
    };
    let outcomes = release(c, keys, &reply, result).await?;
    Ok(outcomes
        .into_iter()
        .zip(bufs)
        .map(|(o, b)| (o == GetOutcome::Hit).then_some(b))
        .collect())
}

/// A get straight into GPU memory (GPU-direct): the node checks every block as it leases
/// it (this process cannot read GPU memory to check it), the READ scatters the data into the
/// block's device spans and its trailer into the landing buffer, and the trailer is checked
/// against the lease, which proves the READ took the leased block. Leased blocks do not change.
pub(crate) async fn get_into_gpu(
    c: &mut Connection,
    a: &mut Attached,
    keys: &[BlockKey],
    dst: &[Vec<(u64, u64)>],
) -> Result<Vec<GetOutcome>, ClientError> {
    {
        // Bytes READ into GPU memory are not checked where they land: only a lease that
        // outlives the whole transfer guarantees they are the leased block's.
        if a.lease_timeout <= a.timeout {
            return Err(ClientError::RdmaUnavailable(format!(
                "GPU-direct gets need the node's lease timeout ({:?}) to exceed this client's \
                 timeout ({:?}): a lease revoked mid-READ could put another block's bytes in GPU \
                 memory unchecked; raise the node's --shm-lease-timeout, lower the client's \
                 timeout, or stage through pinned host memory",
                a.lease_timeout, a.timeout
            )));
        }
    }
    let reply = c.lease(keys, true).await?;
    let result = read_into_gpu(a, &reply, dst).await;
    release(c, keys, &reply, result).await
}

async fn read_into_gpu(
    a: &mut Attached,
    reply: &LeaseGetReply,
    dst: &[Vec<(u64, u64)>],
) -> Result<Vec<GetOutcome>, ClientError> {
    let mut outcomes = vec![GetOutcome::Miss; dst.len()];
    let mut plan = Vec::new();
    // (block, where its trailer lands in the landing buffer)
    let mut trailers = Vec::new();
    let mut at = 0usize;
    for (i, spans) in dst.iter().enumerate() {
        let expected: usize = spans.iter().map(|s| s.1 as usize).sum();
        let Some((len, off)) = a.leased_block(reply, i, expected, &mut outcomes)? else {
            continue;
        };
        let trailer_len = checksum::trailer_len(len);
        if at + trailer_len > a.landing_mem.len() {
            return Err(ClientError::InvalidArgument(format!(
                "the checksum trailers of {} blocks overflow the {}-byte RDMA landing buffer; \
                 get fewer blocks a call or raise shm_staging_bytes",
                dst.len(),
                a.landing_mem.len()
            )));
        }
        let segs = a
            .shared
            .gpu_segments(spans)
            .ok_or_else(|| not_gpu_registered(i))?;
        plan.extend(a.plan(off, &segs)?);
        let trailer_off = off + checksum::trailer_offset(len) as u64;
        let landing = [(a.landing_at(at), trailer_len as u64, a.landing.lkey())];
        plan.extend(a.plan(trailer_off, &landing)?);
        trailers.push((i, at));
        at = aligned_end(at, trailer_len as u64);
    }
    if trailers.is_empty() {
        return Ok(outcomes);
    }
    a.run(Direction::Read, &plan).await?;
    for (i, at) in trailers {
        // SAFETY: the READ completed.
        let trailer = unsafe { a.landed(at, checksum::trailer_len(reply.lens[i] as usize)) };
        outcomes[i] = if checksum::trailer_checksum(trailer) == reply.trailer_checksums[i] {
            GetOutcome::Hit
        } else {
            GetOutcome::Miss
        };
    }
    Ok(outcomes)
}

/// Ends the lease whatever happened (never left to the timeout when we can help it), naming
/// the blocks that failed their checks.
async fn release(
    c: &mut Connection,
    keys: &[BlockKey],
    reply: &LeaseGetReply,
    result: Result<Vec<GetOutcome>, ClientError>,
) -> Result<Vec<GetOutcome>, ClientError> {
    let suspect: Vec<BlockKey> = match &result {
        Ok(outcomes) => outcomes
            .iter()
            .zip(keys)
            .zip(&reply.lens)
            .filter(|((o, _), len)| **len > 0 && **o == GetOutcome::Miss)
            .map(|((_, k), _)| *k)
            .collect(),
        Err(_) => Vec::new(),
    };
    let released = c.release(reply.lease_id, &suspect).await;
    let outcomes = result?;
    released?;
    if !suspect.is_empty() {
        tracing::warn!(
            blocks = suspect.len(),
            "kvcache: blocks read over RDMA failed verification; reported as misses"
        );
    }
    Ok(outcomes)
}

async fn read_leased(
    a: &mut Attached,
    reply: &LeaseGetReply,
    dst: &mut [Vec<&mut [u8]>],
) -> Result<Vec<GetOutcome>, ClientError> {
    let mut outcomes = vec![GetOutcome::Miss; dst.len()];
    let mut i = 0;
    while i < dst.len() {
        let mut plan = Vec::new();
        // Blocks to read: (index, where they land in the landing buffer, whether the data
        // lands straight in registered segments with only the trailer landing).
        let mut batch: Vec<(usize, usize, bool)> = Vec::new();
        let mut at = 0usize;
        while i < dst.len() {
            let expected: usize = dst[i].iter().map(|s| s.len()).sum();
            let Some((len, off)) = a.leased_block(reply, i, expected, &mut outcomes)? else {
                i += 1;
                continue;
            };
            let segs: Vec<(u64, u64)> = dst[i]
                .iter()
                .map(|s| (s.as_ptr() as u64, s.len() as u64))
                .collect();
            let direct = a.shared.registered_segments(&segs);
            let need = if direct.is_some() {
                checksum::trailer_len(len)
            } else {
                checksum::stored_len(len)
            };
            if at + need > a.landing_mem.len() {
                if batch.is_empty() {
                    return Err(ClientError::InvalidArgument(format!(
                        "a {len}-byte block does not fit the {}-byte RDMA landing buffer; raise shm_staging_bytes",
                        a.landing_mem.len()
                    )));
                }
                break;
            }
            let landing = [(a.landing_at(at), need as u64, a.landing.lkey())];
            match &direct {
                Some(segs) => {
                    plan.extend(a.plan(off, segs)?);
                    let trailer_off = off + checksum::trailer_offset(len) as u64;
                    plan.extend(a.plan(trailer_off, &landing)?);
                }
                None => plan.extend(a.plan(off, &landing)?),
            }
            batch.push((i, at, direct.is_some()));
            at = aligned_end(at, need as u64);
            i += 1;
        }
        if batch.is_empty() {
            continue;
        }
        a.run(Direction::Read, &plan).await?;
        for (i, at, direct) in batch {
            let len = reply.lens[i] as usize;
            let sum = reply.trailer_checksums[i];
            let ok = if direct {
                // SAFETY: the READ completed.
                let trailer = unsafe { a.landed(at, checksum::trailer_len(len)) };
                checksum::scattered_intact(&dst[i], len, trailer, sum)
            } else {
                // SAFETY: the READ completed.
                let src = unsafe { a.landed(at, checksum::stored_len(len)) };
                copy_verified_from(src, len, sum, &mut dst[i])?
            };
            outcomes[i] = if ok {
                GetOutcome::Hit
            } else {
                GetOutcome::Miss
            };
        }
    }
    Ok(outcomes)
}

/// A put: WRITE blocks into the node's staging window (straight from registered memory, else
/// through the landing buffer), then `StagedPut`, as many blocks at a time as the window holds.
pub(crate) async fn put(
    c: &mut Connection,
    a: &mut Attached,
    keys: &[BlockKey],
    values: &[&[&[u8]]],
    lens: &[u64],
) -> Result<Vec<PutStatus>, ClientError> {
    put_with(c, a, keys, lens, |a, i, at| {
        let segs = values[i];
        let spans: Vec<(u64, u64)> = segs
            .iter()
            .map(|s| (s.as_ptr() as u64, s.len() as u64))
            .collect();
        if let Some(direct) = a.shared.registered_segments(&spans) {
            return Ok(direct);
        }
        let mut w = at;
        for s in segs.iter() {
            // SAFETY: `staged_batch` keeps every block inside the landing buffer, which only
            // this checked-out connection writes.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), a.landing_mem.base().add(w), s.len())
            };
            w += s.len();
        }
        Ok(vec![(a.landing_at(at), lens[i], a.landing.lkey())])
    })
    .await
}

/// A put straight from GPU memory (GPU-direct): the WRITE gathers each block from its device
/// spans into the node's staging window, and the node checksums it as it commits.
pub(crate) async fn put_from_gpu(
    c: &mut Connection,
    a: &mut Attached,
    keys: &[BlockKey],
    src: &[Vec<(u64, u64)>],
    lens: &[u64],
) -> Result<Vec<PutStatus>, ClientError> {
    put_with(c, a, keys, lens, |a, i, _| {
        a.shared
            .gpu_segments(&src[i])
            .ok_or_else(|| not_gpu_registered(i))
    })
    .await
}

/// The put loop: `pieces(a, i, at)` says where block `i`'s bytes come from, as registered
/// segments, given the landing-buffer offset `at` it may stage them at.
async fn put_with(
    c: &mut Connection,
    a: &mut Attached,
    keys: &[BlockKey],
    lens: &[u64],
    mut pieces: impl FnMut(&Attached, usize, usize) -> Result<Vec<(u64, u64, u32)>, ClientError>,
) -> Result<Vec<PutStatus>, ClientError> {
    let mut statuses = Vec::with_capacity(keys.len());
    let mut start = 0;
    while start < keys.len() {
        let window = a.staging.len.min(a.landing_mem.len() as u64) as usize;
        let n = staged_batch(lens, start, window, "RDMA")?;
        let end = start + n;
        let mut plan = Vec::new();
        let mut offsets = Vec::with_capacity(n);
        let mut at = 0usize;
        for (i, &len) in (start..end).zip(&lens[start..end]) {
            offsets.push(at as u64);
            plan.extend(a.plan(at as u64, &pieces(&*a, i, at)?)?);
            at = aligned_end(at, len);
        }
        a.run(Direction::Write, &plan).await?;
        statuses.extend(commit_staged(c, &keys[start..end], &lens[start..end], offsets).await?);
        start = end;
    }
    Ok(statuses)
}
