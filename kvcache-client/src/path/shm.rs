//! The shared-memory byte path: attach over the node's Unix socket, map the pool once
//! (read-only) and a staging window per connection (read-write); gets lease blocks, copy them
//! out of the pool with verification and release them; puts lay blocks into the staging window
//! and commit them with `StagedPut`.

use std::os::fd::AsFd;
use std::sync::Arc;

use kvcache_core::BlockKey;
use kvcache_core::checksum;
use kvcache_core::wire::{
    ErrorCode, ErrorReply, FrameHeader, FrameLimits, HEADER_LEN, LeaseGetReply, Op, PingReply,
    PutStatus, ShmAttachReply, ShmAttachRequest,
};
use kvcache_transport::ShmView;
use kvcache_transport::frame_io;
use kvcache_transport::shm::recv_with_fds;
use prost::Message;
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::config::GetOutcome;
use crate::connection::{Connection, hello};
use crate::error::ClientError;
use crate::path::staged::{aligned_end, commit_staged, staged_batch};
use crate::verify::copy_verified_from;

/// The node's pool, mapped read-only; shared by every connection attached to the same pool.
pub(crate) struct ShmPool {
    view: ShmView,
    pub(crate) id: String,
}

/// A connection's staging window, mapped read-write; only that connection writes it.
pub(crate) struct Staging {
    view: ShmView,
}

/// What attaching a connection yields.
pub(crate) struct Attached {
    pub(crate) pool: Arc<ShmPool>,
    pub(crate) staging: Staging,
}

/// Why shared memory cannot be used with a node, judged from its `Ping` reply; `None` if it
/// can be tried.
pub(crate) fn unavailable_reason(ping: &PingReply) -> Option<String> {
    if ping.shm_socket.is_empty() {
        return Some("the node has shared memory off".into());
    }
    let here = kvcache_transport::shm::host_id();
    if ping.host_id.is_empty() || here.as_deref() != Some(ping.host_id.as_str()) {
        return Some("the node runs on another host".into());
    }
    None
}

/// Connects to a node's shared-memory socket and attaches: the control channel and the
/// mappings. `known` is the pool this client already maps, reused when the node still serves
/// the same one.
pub(crate) async fn open(
    path: &str,
    staging_bytes: u64,
    known: Option<Arc<ShmPool>>,
    token: Option<&str>,
) -> Result<(Connection, Attached), ClientError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            addr: path.to_string(),
            source,
        })?;
    if let Some(token) = token {
        hello(&mut stream, token).await?;
    }
    let attached = attach(&mut stream, staging_bytes, known).await?;
    Ok((Connection::from_unix(stream, 1), attached))
}

/// Sends `ShmAttach` on a fresh connection and maps what the node hands back. `known` is a
/// pool already mapped by this client: reused if the node reports the same pool.
async fn attach(
    stream: &mut UnixStream,
    staging_bytes: u64,
    known: Option<Arc<ShmPool>>,
) -> Result<Attached, ClientError> {
    let req = ShmAttachRequest { staging_bytes }.encode_to_vec();
    let head = FrameHeader::request(Op::ShmAttach, 1, req.len(), 0);
    frame_io::write_frame(stream, &head, &req, &[]).await?;
    // The descriptors ride on the reply's first byte; read exactly the reply, nothing beyond.
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    recv_exact(stream, &mut header, &mut fds).await?;
    let h = FrameHeader::decode(&header, &FrameLimits::default())
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut control = vec![0u8; h.control_len as usize];
    recv_exact(stream, &mut control, &mut fds).await?;
    if h.op == Op::Error {
        let err = ErrorReply::decode(control.as_slice()).unwrap_or_default();
        return Err(ClientError::Server {
            code: ErrorCode::try_from(err.code).unwrap_or(ErrorCode::Unknown),
            message: err.message,
        });
    }
    let reply = ShmAttachReply::decode(control.as_slice())
        .map_err(|e| ClientError::Protocol(format!("undecodable shm_attach reply: {e}")))?;
    let [pool_fd, staging_fd] = <[_; 2]>::try_from(fds).map_err(|fds: Vec<_>| {
        ClientError::Protocol(format!(
            "shm_attach reply carried {} file descriptors, not 2",
            fds.len()
        ))
    })?;
    let map_err = |what: &str, e: kvcache_transport::RegionError| {
        ClientError::Io(std::io::Error::other(format!(
            "cannot map the node's {what}: {e}"
        )))
    };
    let pool = match known {
        Some(p) if p.id == reply.pool_id && p.view.len() as u64 == reply.pool_bytes => p,
        _ => Arc::new(ShmPool {
            view: ShmView::map(pool_fd.as_fd(), reply.pool_bytes as usize, false)
                .map_err(|e| map_err("pool", e))?,
            id: reply.pool_id,
        }),
    };
    let staging = Staging {
        view: ShmView::map(staging_fd.as_fd(), reply.staging_bytes as usize, true)
            .map_err(|e| map_err("staging window", e))?,
    };
    // The mappings keep the memory; the descriptors close here.
    Ok(Attached { pool, staging })
}

async fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> Result<(), ClientError> {
    let mut got = 0;
    while got < buf.len() {
        let n = stream
            .async_io(Interest::READABLE, || {
                recv_with_fds(stream.as_fd(), &mut buf[got..], fds)
            })
            .await?;
        if n == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "kvcache node closed the shared-memory socket during attach",
            )));
        }
        got += n;
    }
    Ok(())
}

impl ShmPool {
    /// Copies the leased block at `offset` (of `len` data bytes, trailer checksum `trailer_sum`)
    /// into `dst`, checking every chunk as it lands there. False if any check fails: the bytes
    /// in `dst` are then unspecified and the caller reports a miss.
    fn copy_verified(
        &self,
        offset: u64,
        len: usize,
        trailer_sum: u64,
        dst: &mut [&mut [u8]],
    ) -> Result<bool, ClientError> {
        let stored = checksum::stored_len(len) as u64;
        if offset
            .checked_add(stored)
            .is_none_or(|end| end > self.view.len() as u64)
        {
            return Err(ClientError::Protocol(format!(
                "block of {len} bytes at offset {offset} lies outside the {}-byte pool",
                self.view.len()
            )));
        }
        // SAFETY: the range is inside the live read-only mapping (checked above; the file is
        // sealed against shrinking). The node leases the block, so its bytes do not change
        // unless the lease is revoked; even then every byte is checked after it is copied.
        let src = unsafe {
            std::slice::from_raw_parts(self.view.base().add(offset as usize), stored as usize)
        };
        copy_verified_from(src, len, trailer_sum, dst)
    }
}

impl Staging {
    /// Window size in bytes.
    fn len(&self) -> usize {
        self.view.len()
    }

    /// Copies blocks (each a list of segments of `lens[i]` bytes in all) into the window back
    /// to back, each at a 64-byte boundary; returns where each went. The caller checked they
    /// fit ([`staged_batch`]).
    fn stage(&mut self, values: &[&[&[u8]]], lens: &[u64]) -> Vec<u64> {
        let mut offsets = Vec::with_capacity(values.len());
        let mut at = 0usize;
        for (segs, &len) in values.iter().zip(lens) {
            offsets.push(at as u64);
            let mut w = at;
            for s in segs.iter() {
                assert!(w + s.len() <= self.view.len(), "staging overrun");
                // SAFETY: in bounds of the live read-write mapping (asserted); only this
                // connection writes its window, and `&mut self` makes this the only writer.
                unsafe {
                    std::ptr::copy_nonoverlapping(s.as_ptr(), self.view.base().add(w), s.len())
                };
                w += s.len();
            }
            at = aligned_end(at, len);
        }
        offsets
    }
}

/// A put: blocks go into the connection's staging window, as many at a time as fit, and the
/// node copies them into its pool.
pub(crate) async fn put(
    c: &mut Connection,
    a: &mut Attached,
    keys: &[BlockKey],
    values: &[&[&[u8]]],
    lens: &[u64],
) -> Result<Vec<PutStatus>, ClientError> {
    let mut statuses = Vec::with_capacity(keys.len());
    let mut start = 0;
    while start < keys.len() {
        let end = start + staged_batch(lens, start, a.staging.len(), "shared-memory")?;
        let offsets = a.staging.stage(&values[start..end], &lens[start..end]);
        statuses.extend(commit_staged(c, &keys[start..end], &lens[start..end], offsets).await?);
        start = end;
    }
    Ok(statuses)
}

