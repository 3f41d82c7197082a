//! Puts through a staging window (shared memory's, or the node's window an RDMA WRITE fills):
//! how blocks are laid out in it, how many fit at once, and the `StagedPut` that commits them.

use kvcache_core::BlockKey;
use kvcache_core::wire::{Op, PutReply, PutStatus, StagedPutRequest, encode_keys};

use crate::connection::Connection;
use crate::error::ClientError;

/// Where a block that ends at `at + len` lets the next one start: blocks sit on 64-byte
/// boundaries in staging windows and landing buffers.
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

/// How many blocks from `start` fit a staging window of `window` bytes; an error naming the
/// block if not even that one does.
pub(crate) fn staged_batch(
    lens: &[u64],
    start: usize,
    window: usize,
    what: &str,
) -> Result<usize, ClientError> {
    match fits(&lens[start..], window) {
        0 => Err(ClientError::InvalidArgument(format!(
            "block {start} has {} bytes, more than the {window}-byte {what} staging window; raise shm_staging_bytes",
            lens[start]
        ))),
        n => Ok(n),
    }
}

/// `StagedPut`: stores the blocks the client placed at `offsets` in its staging window (shared
/// memory or, over RDMA, the node's window it wrote).
pub(crate) async fn commit_staged(
    c: &mut Connection,
    keys: &[BlockKey],
    lens: &[u64],
    offsets: Vec<u64>,
) -> Result<Vec<PutStatus>, ClientError> {
    let req = StagedPutRequest {
        keys: encode_keys(keys),
        lens: lens.iter().map(|&l| l as u32).collect(),
        offsets,
    };
    let reply: PutReply = c.call_simple(Op::StagedPut, &req).await?;
    put_statuses(reply, keys.len())
}

/// Checks a put reply's statuses: one known status per block.
pub(crate) fn put_statuses(reply: PutReply, blocks: usize) -> Result<Vec<PutStatus>, ClientError> {
    if reply.statuses.len() != blocks {
        return Err(ClientError::Protocol(format!(
            "{} statuses for {blocks} blocks",
            reply.statuses.len()
        )));
    }
    reply
        .statuses
        .into_iter()
        .map(|s| {
            PutStatus::try_from(s)
                .map_err(|_| ClientError::Protocol(format!("unknown put status {s}")))
        })
        .collect()
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
