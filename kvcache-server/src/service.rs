//! The framed data plane: one task per connection, one request at a time per connection. TCP
//! connections start here; Unix-socket (shared-memory) connections attach in `crate::shm` and
//! then run the same loop, with the shared-memory ops enabled.
//!
//! Bad input never costs other clients anything and never loses stored data: a request whose
//! control message makes no sense gets an `ErrorReply` and the connection goes on (the frame
//! header still says where the next frame starts); a header that cannot be trusted (bad magic,
//! version, op, or a size over the limits) gets an `ErrorReply` and the connection is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvcache_core::BlockKey;
use kvcache_core::wire::{
    self, ErrorCode, ErrorReply, ExistsReply, ExistsRequest, FrameError, FrameHeader, FrameLimits,
    GetReply, GetRequest, HelloReply, HelloRequest, ListKeysReply, ListKeysRequest, Op,
    PROTOCOL_VERSION, PingReply, PrefixMatchReply, PrefixMatchRequest, PutReply, PutRequest,
    PutStatus,
};
use kvcache_transport::tcp::{self, FrameReadError};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::auth::{Access, Auth};
use crate::metrics::{Metrics, ProtocolError, PutRejection, Transport};
use crate::shm::{self, ShmSession};
use crate::store::{AllocError, CommitOutcome, Lease, Store, checksum};

/// Verified get payload gathered per vectored write: small enough to be copied from L2 after
/// verification, large enough to amortise the syscall. Measured against 128 KiB and whole-reply
/// writes (benches/results/README.md); 512 KiB was best by a few percent.
const FLUSH_BYTES: usize = 4 * checksum::CHUNK;

/// What every connection needs.
pub struct ServiceContext {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub limits: FrameLimits,
    /// Longest a request may take once its header has arrived.
    pub request_timeout: Duration,
    /// Longest a connection may wait for its next request's header (idle or half-open peers).
    pub idle_timeout: Duration,
    /// Most keys one request may name; checked before any lookup.
    pub max_keys: usize,
    /// Most bytes of blocks one shared-memory or RDMA connection may hold leased.
    pub max_leased_bytes: u64,
    /// Who may use the data plane.
    pub auth: Arc<Auth>,
    /// The shared-memory socket's path, advertised by `Ping`; `None` when shared memory is off.
    pub shm_socket: Option<String>,
    /// This host's identity, advertised by `Ping` (see `kvcache_transport::shm::host_id`).
    pub host_id: String,
    /// RDMA for clients on other hosts, or why not.
    pub rdma: crate::rdma::RdmaState,
}

/// True at most once per second: events a network peer can trigger at will (bad frames,
/// stalls, refused connections) must not be able to flood the log. Metrics count every one.
pub(crate) fn warn_allowed() -> bool {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.swap(now, Ordering::Relaxed) != now
}

/// Whether the connection goes on after a request.
pub(crate) enum Flow {
    Continue,
    Close,
}

/// A failure that ends the connection (the peer went away or the stream is unusable).
type ConnResult<T> = Result<T, FrameReadError>;

fn io_err(e: std::io::Error) -> FrameReadError {
    FrameReadError::Io(e)
}

/// Serves one TCP data connection until the peer closes it, it misbehaves, or shutdown begins.
pub async fn serve_connection(
    ctx: Arc<ServiceContext>,
    mut stream: TcpStream,
    peer: &str,
    shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = tcp::tune(&stream) {
        tracing::debug!(%peer, error = %e, "could not tune socket");
    }
    let access = ctx.auth.initial();
    let (rd, wr) = stream.split();
    serve_stream(&ctx, rd, wr, peer, shutdown, None, access).await;
}