/// A get into caller segments: lease, copy with verification, release.
pub(crate) async fn get_into(
    c: &mut Connection,
    a: &Attached,
    keys: &[BlockKey],
    dst: &mut [Vec<&mut [u8]>],
) -> Result<Vec<GetOutcome>, ClientError> {
    let mut leased = Leased::take(c, a, keys).await?;
    let mut outcomes = Vec::with_capacity(keys.len());
    for (i, segs) in dst.iter_mut().enumerate() {
        take_turns(i).await;
        let expected: usize = segs.iter().map(|s| s.len()).sum();
        outcomes.push(match leased.len(i) {
            0 => GetOutcome::Miss,
            n if n == expected => {
                if leased.copy(i, segs)? {
                    GetOutcome::Hit
                } else {
                    GetOutcome::Miss
                }
            }
            n => GetOutcome::WrongSize {
                stored: n,
                expected,
            },
        });
    }
    leased.release(c).await?;
    Ok(outcomes)
}

/// A get into fresh buffers.
pub(crate) async fn get_vecs(
    c: &mut Connection,
    a: &Attached,
    keys: &[BlockKey],
) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
    let mut leased = Leased::take(c, a, keys).await?;
    let mut values = Vec::with_capacity(keys.len());
    for i in 0..keys.len() {
        take_turns(i).await;
        values.push(match leased.len(i) {
            0 => None,
            n => {
                let mut v = vec![0u8; n];
                leased.copy(i, &mut [&mut v[..]])?.then_some(v)
            }
        });
    }
    leased.release(c).await?;
    Ok(values)
}

/// Lets the runtime's other tasks run before block `i` > 0 of a batch is copied. A copy is
/// synchronous (about 0.1-0.3 ms per MiB); without a turn between blocks, a call of 8 MiB held
/// its worker for milliseconds while other calls' replies waited, and at 8 x 1 MiB x4 p99 was
/// 9-14x p50. With it p99 is 1.8-2.0x p50, the memcpy ceiling's own shape, at the same
/// throughput (benches/results/shm-get-turns-ab.json).
async fn take_turns(i: usize) {
    if i > 0 {
        tokio::task::yield_now().await;
    }
}

/// Blocks leased by one `LeaseGet`, copied out one by one, then released together.
struct Leased<'k> {
    keys: &'k [BlockKey],
    reply: LeaseGetReply,
    pool: Arc<ShmPool>,
    /// Keys whose copy failed its check, reported on release.
    suspect: Vec<BlockKey>,
}

impl<'k> Leased<'k> {
    async fn take(
        c: &mut Connection,
        a: &Attached,
        keys: &'k [BlockKey],
    ) -> Result<Self, ClientError> {
        let reply = c.lease(keys, false).await?;
        Ok(Self {
            keys,
            reply,
            pool: Arc::clone(&a.pool),
            suspect: Vec::new(),
        })
    }

    /// Stored length of key `i`; 0 for a miss.
    fn len(&self, i: usize) -> usize {
        self.reply.lens[i] as usize
    }

    /// Copies key `i`'s block into `dst` (exactly its length); false, and the key is suspect,
    /// if the bytes failed their check.
    fn copy(&mut self, i: usize, dst: &mut [&mut [u8]]) -> Result<bool, ClientError> {
        let (off, sum) = (self.reply.offsets[i], self.reply.trailer_checksums[i]);
        let ok = self.pool.copy_verified(off, self.len(i), sum, dst)?;
        if !ok {
            self.suspect.push(self.keys[i]);
        }
        Ok(ok)
    }

    async fn release(self, c: &mut Connection) -> Result<(), ClientError> {
        c.release(self.reply.lease_id, &self.suspect).await?;
        if !self.suspect.is_empty() {
            tracing::warn!(
                blocks = self.suspect.len(),
                "kvcache: blocks failed verification; reported as misses"
            );
        }
        Ok(())
    }
}
