//! The shared-memory data plane, for clients on the node's host.
//!
//! A Unix socket sits next to the TCP listener and speaks the same frames. Its first request
//! must be `ShmAttach`; the reply carries two file descriptors: the pool, read-only, and a
//! staging window for this connection alone, read-write. Then:
//!
//! - get: `ShmGet` leases the blocks and answers where they lie in the pool and the checksum of
//!   each block's trailer; the client copies the bytes out of its mapping, checks every chunk
//!   as it lands in its own memory, and sends `ShmRelease` (one-way, no round trip). A client
//!   that holds a lease past `--shm-lease-timeout` has it revoked; if it then reads a reused
//!   page, its check fails and it reports a miss, never wrong bytes.
//! - put: the client writes blocks into its staging window and sends `ShmPut`; the node copies
//!   them into the pool, checksumming each chunk while it is in cache, and commits. Clients
//!   never get write access to the pool, so no client (stalled, buggy or hostile) can alter a
//!   committed block or another client's half-written one.
//!
//! Whoever can connect to the socket can read the whole pool: the socket's file mode
//! (`--shm-mode`, 600 by default) decides who that is. Everything a connection holds (leases,
//! its staging window) is released when it closes, so a client that dies leaks nothing.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvcache_core::BlockKey;
use kvcache_core::wire::{
    self, ErrorCode, FrameHeader, Op, PutReply, ShmAttachReply, ShmAttachRequest, ShmGetReply,
    ShmGetRequest, ShmPutRequest, ShmReleaseRequest,
};
use kvcache_transport::shm::send_with_fds;
use kvcache_transport::tcp::{self, FrameReadError};
use kvcache_transport::{LockMode, MemoryRegion, ShmRegion};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::auth::Access;
use crate::metrics::{ProtocolError, Transport};
use crate::service::{
    self, Outcome, ServiceContext, decode, keys_of, put_refused, send_reply, try_outcome,
};
use crate::store::{CommitOutcome, Lease};

/// Most unreleased lease batches one connection may hold; a client past it gets an error.
const MAX_LEASE_BATCHES: usize = 4096;

/// Staging windows are whole pages.
const STAGING_ALIGN: u64 = 4096;

/// What every shared-memory connection needs beyond the service context.
pub struct ShmServe {
    pub lease_timeout: Duration,
    pub max_staging: u64,
    /// A read-only file description of the pool, opened once and handed to every client.
    pub pool_ro: OwnedFd,
    pub pool_bytes: u64,
    /// Distinguishes this pool from any other (a restarted node has a new one).
    pub pool_id: String,
    /// Uids admitted besides the node's own (`--shm-allow-uids`); `None` admits every peer
    /// the socket's mode lets connect.
    pub allow_uids: Option<Vec<u32>>,
}

impl ShmServe {
    /// Whether a peer of `uid` may attach.
    fn admits(&self, uid: Option<u32>) -> bool {
        // SAFETY: geteuid has no preconditions.
        let own = unsafe { libc::geteuid() };
        match (&self.allow_uids, uid) {
            (None, _) => true,
            (Some(list), Some(uid)) => uid == own || list.contains(&uid),
            (Some(_), None) => false,
        }
    }
}

/// One attached client: its staging window and the leases it holds. RDMA connections hold one
/// too (their staging window registered with the device, the pool read through the device).
pub struct ShmSession {
    /// What must go before the staging window (an RDMA queue pair and registration).
    _keep: Option<Box<dyn Send + Sync>>,
    staging: ShmRegion,
    leases: Mutex<LeaseTable>,
    lease_timeout: Duration,
    transport: Transport,
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

impl ShmSession {
    pub(crate) fn new(staging: ShmRegion, lease_timeout: Duration, transport: Transport) -> Self {
        Self {
            _keep: None,
            staging,
            leases: Mutex::new(LeaseTable::default()),
            lease_timeout,
            transport,
        }
    }