/// The request loop of one connection; `session` enables the shared-memory ops (an RDMA
/// connection gets one from its `RdmaConnect`), `access` says who the peer is so far.
pub(crate) async fn serve_stream<R, W>(
    ctx: &Arc<ServiceContext>,
    mut rd: R,
    mut wr: W,
    peer: &str,
    mut shutdown: watch::Receiver<bool>,
    mut session: Option<Arc<ShmSession>>,
    mut access: Access,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    ctx.metrics.connection_opened();
    loop {
        let header = tokio::select! {
            h = tokio::time::timeout(ctx.idle_timeout, tcp::read_header(&mut rd, &ctx.limits)) => h,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Ok(header) = header else {
            // Idle (or half-open, or trickling a header) past --idle-timeout: the slot goes
            // back to clients that use it. Pooled clients reconnect on their next call.
            ctx.metrics.connection_idled_out();
            tracing::debug!(%peer, timeout = ?ctx.idle_timeout, "closing idle connection");
            break;
        };
        let flow = match header {
            Ok(h) => match tokio::time::timeout(
                ctx.request_timeout,
                handle_request(ctx, h, &mut rd, &mut wr, &mut session, &mut access),
            )
            .await
            {
                Ok(Ok(flow)) => flow,
                Err(_) => {
                    // A stalled client must not pin an allocation or leases: dropping the
                    // request future here releases both.
                    ctx.metrics.request_timed_out();
                    if warn_allowed() {
                        tracing::warn!(%peer, op = h.op.name(), timeout = ?ctx.request_timeout, "request stalled; closing connection");
                    }
                    Flow::Close
                }
                Ok(Err(e)) => {
                    if matches!(e, FrameReadError::Truncated) {
                        ctx.metrics.protocol_error(ProtocolError::Truncated);
                    }
                    tracing::debug!(%peer, error = %e, "connection ended mid-request");
                    Flow::Close
                }
            },
            Err(FrameReadError::Closed) => Flow::Close,
            Err(FrameReadError::Truncated) => {
                ctx.metrics.protocol_error(ProtocolError::Truncated);
                tracing::debug!(%peer, "connection closed mid-header");
                Flow::Close
            }
            Err(FrameReadError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "read failed");
                Flow::Close
            }
            Err(FrameReadError::Frame(e)) => {
                ctx.metrics.protocol_error(match e {
                    FrameError::BadMagic(_) => ProtocolError::BadMagic,
                    FrameError::UnsupportedVersion { .. } => ProtocolError::BadVersion,
                    FrameError::UnknownOp(_) => ProtocolError::UnknownOp,
                    FrameError::ControlTooLarge { .. } => ProtocolError::ControlTooLarge,
                    FrameError::PayloadTooLarge { .. } => ProtocolError::PayloadTooLarge,
                });
                if warn_allowed() {
                    tracing::warn!(%peer, error = %e, "rejected frame; closing connection (further rejections this second are logged at debug; all are counted in kvcache_protocol_errors_total)");
                } else {
                    tracing::debug!(%peer, error = %e, "rejected frame; closing connection");
                }
                let code = match e {
                    FrameError::ControlTooLarge { .. } | FrameError::PayloadTooLarge { .. } => {
                        ErrorCode::TooLarge
                    }
                    _ => ErrorCode::Malformed,
                };
                let _ = send_error(&mut wr, 0, code, &e.to_string()).await;
                Flow::Close
            }
        };
        if let Flow::Close = flow {
            break;
        }
    }
    ctx.metrics.connection_closed();
}

pub(crate) async fn send_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    request_id: u32,
    code: ErrorCode,
    message: &str,
) -> std::io::Result<()> {
    let control = ErrorReply {
        code: code as i32,
        message: message.to_string(),
    }
    .encode_to_vec();
    tcp::write_frame(
        w,
        &FrameHeader::reply(Op::Error, request_id, control.len(), 0),
        &control,
        &[],
    )
    .await
}

pub(crate) async fn send_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    op: Op,
    request_id: u32,
    msg: &impl Message,
) -> ConnResult<()> {
    let control = msg.encode_to_vec();
    tcp::write_frame(
        w,
        &FrameHeader::reply(op, request_id, control.len(), 0),
        &control,
        &[],
    )
    .await
    .map_err(io_err)
}

