//! The TCP byte path: payload inline in the frames, read straight into the caller's memory.

use kvcache_core::BlockKey;
use kvcache_core::wire::{GetRequest, Op, PutReply, PutRequest, PutStatus, encode_keys};

use crate::config::GetOutcome;
use crate::connection::{Connection, decode_reply};
use crate::error::ClientError;
use crate::path::staged::put_statuses;

/// A put in as many frames as the node's frame limit (`max_payload`) needs.
pub(crate) async fn put(
    c: &mut Connection,
    keys: &[BlockKey],
    values: &[&[&[u8]]],
    lens: &[u64],
    max_payload: u32,
) -> Result<Vec<PutStatus>, ClientError> {
    let mut statuses = Vec::with_capacity(keys.len());
    let mut start = 0;
    while start < keys.len() {
        // Greedy chunks that fit the node's frame limit.
        let (mut end, mut bytes) = (start, 0u64);
        while end < keys.len() && bytes + lens[end] <= max_payload as u64 {
            bytes += lens[end];
            end += 1;
        }
        let req = PutRequest {
            keys: encode_keys(&keys[start..end]),
            lens: lens[start..end].iter().map(|&l| l as u32).collect(),
        };
        let payload: Vec<&[u8]> = values[start..end]
            .iter()
            .flat_map(|segs| segs.iter().copied())
            .collect();
        let (h, control) = c.call(Op::Put, &req, &payload).await?;
        c.expect_no_payload(&h)?;
        let reply: PutReply = decode_reply(&control)?;
        statuses.extend(put_statuses(reply, end - start)?);
        start = end;
    }
    Ok(statuses)
}

/// A get into fresh buffers.
pub(crate) async fn get_vecs(
    c: &mut Connection,
    keys: &[BlockKey],
) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
    let req = GetRequest {
        keys: encode_keys(keys),
    };
    let lens = c.call_get(&req, keys.len()).await?;
    let mut values = Vec::with_capacity(lens.len());
    for len in lens {
        values.push(match len {
            0 => None,
            n => Some(c.read_payload_vec(n as usize).await?),
        });
    }
    Ok(values)
}

/// A get into caller segments; a block whose stored length differs from its segments' is
/// skipped on the stream and left untouched.
pub(crate) async fn get_into(
    c: &mut Connection,
    keys: &[BlockKey],
    dst: &mut [Vec<&mut [u8]>],
) -> Result<Vec<GetOutcome>, ClientError> {
    let req = GetRequest {
        keys: encode_keys(keys),
    };
    let lens = c.call_get(&req, keys.len()).await?;
    let mut outcomes = Vec::with_capacity(lens.len());
    for (len, segs) in lens.into_iter().zip(dst.iter_mut()) {
        let expected: usize = segs.iter().map(|s| s.len()).sum();
        outcomes.push(match len as usize {
            0 => GetOutcome::Miss,
            n if n == expected => {
                for s in segs.iter_mut() {
                    c.read_payload_into(s).await?;
                }
                GetOutcome::Hit
            }
            n => {
                c.skip_payload(n).await?;
                GetOutcome::WrongSize {
                    stored: n,
                    expected,
                }
            }
        });
    }
    Ok(outcomes)
}