    /// Keeps `what` alive exactly as long as the session, and dropped before its window.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn keep(mut self, what: Box<dyn Send + Sync>) -> Self {
        self._keep = Some(what);
        self
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

/// Makes the directory of the default socket path (`/tmp/kvcache-UID`, or
/// `$XDG_RUNTIME_DIR`) if it is missing, mode 0711 (others may reach a socket in it but not
/// create names), and refuses a directory that another uid owns or that others may write:
/// someone could have put a socket there first and so stand in for the node (audit M8).
pub fn prepare_socket_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect the socket directory {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != own || meta.mode() & 0o022 != 0 {
        bail!(
            "the shared-memory socket directory {} is {} (mode {:o}, uid {}): another user could \
             take the socket's name; remove it, or give --shm-socket a path in a directory only \
             uid {own} may write",
            dir.display(),
            if meta.is_dir() {
                "not private"
            } else {
                "not a directory"
            },
            meta.mode() & 0o7777,
            meta.uid(),
        );
    }
    Ok(())
}

/// Binds the socket at `path` with permission bits `mode`. The socket is bound under a
/// temporary name, given its mode, then renamed into place, so no client can ever connect
/// through looser permissions. A stale socket file (nothing listening) is replaced; a live one
/// is an error.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<(UnixListener, SocketFile)> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another kvcache-server already serves shared memory at {}; pick another --shm-socket or stop it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .with_context(|| format!("cannot bind the shared-memory socket {}", tmp.display()))?;
    let placed = (|| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot place the socket at {}", path.display()));
    }
    Ok((listener, SocketFile(path.to_path_buf())))
}

/// Says once, at start, when the kernel will not back the shared pool with huge pages: clients
/// then take a TLB miss per 4 KiB on every copy (see docs/ARCHITECTURE.md).
pub fn hint_huge_pages() {
    const KNOB: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    if let Ok(mode) = std::fs::read_to_string(KNOB)
        && (mode.contains("[never]") || mode.contains("[deny]"))
    {
        tracing::info!(
            "the shared pool uses 4 KiB pages ({KNOB} is {}); `echo advise > {KNOB}` lets it use huge pages for faster same-host copies",
            mode.trim()
        );
    }
}

/// The socket's file, removed when the listener stops.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves one Unix-socket connection: attach, then the request loop with shared memory on.
pub async fn serve_unix(
    ctx: Arc<ServiceContext>,
    serve: Arc<ShmServe>,
    mut stream: UnixStream,
    shutdown: watch::Receiver<bool>,
) {
    let cred = stream.peer_cred().ok();
    let peer = match &cred {
        Some(c) => format!("pid {} uid {}", c.pid().unwrap_or(-1), c.uid()),
        None => "unknown local peer".to_string(),
    };
    if !serve.admits(cred.as_ref().map(|c| c.uid())) {
        let _ =
            tokio::time::timeout(ctx.request_timeout, refuse_uid(&ctx, &mut stream, &peer)).await;
        return;
    }
    let session =
        match tokio::time::timeout(ctx.request_timeout, attach(&ctx, &serve, &mut stream)).await {
            Ok(Ok((session, access))) => (Arc::new(session), access),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "shared-memory attach failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "shared-memory client sent no attach in time");
                return;
            }
        };
    let (session, access) = session;
    tracing::debug!(%peer, staging = session.staging.len(), tenant = access.tenant().unwrap_or("-"), "shared-memory client attached");
    let reaper = spawn_reaper(&session, &ctx);
    let (rd, wr) = stream.split();
    service::serve_stream(&ctx, rd, wr, &peer, shutdown, Some(session), access).await;
    reaper.abort();
    // Dropping the session releases every lease the client still held.
}

/// Answers the first request of a peer whose uid `--shm-allow-uids` does not list with
/// `Forbidden`, saying why, so its client falls back to TCP knowing the reason.
async fn refuse_uid(ctx: &ServiceContext, stream: &mut UnixStream, peer: &str) {
    let msg = format!(
        "this node's shared memory admits only the uids of --shm-allow-uids ({peer} is not one); use TCP"
    );
    ctx.metrics.protocol_error(ProtocolError::Forbidden);
    tracing::warn!(%peer, "refused a shared-memory peer whose uid --shm-allow-uids does not list");
    if let Ok(h) = tcp::read_header(stream, &ctx.limits).await
        && tcp::read_control(stream, h.control_len).await.is_ok()
    {
        let _ = service::send_error(stream, h.request_id, ErrorCode::Forbidden, &msg).await;
    }
}

/// Starts revoking the session's expired leases; abort the task when the connection ends.
pub(crate) fn spawn_reaper(
    session: &Arc<ShmSession>,
    ctx: &Arc<ServiceContext>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(reap(Arc::downgrade(session), Arc::clone(ctx)))
}

