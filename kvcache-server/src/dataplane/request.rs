//! What every handler of the data plane takes and gives back: the connection's shared context,
//! how a request ends ([`Outcome`]), the first steps of every handler (decode the control
//! message, take its keys within the limits) and the replies written to the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvcache_core::BlockKey;
use kvcache_core::wire::{self, ErrorCode, ErrorReply, FrameHeader, FrameLimits, Op};
use kvcache_transport::frame_io::{self, FrameReadError};
use prost::Message;
use tokio::io::AsyncWrite;

use crate::auth::{Access, Auth};
use crate::dataplane::landing::LandingBuffers;
use crate::metrics::Metrics;
use kvcache_store::Store;

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
    /// The RDMA device clients may connect through, advertised by `Ping`; empty without one.
    pub rdma_device: String,
    /// Where TCP puts' payloads land before they are copied into the pool.
    pub landing: LandingBuffers,
}

/// True at most once per second: events a network peer can trigger at will (bad frames,
/// stalls, refused connections) must not be able to flood the log. Metrics count every one.
pub fn warn_allowed() -> bool {
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
pub(crate) type ConnResult<T> = Result<T, FrameReadError>;

pub(crate) fn io_err(e: std::io::Error) -> FrameReadError {
    FrameReadError::Io(e)
}

/// How a request ended, short of losing the connection.
pub enum Outcome {
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

/// Returns the `Err` of a handler's step as the request's [`Outcome`].
macro_rules! try_outcome {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(outcome) => return Ok(outcome),
        }
    };
}
pub(crate) use try_outcome;

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

/// A request's decoded control message and its keys, the first step of every handler that
/// names blocks.
pub(crate) fn keyed<M: Message + Default>(
    ctx: &ServiceContext,
    access: &Access,
    h: &FrameHeader,
    control: &[u8],
    keys: impl Fn(&M) -> &[u8],
) -> Result<(M, Vec<BlockKey>), Outcome> {
    let req: M = decode(h, control)?;
    let keys = keys_of(ctx, access, keys(&req))?;
    Ok((req, keys))
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
    frame_io::write_frame(
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
    send_control(w, op, request_id, &msg.encode_to_vec()).await
}

/// Sends a reply whose control message is already encoded.
pub(crate) async fn send_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    op: Op,
    request_id: u32,
    control: &[u8],
) -> ConnResult<()> {
    frame_io::write_frame(
        w,
        &FrameHeader::reply(op, request_id, control.len(), 0),
        control,
        &[],
    )
    .await
    .map_err(io_err)
}

/// Sends a handler's reply, or hands its refusal back to the loop.
pub(crate) async fn answer<W: AsyncWrite + Unpin>(
    w: &mut W,
    h: &FrameHeader,
    handled: Result<impl Message, Outcome>,
) -> ConnResult<Outcome> {
    match handled {
        Ok(reply) => {
            send_reply(w, h.op, h.request_id, &reply).await?;
            Ok(Outcome::Done)
        }
        Err(outcome) => Ok(outcome),
    }
}
