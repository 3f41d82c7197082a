//! `Hello`: a connection presents a tenant's token before anything else when the node runs
//! with `--auth`; without it, the node answers that no token is needed.

use kvcache_core::wire::{ErrorCode, FrameHeader, HelloReply, HelloRequest, Op};
use prost::Message;
use tokio::io::AsyncWrite;

use crate::auth::Access;
use crate::dataplane::request::{
    ConnResult, Flow, ServiceContext, send_error, send_reply, warn_allowed,
};
use crate::metrics::ProtocolError;

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

/// Checks the token and answers whom the connection now acts as. An unknown token ends the
/// connection.
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