/// A request the server refuses as a whole: reply with an error, skip its payload, go on.
async fn refuse<R, W>(
    ctx: &ServiceContext,
    h: &FrameHeader,
    rd: &mut R,
    wr: &mut W,
    code: ErrorCode,
    message: String,
) -> ConnResult<Flow>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    ctx.metrics.protocol_error(match code {
        ErrorCode::LimitExceeded => ProtocolError::OverLimit,
        ErrorCode::Forbidden => ProtocolError::Forbidden,
        _ => ProtocolError::Malformed,
    });
    tracing::debug!(op = h.op.name(), %message, "refused request");
    tcp::skip_payload(rd, h.payload_len as u64).await?;
    send_error(wr, h.request_id, code, &message)
        .await
        .map_err(io_err)?;
    Ok(Flow::Continue)
}

/// What an unauthenticated peer is told before the node closes the connection.
pub(crate) const NEEDS_TOKEN: &str = "this node requires authentication (kvcache-server --auth): \
    the first request on a connection must be hello with a tenant's token; set \
    ClientConfig::token, kvcache.Client(token=...) or KVCACHE_TOKEN";

/// Refuses a peer that has not authenticated (or whose token was removed) and ends the
/// connection.
pub(crate) async fn refuse_unauthenticated<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    wr: &mut W,
    request_id: u32,
    message: &str,
) -> Flow {
    ctx.metrics.protocol_error(ProtocolError::Unauthenticated);
    if warn_allowed() {
        tracing::warn!(%message, "refused an unauthenticated connection (further refusals this second are logged at debug; all are counted in kvcache_protocol_errors_total{{kind=\"unauthenticated\"}})");
    } else {
        tracing::debug!(%message, "refused an unauthenticated connection");
    }
    let _ = send_error(wr, request_id, ErrorCode::Unauthenticated, message).await;
    Flow::Close
}

/// `Hello`: checks the token and answers whom the connection now acts as. An unknown token
/// ends the connection.
pub(crate) async fn hello<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
    access: &mut Access,
) -> ConnResult<Flow> {
    let granted = match HelloRequest::decode(control) {
        Ok(req) if h.payload_len == 0 => ctx.auth.grant(&req.token),
        _ => None,
    };
    let Some(granted) = granted else {
        return Ok(refuse_unauthenticated(
            ctx,
            wr,
            h.request_id,
            "hello refused: the node does not know this token (kvcache-server --auth lists the tenants' tokens)",
        )
        .await);
    };
    *access = granted;
    let reply = HelloReply {
        auth: ctx.auth.required(),
        tenant: access.tenant().unwrap_or_default().to_string(),
        admin: access.admin(),
    };
    send_reply(wr, Op::Hello, h.request_id, &reply).await?;
    Ok(Flow::Continue)
}