/// Revokes expired leases of one session until it ends. Leases expire between one and one and
/// a half timeouts after they were granted.
async fn reap(session: Weak<ShmSession>, ctx: Arc<ServiceContext>) {
    loop {
        let Some(period) = session.upgrade().map(|s| s.lease_timeout / 2) else {
            return;
        };
        tokio::time::sleep(period.max(Duration::from_millis(5))).await;
        let Some(s) = session.upgrade() else { return };
        let revoked = s.expire(Instant::now());
        if revoked > 0 {
            ctx.metrics.shm_leases_revoked(revoked);
            if service::warn_allowed() {
                tracing::warn!(blocks = revoked, timeout = ?s.lease_timeout, "revoked shared-memory leases held past the timeout");
            }
        }
    }
}

/// The connection's first requests: `Hello` (required with `--auth`), then `ShmAttach`.
async fn attach(
    ctx: &ServiceContext,
    serve: &ShmServe,
    stream: &mut UnixStream,
) -> anyhow::Result<(ShmSession, Access)> {
    let mut access = ctx.auth.initial();
    let mut h = tcp::read_header(stream, &ctx.limits).await?;
    while h.op == Op::Hello && !h.reply {
        let control = tcp::read_control(stream, h.control_len).await?;
        if let service::Flow::Close = service::hello(ctx, &h, &control, stream, &mut access).await?
        {
            bail!("hello refused");
        }
        h = tcp::read_header(stream, &ctx.limits).await?;
    }
    if !access.authenticated() {
        service::refuse_unauthenticated(ctx, stream, h.request_id, service::NEEDS_TOKEN).await;
        bail!("no hello before {}", h.op.name());
    }
    if !access.shared_memory() {
        let msg = format!(
            "tenant {:?} may not map the pool (shared_memory = false in the node's auth file); use TCP",
            access.tenant().unwrap_or_default()
        );
        let _ = service::send_error(stream, h.request_id, ErrorCode::Forbidden, &msg).await;
        bail!(msg);
    }
    if h.op != Op::ShmAttach || h.reply || h.payload_len != 0 {
        let msg = format!(
            "the shared-memory socket expects shm_attach first, got {}",
            h.op.name()
        );
        let _ = service::send_error(stream, h.request_id, ErrorCode::Malformed, &msg).await;
        bail!(msg);
    }
    let control = tcp::read_control(stream, h.control_len).await?;
    let req = ShmAttachRequest::decode(control.as_slice()).context("undecodable shm_attach")?;
    let staging = staging_window("kvcache-staging", req.staging_bytes, serve.max_staging)?;
    let reply = ShmAttachReply {
        pool_bytes: serve.pool_bytes,
        staging_bytes: staging.len() as u64,
        lease_timeout_ms: serve.lease_timeout.as_millis().min(u32::MAX as u128) as u32,
        pool_id: serve.pool_id.clone(),
    }
    .encode_to_vec();
    let mut frame = FrameHeader::reply(Op::ShmAttach, h.request_id, reply.len(), 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&reply);
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            send_with_fds(
                stream.as_fd(),
                &frame,
                &[serve.pool_ro.as_fd(), staging.fd()],
            )
        })
        .await?;
    stream.write_all(&frame[sent..]).await?;
    let session = ShmSession::new(staging, serve.lease_timeout, Transport::Shm);
    Ok((session, access))
}

/// A connection's staging window: what the client asked for, within a page and `max`, in
/// whole pages (shared memory and RDMA connections alike).
pub(crate) fn staging_window(name: &str, asked: u64, max: u64) -> anyhow::Result<ShmRegion> {
    let len = asked
        .clamp(STAGING_ALIGN, max)
        .next_multiple_of(STAGING_ALIGN);
    Ok(ShmRegion::new_writable_by_peers(
        name,
        len as usize,
        LockMode::Off,
    )?)
}

/// Serves one shared-memory op of an attached connection.
pub(crate) async fn handle<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    access: &Access,
    session: &ShmSession,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
) -> Result<Outcome, FrameReadError> {
    match h.op {
        Op::ShmGet => get(ctx, access, session, h, control, wr).await,
        Op::ShmPut => put(ctx, access, session, h, control, wr).await,
        Op::ShmRelease => Ok(release(ctx, access, session, control)),
        _ => unreachable!("dispatched by op"),
    }
}

