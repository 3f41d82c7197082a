//! The TCP byte path: payload inline in the frames, read straight into the caller's memory and
//! checked there, chunk by chunk, against the checksums the node sends with the reply.

use kvcache_core::BlockKey;
use kvcache_core::checksum;
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

/// What a get asks for: the client checks each chunk as it lands.
fn get_request(keys: &[BlockKey]) -> GetRequest {
    GetRequest {
        keys: encode_keys(keys),
        client_verifies: true,
    }
}

/// The reply's chunk checksums, handed out block by block; empty from a node that predates
/// `client_verifies` and checked the chunks itself.
struct Sums<'a> {
    rest: &'a [u64],
}

impl<'a> Sums<'a> {
    /// The sums of the next block sent, of `len` bytes (the reply's count was checked).
    fn take(&mut self, len: usize) -> Option<&'a [u64]> {
        if self.rest.is_empty() {
            return None;
        }
        let (block, rest) = self.rest.split_at(checksum::chunk_count(len));
        self.rest = rest;
        Some(block)
    }
}

/// Reads one block of `len` bytes into `dst`, checked against `sums` where given; false if a
/// check failed.
async fn read_block(
    c: &mut Connection,
    dst: &mut [&mut [u8]],
    len: usize,
    sums: Option<&[u64]>,
) -> Result<bool, ClientError> {
    if let Some(sums) = sums {
        return c.read_checked(dst, len, sums).await;
    }
    for s in dst.iter_mut() {
        c.read_payload_into(s).await?;
    }
    Ok(true)
}

/// A get into fresh buffers.
pub(crate) async fn get_vecs(
    c: &mut Connection,
    keys: &[BlockKey],
) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
    let reply = c.call_get(&get_request(keys), keys.len()).await?;
    let mut sums = Sums {
        rest: &reply.chunk_sums,
    };
    let mut suspect = Vec::new();
    let mut values = Vec::with_capacity(keys.len());
    for (&len, &key) in reply.lens.iter().zip(keys) {
        values.push(match len as usize {
            0 => None,
            n => {
                let mut v = vec![0u8; n];
                if read_block(c, &mut [&mut v[..]], n, sums.take(n)).await? {
                    Some(v)
                } else {
                    suspect.push(key);
                    None
                }
            }
        });
    }
    c.report_suspects(&suspect).await?;
    Ok(values)
}

/// A get into caller segments; a block whose stored length differs from its segments' is
/// skipped on the stream and left untouched, and one that fails its check is a miss.
pub(crate) async fn get_into(
    c: &mut Connection,
    keys: &[BlockKey],
    dst: &mut [Vec<&mut [u8]>],
) -> Result<Vec<GetOutcome>, ClientError> {
    let reply = c.call_get(&get_request(keys), keys.len()).await?;
    let mut sums = Sums {
        rest: &reply.chunk_sums,
    };
    let mut suspect = Vec::new();
    let mut outcomes = Vec::with_capacity(keys.len());
    for ((&len, segs), &key) in reply.lens.iter().zip(dst.iter_mut()).zip(keys) {
        let expected: usize = segs.iter().map(|s| s.len()).sum();
        outcomes.push(match len as usize {
            0 => GetOutcome::Miss,
            n if n == expected => {
                if read_block(c, segs, n, sums.take(n)).await? {
                    GetOutcome::Hit
                } else {
                    suspect.push(key);
                    GetOutcome::Miss
                }
            }
            n => {
                sums.take(n);
                c.skip_payload(n).await?;
                GetOutcome::WrongSize {
                    stored: n,
                    expected,
                }
            }
        });
    }
    c.report_suspects(&suspect).await?;
    Ok(outcomes)
}