async fn handle_request<R, W>(
    ctx: &Arc<ServiceContext>,
    h: FrameHeader,
    rd: &mut R,
    wr: &mut W,
    session: &mut Option<Arc<ShmSession>>,
    access: &mut Access,
) -> ConnResult<Flow>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !access.authenticated() && h.op != Op::Hello {
        return Ok(refuse_unauthenticated(ctx, wr, h.request_id, NEEDS_TOKEN).await);
    }
    if !ctx.auth.recheck(access) {
        return Ok(refuse_unauthenticated(
            ctx,
            wr,
            h.request_id,
            "this connection's token was removed from the node's auth file; reconnect with a current one",
        )
        .await);
    }
    if h.reply || h.op == Op::Error {
        ctx.metrics.protocol_error(ProtocolError::UnexpectedReply);
        let _ = send_error(
            wr,
            h.request_id,
            ErrorCode::Malformed,
            "clients send requests, not replies",
        )
        .await;
        return Ok(Flow::Close);
    }
    let control = tcp::read_control(rd, h.control_len).await?;
    if h.op == Op::Hello {
        return hello(ctx, &h, &control, wr, access).await;
    }
    let started = Instant::now();
    let access = &*access;
    let result = match h.op {
        Op::Put => handle_put(ctx, access, &h, &control, rd, wr).await,
        // Only puts carry a payload.
        _ if h.payload_len != 0 => Ok(Outcome::Refused(format!(
            "{} requests carry no payload",
            h.op.name()
        ))),
        Op::Get => handle_get(ctx, access, &h, &control, wr).await,
        Op::Exists | Op::PrefixMatch | Op::Ping | Op::ListKeys => {
            handle_lookup(ctx, access, &h, &control, wr).await
        }
        Op::ShmGet | Op::ShmPut | Op::ShmRelease => match session {
            Some(session) => shm::handle(ctx, access, session, &h, &control, wr).await,
            None => Ok(Outcome::Refused(format!(
                "{} is served only on the node's shared-memory socket or after rdma_connect",
                h.op.name()
            ))),
        },
        Op::RdmaConnect => crate::rdma::connect(ctx, &h, &control, wr, session).await,
        Op::ShmAttach => Ok(Outcome::Refused(
            "shm_attach must be the first request on the shared-memory socket".into(),
        )),
        Op::Error | Op::Hello => unreachable!("handled above"),
    };
    let ok = matches!(result, Ok(Outcome::Done));
    ctx.metrics.op(h.op, ok, started.elapsed());
    match result {
        Ok(Outcome::Done) => Ok(Flow::Continue),
        Ok(Outcome::Refused(message)) => {
            refuse(ctx, &h, rd, wr, ErrorCode::Malformed, message).await
        }
        Ok(Outcome::Denied(code, message)) => refuse(ctx, &h, rd, wr, code, message).await,
        Ok(Outcome::Close(message)) => {
            ctx.metrics.protocol_error(ProtocolError::Malformed);
            tracing::debug!(op = h.op.name(), %message, "closing connection");
            Ok(Flow::Close)
        }
        Err(e) => Err(e),
    }
}

/// How a request ended, short of losing the connection.
pub(crate) enum Outcome {
    Done,
    /// Refused before its payload was read; the message says why.
    Refused(String),
    /// Refused as `Refused`, for a reason other than a malformed request (a limit, a
    /// permission).
    Denied(ErrorCode, String),
    /// A one-way request that made no sense: there is no reply to carry an error, so the
    /// connection is closed.
    Close(String),
}

pub(crate) fn decode<M: Message + Default>(h: &FrameHeader, control: &[u8]) -> Result<M, Outcome> {
    M::decode(control)
        .map_err(|e| Outcome::Refused(format!("undecodable {} request: {e}", h.op.name())))
}

/// The keys a request names, each in the connection's key space, refused before any work when
/// there are more than `--max-keys-per-request`.
pub(crate) fn keys_of(
    ctx: &ServiceContext,
    access: &Access,
    bytes: &[u8],
) -> Result<Vec<BlockKey>, Outcome> {
    let n = bytes.len() / BlockKey::LEN;
    if n > ctx.max_keys {
        return Err(Outcome::Denied(
            ErrorCode::LimitExceeded,
            format!(
                "the request names {n} keys, over this node's --max-keys-per-request of {}: split it",
                ctx.max_keys
            ),
        ));
    }
    let mut keys = wire::decode_keys(bytes).map_err(|e| Outcome::Refused(e.to_string()))?;
    for k in &mut keys {
        *k = access.fold(*k);
    }
    Ok(keys)
}

macro_rules! try_outcome {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(outcome) => return Ok(outcome),
        }
    };
}
pub(crate) use try_outcome;

