//! The ops whose bytes travel inline in the frames, on every connection: put and get (payload
//! in the frame, straight from and into the pool), and the lookups (`exists`, `prefix_match`,
//! `ping`, `list_keys`), which answer with a control message only.

use kvcache_core::BlockKey;
use kvcache_core::wire::{
    self, ErrorCode, ExistsReply, ExistsRequest, FrameHeader, GetReply, GetRequest, ListKeysReply,
    ListKeysRequest, Op, PROTOCOL_VERSION, PingReply, PrefixMatchReply, PrefixMatchRequest,
    PutReply, PutRequest, PutStatus, ReleaseRequest,
};
use kvcache_transport::frame_io;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::Access;
use crate::dataplane::blocks::{confirm_suspect, lease_all, may_block, put_refused};
use crate::dataplane::request::{
    ConnResult, Outcome, ServiceContext, decode, io_err, keyed, send_reply, try_outcome,
};
use crate::metrics::Via;
use kvcache_core::checksum;
use kvcache_store::CommitOutcome;

/// Verified get payload gathered into the first vectored write of a reply: small enough that
/// the client starts copying while the rest is verified, and that the bytes are still in L2
/// when they are sent. 512 KiB was best by a few percent against 128 KiB and whole-reply
/// writes (benches/results/README.md).
const FIRST_FLUSH_BYTES: usize = 4 * checksum::CHUNK;

/// The same for every later write of the reply: a reply that outgrows the socket buffer is
/// written in fewer, larger steps (still within the 2 MiB of L2 here). At 8 values of 1 MiB x4
/// the node spent 0.34 CPU-s per GB against 0.35-0.38 with 512 KiB throughout (medians of six
/// runs each, benches/results/tcp-flush-ab.json); a reply of one 1 MiB value is written as
/// before.
const FLUSH_BYTES: usize = 8 * checksum::CHUNK;

/// The same for the rest of a reply the client checks itself: the node reads none of those
/// bytes, so nothing needs to stay in its cache, and the rest goes in writes of up to
/// `MAX_SLICES` chunks. At 8 values of 1 MiB x4 the node spent 0.175-0.191 CPU-s per GB
/// against 0.197-0.227 with 1 MiB writes (benches/results/tcp-unverified-flush-ab.json).
const UNVERIFIED_FLUSH_BYTES: usize = MAX_SLICES * checksum::CHUNK;

/// Most chunks gathered into one vectored write.
const MAX_SLICES: usize = 64;

pub(crate) async fn put<R, W>(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
    rd: &mut R,
    wr: &mut W,
) -> ConnResult<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (req, keys) = try_outcome!(keyed(ctx, access, h, control, |r: &PutRequest| &r.keys));
    if keys.len() != req.lens.len() {
        return Ok(Outcome::Refused(format!(
            "put names {} keys but {} lengths",
            keys.len(),
            req.lens.len()
        )));
    }
    let total: u64 = req.lens.iter().map(|&l| l as u64).sum();
    if total != h.payload_len as u64 {
        return Ok(Outcome::Refused(format!(
            "put lengths add up to {total} bytes but the frame carries {} payload bytes",
            h.payload_len
        )));
    }
    ctx.metrics.blocks(Op::Put, keys.len(), 0);
    let mut statuses = Vec::with_capacity(keys.len());
    // Step 2 of every block: the payload lands chunk by chunk in this buffer, which stays in
    // cache, and is copied into the pool and checksummed in one pass.
    let mut landing = ctx.landing.take();
    for (&key, &len) in keys.iter().zip(&req.lens) {
        let status = match may_block(&ctx.store, || ctx.store.allocate(key, len as usize)) {
            Ok(mut alloc) => {
                // If the peer dies here, the allocation is dropped uncommitted and its pages
                // return to the pool.
                for i in 0..alloc.chunk_count() {
                    let chunk = &mut landing[..checksum::chunk_range(len as usize, i).len()];
                    frame_io::read_payload(rd, chunk).await?;
                    alloc.fill_chunk(i, chunk);
                }
                match alloc.commit() {
                    CommitOutcome::Stored => PutStatus::Stored,
                    CommitOutcome::AlreadyPresent => PutStatus::AlreadyPresent,
                }
            }
            Err(e) => {
                frame_io::skip_payload(rd, len as u64).await?;
                put_refused(ctx, e)
            }
        };
        statuses.push(status as i32);
    }
    ctx.metrics.bytes_in(Via::Tcp, total);
    send_reply(wr, Op::Put, h.request_id, &PutReply { statuses }).await?;
    Ok(Outcome::Done)
}

