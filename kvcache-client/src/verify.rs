//! The fused copy and check every byte path that reads a stored block uses: shared memory
//! copies straight out of the node's pool, RDMA out of the landing buffer its READ filled.

use kvcache_core::checksum::{self, Scatter};

use crate::error::ClientError;

/// Copies a block of `len` data bytes from `src` (the block as stored: data, then trailer)
/// into `dst`, checking the trailer against `trailer_sum` and every chunk as it lands; false
/// if any check fails (what landed must then not be used).
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
