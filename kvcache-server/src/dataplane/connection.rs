//! The request loop: one task per connection, one request at a time per connection. It reads
//! a frame header, checks who the peer is, routes the request to its handler by op, times it,
//! writes the handler's reply or refusal, and closes the connection when the stream cannot be
//! trusted. TCP connections start here; shared-memory connections attach in
//! [`unix`](crate::dataplane::unix) and then run the same loop with their [`Session`].
//!
//! Bad input never costs other clients anything and never loses stored data: a request whose
//! control message makes no sense gets an `ErrorReply` and the connection goes on (the frame
//! header still says where the next frame starts); a header that cannot be trusted (bad magic,
//! version, op, or a size over the limits) gets an `ErrorReply` and the connection is closed.

use std::sync::Arc;
use std::time::Instant;

use kvcache_core::wire::{ErrorCode, FrameError, FrameHeader, Op};
use kvcache_transport::frame_io::{self, FrameReadError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::auth::Access;
use crate::dataplane::hello::{NEEDS_TOKEN, hello, refuse_unauthenticated};
use crate::dataplane::inline;
use crate::dataplane::request::{
    ConnResult, Flow, Outcome, ServiceContext, answer, io_err, send_error, warn_allowed,
};
use crate::dataplane::session::{self, Session, UpgradePath};
use crate::metrics::ProtocolError;

/// What the loop serves with: the context every handler takes, and the byte path a TCP
/// connection may upgrade to.
pub struct DataPlane {
    pub ctx: Arc<ServiceContext>,
    pub upgrade: UpgradePath,
}

/// Serves one TCP data connection until the peer closes it, it misbehaves, or shutdown begins.
pub async fn serve_connection(
    plane: Arc<DataPlane>,
    mut stream: TcpStream,
    peer: &str,
    shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = frame_io::tune(&stream) {
        tracing::debug!(%peer, error = %e, "could not tune socket");
    }
    let access = plane.ctx.auth.initial();
    let (rd, wr) = stream.split();
    serve_stream(&plane, rd, wr, peer, shutdown, None, access).await;
}

/// The request loop of one connection; `session` enables the lease-get, staged-put and
/// release ops (a TCP connection gets one from an upgrade), `access` says who the peer is so
/// far.
pub(crate) async fn serve_stream<R, W>(
    plane: &DataPlane,
    mut rd: R,
    mut wr: W,
    peer: &str,
    mut shutdown: watch::Receiver<bool>,
    mut session: Option<Arc<Session>>,
    mut access: Access,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ctx = &plane.ctx;
    ctx.metrics.connection_opened();
    loop {
        let header = tokio::select! {
            h = tokio::time::timeout(ctx.idle_timeout, frame_io::read_header(&mut rd, &ctx.limits)) => h,
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
                handle_request(plane, h, &mut rd, &mut wr, &mut session, &mut access),
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
            Err(e) => rejected_header(ctx, &mut wr, peer, e).await,
        };
        if let Flow::Close = flow {
            break;
        }
    }
    ctx.metrics.connection_closed();
}

/// A header that could not be read or trusted: counted, answered when it was a bad frame, and
/// the end of the connection.
async fn rejected_header<W: AsyncWrite + Unpin>(
    ctx: &ServiceContext,
    wr: &mut W,
    peer: &str,
    error: FrameReadError,
) -> Flow {
    match error {
        FrameReadError::Closed => {}
        FrameReadError::Truncated => {
            ctx.metrics.protocol_error(ProtocolError::Truncated);
            tracing::debug!(%peer, "connection closed mid-header");
        }
        FrameReadError::Io(e) => tracing::debug!(%peer, error = %e, "read failed"),
        FrameReadError::Frame(e) => {
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
            let _ = send_error(wr, 0, code, &e.to_string()).await;
        }
    }
    Flow::Close
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
    frame_io::skip_payload(rd, h.payload_len as u64).await?;
    send_error(wr, h.request_id, code, &message)
        .await
        .map_err(io_err)?;
    Ok(Flow::Continue)
}

async fn handle_request<R, W>(
    plane: &DataPlane,
    h: FrameHeader,
    rd: &mut R,
    wr: &mut W,
    session: &mut Option<Arc<Session>>,
    access: &mut Access,
) -> ConnResult<Flow>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ctx = &plane.ctx;
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
    let control = frame_io::read_control(rd, h.control_len).await?;
    if h.op == Op::Hello {
        return hello(ctx, &h, &control, wr, access).await;
    }
    let started = Instant::now();
    let access = &*access;
    let result = match (h.op, session.as_deref()) {
        (Op::Put, _) => inline::put(ctx, access, &h, &control, rd, wr).await,
        // Only puts carry a payload.
        _ if h.payload_len != 0 => Ok(Outcome::Refused(format!(
            "{} requests carry no payload",
            h.op.name()
        ))),
        (Op::Get, _) => inline::get(ctx, access, &h, &control, wr).await,
        (Op::Ping, _) => answer(wr, &h, Ok(inline::ping(ctx))).await,
        (Op::Exists, _) => answer(wr, &h, inline::exists(ctx, access, &h, &control)).await,
        (Op::PrefixMatch, _) => {
            answer(wr, &h, inline::prefix_match(ctx, access, &h, &control)).await
        }
        (Op::ListKeys, _) => answer(wr, &h, inline::list_keys(ctx, access, &h, &control)).await,
        (Op::LeaseGet, Some(s)) => {
            let reply = session::lease_get(ctx, access, s, &h, &control).await;
            answer(wr, &h, reply).await
        }
        (Op::StagedPut, Some(s)) => {
            answer(wr, &h, session::staged_put(ctx, access, s, &h, &control)).await
        }
        (Op::Release, Some(s)) => Ok(session::release(ctx, access, s, &control)),
        (Op::Release, None) => Ok(inline::report_suspects(ctx, access, &control)),
        (Op::LeaseGet | Op::StagedPut, None) => Ok(Outcome::Refused(format!(
            "{} is served only on the node's shared-memory socket or after rdma_connect",
            h.op.name()
        ))),
        (Op::RdmaConnect, _) => {
            session::upgrade(ctx, &plane.upgrade, &h, &control, wr, session).await
        }
        (Op::ShmAttach, _) => Ok(Outcome::Refused(
            "shm_attach must be the first request on the shared-memory socket".into(),
        )),
        (Op::Error | Op::Hello, _) => unreachable!("handled above"),
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