pub(crate) async fn get<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
) -> ConnResult<Outcome> {
    let (req, keys) = try_outcome!(keyed(ctx, access, h, control, |r: &GetRequest| &r.keys));
    // Step 1: lease every block (its trailer checked); leases are released when this function
    // returns, including when the peer disconnects while the payload is being written.
    let mut leases = lease_all(&ctx.store, &keys).await;
    // A client that checks each chunk where it lands gets the chunks' checksums, from
    // trailers checked once more here; a block whose trailer fails is a miss (and dropped).
    let mut chunk_sums = Vec::new();
    if req.client_verifies {
        for slot in leases.iter_mut() {
            match slot.as_ref().map(|l| l.chunk_sums()) {
                Some(Ok(sums)) => chunk_sums.extend(sums),
                Some(Err(_)) => *slot = None,
                None => {}
            }
        }
    }
    let lens: Vec<u32> = leases
        .iter()
        .map(|l| l.as_ref().map_or(0, |l| l.len() as u32))
        .collect();
    let total: u64 = lens.iter().map(|&l| l as u64).sum();
    if total > ctx.limits.max_payload as u64 {
        return Ok(Outcome::Refused(format!(
            "the blocks asked for total {total} bytes, over the frame limit of {}: ask for fewer per request",
            ctx.limits.max_payload
        )));
    }
    let hits = leases.iter().filter(|l| l.is_some()).count();
    ctx.metrics.blocks(Op::Get, keys.len(), hits);
    let control = GetReply { lens, chunk_sums }.encode_to_vec();
    let head = FrameHeader::reply(Op::Get, h.request_id, control.len(), total as usize).encode();
    // Step 2: the payload goes from the pool straight to the socket. Unless the client checks
    // it, each chunk is verified just before it is queued (so it is copied from cache; see
    // kvcache_core::checksum). Chunks are gathered into one vectored write per
    // FIRST_FLUSH_BYTES, then per FLUSH_BYTES.
    let mut batch: Vec<&[u8]> = vec![&head, &control];
    let mut batched = 0usize;
    let mut flush_at = FIRST_FLUSH_BYTES;
    for lease in leases.iter().flatten() {
        for i in 0..lease.chunk_count() {
            let chunk = if req.client_verifies {
                Ok(lease.unverified_chunk(i))
            } else {
                lease.verified_chunk(i)
            };
            let Ok(chunk) = chunk else {
                // The reply promised this block's bytes and none may be corrupt: end the
                // connection. The block is gone from the index, so a retry sees a miss.
                return Err(io_err(std::io::Error::other(
                    "stored block failed verification mid-reply",
                )));
            };
            batch.push(chunk);
            batched += chunk.len();
            if batched >= flush_at || batch.len() >= MAX_SLICES {
                frame_io::write_all_vectored(wr, &batch)
                    .await
                    .map_err(io_err)?;
                batch.clear();
                batched = 0;
                flush_at = if req.client_verifies {
                    UNVERIFIED_FLUSH_BYTES
                } else {
                    FLUSH_BYTES
                };
            }
        }
    }
    frame_io::write_all_vectored(wr, &batch)
        .await
        .map_err(io_err)?;
    tokio::io::AsyncWriteExt::flush(wr).await.map_err(io_err)?;
    ctx.metrics.bytes_out(Via::Tcp, total);
    Ok(Outcome::Done)
}

/// Blocks one suspect report gets checked, at most: a get's worth (the connector's batches).
const MAX_SUSPECTS: usize = 64;