async fn get<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    access: &Access,
    session: &ShmSession,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
) -> Result<Outcome, FrameReadError> {
    let req: ShmGetRequest = try_outcome!(decode(h, control));
    let keys = try_outcome!(keys_of(ctx, access, &req.keys));
    // Keys this connection does not hold yet, each once: only these take store leases (and
    // may be brought up from a lower tier).
    let fresh: Vec<BlockKey> = {
        let table = session.leases.lock();
        if table.batches.len() >= MAX_LEASE_BATCHES {
            return Ok(Outcome::Refused(format!(
                "{MAX_LEASE_BATCHES} lease batches are unreleased on this connection; release them first"
            )));
        }
        if table.bytes >= ctx.max_leased_bytes {
            return Ok(Outcome::Denied(
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
    let mut leased = crate::service::lease_all(&ctx.store, &fresh).await;
    // The table's lock is never held across an await.
    let reply = {
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
        let mut reply = ShmGetReply {
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
        ctx.metrics.blocks(Op::ShmGet, keys.len(), batch.len());
        ctx.metrics.bytes_out(session.transport, bytes);
        if !batch.is_empty() {
            table.next_id += 1;
            reply.lease_id = table.next_id;
            let batch = LeaseBatch {
                deadline: Instant::now() + session.lease_timeout,
                keys: batch,
            };
            table.batches.insert(reply.lease_id, batch);
        }
        reply
    };
    drop(leased);
    send_reply(wr, Op::ShmGet, h.request_id, &reply).await?;
    Ok(Outcome::Done)
}

/// Whether a leased block passes every check; one that fails is dropped by the store.
fn intact(lease: &Lease) -> bool {
    lease.verified_bytes().is_ok()
}

/// Ends a lease (one-way: nothing is sent back). Suspect blocks are verified by the node
/// itself before the lease ends, each once; one that fails is dropped, one that passes stays.
fn release(ctx: &ServiceContext, access: &Access, session: &ShmSession, control: &[u8]) -> Outcome {
    let Ok(req) = ShmReleaseRequest::decode(control) else {
        return Outcome::Close("undecodable shm_release".into());
    };
    let Ok(suspect) = wire::decode_keys(&req.suspect) else {
        return Outcome::Close("shm_release with a ragged suspect list".into());
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
            let confirmed = held.lease.verified_bytes().is_err();
            ctx.metrics.shm_suspect(confirmed);
            if !confirmed {
                tracing::warn!(%key, "a shared-memory client reported a block corrupt but it verifies; the client's lease may have been revoked mid-copy");
            }
        }
    }
    table.end(&batch);
    Outcome::Done
}

async fn put<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    access: &Access,
    session: &ShmSession,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
) -> Result<Outcome, FrameReadError> {
    let req: ShmPutRequest = try_outcome!(decode(h, control));
    let keys = try_outcome!(keys_of(ctx, access, &req.keys));
    if keys.len() != req.lens.len() || keys.len() != req.offsets.len() {
        return Ok(Outcome::Refused(format!(
            "shm_put names {} keys, {} lengths and {} offsets",
            keys.len(),
            req.lens.len(),
            req.offsets.len()
        )));
    }
    let window = session.staging.len() as u64;
    for (&off, &len) in req.offsets.iter().zip(&req.lens) {
        if off.checked_add(len as u64).is_none_or(|end| end > window) {
            return Ok(Outcome::Refused(format!(
                "a block of {len} bytes at offset {off} overruns the {window}-byte staging window"
            )));
        }
    }
    ctx.metrics.blocks(Op::ShmPut, keys.len(), 0);
    let mut statuses = Vec::with_capacity(keys.len());
    let mut bytes = 0u64;
    for ((&key, &len), &off) in keys.iter().zip(&req.lens).zip(&req.offsets) {
        let status = match service::may_block(&ctx.store, || ctx.store.allocate(key, len as usize))
        {
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
                    CommitOutcome::Stored => wire::PutStatus::Stored,
                    CommitOutcome::AlreadyPresent => wire::PutStatus::AlreadyPresent,
                }
            }
            Err(e) => put_refused(ctx, e),
        };
        statuses.push(status as i32);
    }
    ctx.metrics.bytes_in(session.transport, bytes);
    send_reply(wr, Op::ShmPut, h.request_id, &PutReply { statuses }).await?;
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use kvcache_core::BlockKey;
    use kvcache_transport::LockMode;

    use super::intact;
    use crate::store::{Store, StoreConfig};

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