async fn handle_put<R, W>(
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
    let req: PutRequest = try_outcome!(decode(h, control));
    let keys = try_outcome!(keys_of(ctx, access, &req.keys));
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
    for (&key, &len) in keys.iter().zip(&req.lens) {
        let status = match may_block(&ctx.store, || ctx.store.allocate(key, len as usize)) {
            Ok(mut alloc) => {
                // Step 2: the payload lands directly in the pool, checksummed chunk by chunk
                // while in cache. If the peer dies here, the allocation is dropped uncommitted
                // and its pages return to the pool.
                for i in 0..alloc.chunk_count() {
                    tcp::read_payload(rd, alloc.chunk_mut(i)).await?;
                    alloc.seal_chunk(i);
                }
                match alloc.commit() {
                    CommitOutcome::Stored => PutStatus::Stored,
                    CommitOutcome::AlreadyPresent => PutStatus::AlreadyPresent,
                }
            }
            Err(e) => {
                tcp::skip_payload(rd, len as u64).await?;
                put_refused(ctx, e)
            }
        };
        statuses.push(status as i32);
    }
    ctx.metrics.bytes_in(Transport::Tcp, total);
    send_reply(wr, Op::Put, h.request_id, &PutReply { statuses }).await?;
    Ok(Outcome::Done)
}

