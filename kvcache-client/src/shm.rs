//! The client side of shared memory: attach over the node's Unix socket, map the pool once
//! (read-only) and a staging window per connection (read-write), copy blocks out of the pool
//! with verification, and lay blocks into the staging window for puts.

use std::os::fd::AsFd;
use std::sync::Arc;

use kvcache_core::checksum::{self, Scatter};
use kvcache_core::wire::{
    ErrorCode, ErrorReply, FrameHeader, FrameLimits, HEADER_LEN, Op, PingReply, ShmAttachReply,
    ShmAttachRequest,
};
use kvcache_transport::ShmView;
use kvcache_transport::shm::recv_with_fds;
use kvcache_transport::tcp;
use prost::Message;
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::ClientError;

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

/// Sends `ShmAttach` on a fresh connection and maps what the node hands back. `known` is a
/// pool already mapped by this client: reused if the node reports the same pool.
pub(crate) async fn attach(
    stream: &mut UnixStream,
    staging_bytes: u64,
    known: Option<Arc<ShmPool>>,
) -> Result<Attached, ClientError> {
    let req = ShmAttachRequest { staging_bytes }.encode_to_vec();
    let head = FrameHeader::request(Op::ShmAttach, 1, req.len(), 0);
    tcp::write_frame(stream, &head, &req, &[]).await?;
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
    pub(crate) fn copy_verified(
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

/// Copies a block of `len` data bytes from `src` (the block as stored: data, then trailer)
/// into `dst`, checking the trailer against `trailer_sum` and every chunk as it lands; false
/// if any check fails (what landed must then not be used). Shared memory copies straight out
/// of the node's pool; RDMA out of the buffer its READ landed in.
pub(crate) fn copy_verified_from(
    src: &[u8],
    len: usize,
    trailer_sum: u64,
    dst: &mut [&mut [u8]],
) -> Result<bool, ClientError> {
    // Check a private copy of the trailer, so the checks below use what was verified.
    let trailer = src[checksum::trailer_offset(len)..checksum::stored_len(len)].to_vec();
    if checksum::trailer_checksum(&trailer) != trailer_sum {
        return Ok(false);
    }
    let mut out = Scatter::new(dst);
    if out.capacity() != len {
        return Err(ClientError::InvalidArgument(format!(
            "destination holds {} bytes for a {len}-byte block",
            out.capacity()
        )));
    }
    let chunks = checksum::chunk_count(len);
    for i in 0..chunks {
        let next = if i + 1 < chunks {
            &src[checksum::chunk_range(len, i + 1)]
        } else {
            &[]
        };
        let landed =
            checksum::copy_chunk_checked(&src[checksum::chunk_range(len, i)], next, &mut out);
        if landed != Some(checksum::recorded(&trailer, i)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where each block of a put went in the staging window.
pub(crate) struct Staged {
    pub(crate) offsets: Vec<u64>,
}

impl Staging {
    /// Window size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.view.len()
    }

    /// Copies blocks (each a list of segments of `lens[i]` bytes in all) into the window back
    /// to back, each at a 64-byte boundary. The caller checked they fit (see [`fits`]).
    pub(crate) fn stage(&mut self, values: &[&[&[u8]]], lens: &[u64]) -> Staged {
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
        Staged { offsets }
    }
}

pub(crate) fn aligned_end(at: usize, len: u64) -> usize {
    (at + len as usize).next_multiple_of(64)
}

/// How many of `lens`, from the start, fit together in a window of `window` bytes.
pub(crate) fn fits(lens: &[u64], window: usize) -> usize {
    let mut at = 0usize;
    for (i, &len) in lens.iter().enumerate() {
        if at + len as usize > window {
            return i;
        }
        at = aligned_end(at, len);
    }
    lens.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_packed_on_64_byte_boundaries_until_the_window_is_full() {
        assert_eq!(fits(&[10, 10, 10], 200), 3);
        assert_eq!(fits(&[100, 100], 164), 1, "second block starts at 128");
        assert_eq!(fits(&[100, 100], 228), 2);
        assert_eq!(fits(&[300], 200), 0);
        assert_eq!(fits(&[], 0), 0);
    }
}