/// `Release` on a connection without leases: `suspect` names blocks that failed a
/// `client_verifies` get's check. The node verifies each itself and drops any that fail, as it
/// does for a shared-memory client's release (one-way: nothing is sent back).
pub(crate) fn report_suspects(ctx: &ServiceContext, access: &Access, control: &[u8]) -> Outcome {
    let Ok(req) = ReleaseRequest::decode(control) else {
        return Outcome::Close("undecodable release".into());
    };
    if req.lease_id != 0 {
        return Outcome::Close(format!(
            "release of lease {} on a connection that holds no leases",
            req.lease_id
        ));
    }
    let Ok(suspect) = wire::decode_keys(&req.suspect) else {
        return Outcome::Close("release with a ragged suspect list".into());
    };
    // Each key is checked at most once, and at most MAX_SUSPECTS per report: a report costs the
    // node no more than a get of the same blocks would (audit H4).
    let suspect: std::collections::HashSet<BlockKey> =
        suspect.into_iter().map(|k| access.fold(k)).collect();
    if suspect.len() > MAX_SUSPECTS {
        tracing::debug!(
            reported = suspect.len(),
            checked = MAX_SUSPECTS,
            "a suspect report names more blocks than are checked per report"
        );
    }
    for key in suspect.into_iter().take(MAX_SUSPECTS) {
        // A miss here: gone, or its trailer failed (and it was dropped) just now.
        if let Some(lease) = ctx.store.lease(key) {
            confirm_suspect(ctx, key, &lease);
        }
    }
    Outcome::Done
}

/// What the node is and how to reach its faster byte paths.
pub(crate) fn ping(ctx: &ServiceContext) -> PingReply {
    PingReply {
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: PROTOCOL_VERSION as u32,
        max_payload: ctx.limits.max_payload,
        max_control: ctx.limits.max_control,
        shm_socket: ctx.shm_socket.clone().unwrap_or_default(),
        host_id: ctx.host_id.clone(),
        rdma_device: ctx.rdma_device.clone(),
    }
}

pub(crate) fn exists(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
) -> Result<ExistsReply, Outcome> {
    let (_, keys) = keyed(ctx, access, h, control, |r: &ExistsRequest| &r.keys)?;
    let present: Vec<bool> = may_block(&ctx.store, || {
        keys.iter().map(|&k| ctx.store.holds(k)).collect()
    });
    let hits = present.iter().filter(|p| **p).count();
    ctx.metrics.blocks(Op::Exists, keys.len(), hits);
    Ok(ExistsReply { present })
}

pub(crate) fn prefix_match(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
) -> Result<PrefixMatchReply, Outcome> {
    let (_, keys) = keyed(ctx, access, h, control, |r: &PrefixMatchRequest| &r.keys)?;
    let matched = may_block(&ctx.store, || ctx.store.prefix_match(&keys));
    ctx.metrics.blocks(Op::PrefixMatch, keys.len(), matched);
    Ok(PrefixMatchReply {
        matched: matched as u32,
    })
}

/// One page of the node's keys, in key order; admin tenants only.
pub(crate) fn list_keys(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
) -> Result<ListKeysReply, Outcome> {
    if !access.admin() {
        return Err(Outcome::Denied(
            ErrorCode::Forbidden,
            format!(
                "list_keys needs an admin tenant; tenant {:?} is not one (admin = true in the auth file)",
                access.tenant().unwrap_or_default()
            ),
        ));
    }
    let req: ListKeysRequest = decode(h, control)?;
    let after = match req.after.len() {
        0 => None,
        BlockKey::LEN => BlockKey::from_slice(&req.after),
        n => {
            return Err(Outcome::Refused(format!(
                "list_keys: `after` must be empty or one 16-byte key, got {n} bytes"
            )));
        }
    };
    // A page must fit in a control message.
    let most = ctx.limits.max_control as usize / BlockKey::LEN / 2;
    let limit = (req.limit as usize).clamp(1, most);
    let (keys, more) = ctx.store.keys_after(after, limit);
    Ok(ListKeysReply {
        keys: wire::encode_keys(&keys),
        more,
    })
}