/// Runs store work that may wait on a lower tier (an eviction that hands blocks down to a full
/// disk queue, RocksDB lookups) without stalling the other connections served by this worker
/// thread. Without a lower tier the store never blocks and `f` runs inline.
pub(crate) fn may_block<T>(store: &Store, f: impl FnOnce() -> T) -> T {
    if store.has_lower() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// The status of a block that could not be allocated, counted in the metrics.
pub(crate) fn put_refused(ctx: &ServiceContext, e: AllocError) -> PutStatus {
    let (status, why) = match e {
        AllocError::AlreadyPresent => return PutStatus::AlreadyPresent,
        AllocError::TooLarge { .. } => (PutStatus::TooLarge, PutRejection::TooLarge),
        AllocError::PoolFull => (PutStatus::PoolFull, PutRejection::PoolFull),
        AllocError::Empty => (PutStatus::Empty, PutRejection::Empty),
    };
    ctx.metrics.put_rejected(why);
    status
}

/// Leases every key's block, in order (`None` for a miss). Keys memory misses are brought up
/// from the disk tier, if there is one, on a blocking thread.
pub(crate) async fn lease_all(store: &Arc<Store>, keys: &[BlockKey]) -> Vec<Option<Lease>> {
    let mut leases: Vec<Option<Lease>> = keys.iter().map(|&k| store.lease(k)).collect();
    if !store.has_lower() {
        return leases;
    }
    let missed: Vec<(usize, BlockKey)> = leases
        .iter()
        .zip(keys)
        .enumerate()
        .filter(|(_, (l, _))| l.is_none())
        .map(|(i, (_, &k))| (i, k))
        .collect();
    if missed.is_empty() {
        return leases;
    }
    let store = Arc::clone(store);
    let promoted = tokio::task::spawn_blocking(move || {
        missed
            .into_iter()
            .map(|(i, k)| (i, store.lease_or_promote(k)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (i, lease) in promoted {
        leases[i] = lease;
    }
    leases
}

async fn handle_get<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
) -> ConnResult<Outcome> {
    let req: GetRequest = try_outcome!(decode(h, control));
    let keys = try_outcome!(keys_of(ctx, access, &req.keys));
    // Step 1: lease (and verify) every block; leases are released when this function returns,
    // including when the peer disconnects while the payload is being written.
    let leases = lease_all(&ctx.store, &keys).await;
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
    let control = GetReply { lens }.encode_to_vec();
    let head = FrameHeader::reply(Op::Get, h.request_id, control.len(), total as usize).encode();
    // Step 2: the payload goes from the pool straight to the socket, each chunk verified just
    // before it is queued (so it is copied from cache; see store/checksum.rs). Verified chunks
    // are gathered into one vectored write per FLUSH_BYTES.
    let mut batch: Vec<&[u8]> = vec![&head, &control];
    let mut batched = 0usize;
    for lease in leases.iter().flatten() {
        for i in 0..lease.chunk_count() {
            let Ok(chunk) = lease.verified_chunk(i) else {
                // The reply promised this block's bytes and none may be corrupt: end the
                // connection. The block is gone from the index, so a retry sees a miss.
                return Err(io_err(std::io::Error::other(
                    "stored block failed verification mid-reply",
                )));
            };
            batch.push(chunk);
            batched += chunk.len();
            if batched >= FLUSH_BYTES || batch.len() >= 64 {
                tcp::write_all_vectored(wr, &batch).await.map_err(io_err)?;
                batch.clear();
                batched = 0;
            }
        }
    }
    tcp::write_all_vectored(wr, &batch).await.map_err(io_err)?;
    tokio::io::AsyncWriteExt::flush(wr).await.map_err(io_err)?;
    ctx.metrics.bytes_out(Transport::Tcp, total);
    Ok(Outcome::Done)
}

async fn handle_lookup<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
) -> ConnResult<Outcome> {
    match h.op {
        Op::Ping => {
            let reply = PingReply {
                server_version: env!("CARGO_PKG_VERSION").to_string(),
                protocol_version: PROTOCOL_VERSION as u32,
                max_payload: ctx.limits.max_payload,
                max_control: ctx.limits.max_control,
                shm_socket: ctx.shm_socket.clone().unwrap_or_default(),
                host_id: ctx.host_id.clone(),
                rdma_device: ctx.rdma.device_name().unwrap_or_default().to_string(),
            };
            send_reply(wr, Op::Ping, h.request_id, &reply).await?;
        }
        Op::Exists => {
            let req: ExistsRequest = try_outcome!(decode(h, control));
            let keys = try_outcome!(keys_of(ctx, access, &req.keys));
            let present: Vec<bool> = may_block(&ctx.store, || {
                keys.iter().map(|&k| ctx.store.holds(k)).collect()
            });
            ctx.metrics.blocks(
                Op::Exists,
                keys.len(),
                present.iter().filter(|p| **p).count(),
            );
            send_reply(wr, Op::Exists, h.request_id, &ExistsReply { present }).await?;
        }
        Op::PrefixMatch => {
            let req: PrefixMatchRequest = try_outcome!(decode(h, control));
            let keys = try_outcome!(keys_of(ctx, access, &req.keys));
            let matched = may_block(&ctx.store, || ctx.store.prefix_match(&keys));
            ctx.metrics.blocks(Op::PrefixMatch, keys.len(), matched);
            send_reply(
                wr,
                Op::PrefixMatch,
                h.request_id,
                &PrefixMatchReply {
                    matched: matched as u32,
                },
            )
            .await?;
        }
        Op::ListKeys => {
            if !access.admin() {
                return Ok(Outcome::Denied(
                    ErrorCode::Forbidden,
                    format!(
                        "list_keys needs an admin tenant; tenant {:?} is not one (admin = true in the auth file)",
                        access.tenant().unwrap_or_default()
                    ),
                ));
            }
            let req: ListKeysRequest = try_outcome!(decode(h, control));
            let after = match req.after.len() {
                0 => None,
                BlockKey::LEN => BlockKey::from_slice(&req.after),
                n => {
                    return Ok(Outcome::Refused(format!(
                        "list_keys: `after` must be empty or one 16-byte key, got {n} bytes"
                    )));
                }
            };
            // A page must fit in a control message.
            let most = ctx.limits.max_control as usize / BlockKey::LEN / 2;
            let limit = (req.limit as usize).clamp(1, most);
            let (keys, more) = ctx.store.keys_after(after, limit);
            let reply = ListKeysReply {
                keys: wire::encode_keys(&keys),
                more,
            };
            send_reply(wr, Op::ListKeys, h.request_id, &reply).await?;
        }
        _ => unreachable!("dispatched by op"),
    }
    Ok(Outcome::Done)
}
