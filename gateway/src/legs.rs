//! The P/D request path. The pair is chosen jointly: the decode instance first (the one cost:
//! its own cached prefix, the shared tier's credit, its load), then, unless little of the
//! prompt is left to compute there (`pd::bypass`), a prefill instance among the others (its
//! own cached prefix and load), skipped when it is further behind than the decode instance's
//! whole cost of computing the prompt itself (`pd::prefill_pays`). The prefill leg runs to its
//! whole answer (the engine committed the prompt's blocks to the cache before it answers), then
//! the decode leg carries the answer's `kv_transfer_params` and is relayed as any request. A
//! prefill leg that fails sends the request decode-only; a client that goes away drops this
//! future, and with it whichever leg is in flight (the engine sees its connection close and
//! aborts).
//!
//! The legs run one after the other (as vLLM's proxies, Dynamo and llm-d's sidecar do); a
//! parallel style (decode sent at once, waiting on the cache) would replace
//! [`disaggregated`]'s middle and keep its pick and books.

use std::time::Instant;

use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use tracing::{debug, warn};

use crate::dispatch::{self, Pick};
use crate::forward::{Routed, eject, eject_on_server_error, no_backend};
use crate::openai::ApiError;
use crate::pd::{self, Need};
use crate::proxy::{self, SendError};
use crate::state::Gateway;

/// The largest prefill answer read (one token's completion and its transfer parameters).
const MAX_PREFILL_ANSWER: usize = 1 << 20;

/// A dispatch recorded in the pool that nothing has taken over yet: dropped (the leg ended,
/// or the client went away mid-leg), it ends the backend's in-flight count.
struct Booked<'a> {
    gw: &'a Gateway,
    pick: Option<Pick>,
}

impl<'a> Booked<'a> {
    fn new(gw: &'a Gateway, pick: Pick) -> Self {
        Self {
            gw,
            pick: Some(pick),
        }
    }

    fn pick(&self) -> &Pick {
        self.pick.as_ref().expect("taken only by take()")
    }

    /// The pick, for a relay that keeps its books from here on.
    fn take(mut self) -> Pick {
        self.pick.take().expect("taken once")
    }
}

impl Drop for Booked<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pick.take() {
            self.gw
                .pool
                .lock()
                .finished(p.engine, p.cost.compute_blocks as u64);
            self.gw.publish_backend(p.engine);
        }
    }
}

/// Why a prefill leg did not give transfer parameters: the metric's reason, and the detail.
type LegFailure = (&'static str, String);

/// Routes a request over a prefill and a decode instance (or the decode one alone).
pub async fn disaggregated(r: &Routed<'_>, body: Bytes) -> Result<Response, ApiError> {
    let gw = r.gw;
    let decode = dispatch::pick(gw, &r.view, &r.model, r.strategy, &[], Need::Decode)
        .map_err(|no| no_backend(gw, no, &r.model, &[], ""))?;
    gw.metrics.routed(r.routing.elapsed());
    let decode = Booked::new(gw, decode);
    match prefill_first(r, decode.pick(), &body).await {
        Ok((decode_body, prefill_url)) => {
            gw.metrics.pd_request("disaggregated", "");
            let first = Some(decode.take());
            r.forward(Need::Decode, decode_body.into(), first, Some(&prefill_url))
                .await
        }
        Err((path, reason)) => {
            gw.metrics.pd_request(path, reason);
            r.forward(Need::Decode, body, Some(decode.take()), None)
                .await
        }
    }
}

/// Picks the prefill instance for a request whose decode instance is `d`, runs its leg, and
/// gives the decode leg's body and the prefill instance's URL; or why the request goes
/// decode-only: the metric's path (`bypass`, `fallback`) and reason.
async fn prefill_first(
    r: &Routed<'_>,
    d: &Pick,
    body: &Bytes,
) -> Result<(Vec<u8>, String), (&'static str, &'static str)> {
    let gw = r.gw;
    let cached_tokens = (d.cost.local_blocks + d.cost.loaded_blocks) * d.block_size;
    let prompt_tokens = r.view.tokens().map(<[u32]>::len);
    if pd::bypass(&gw.config.pd, prompt_tokens, cached_tokens) {
        debug!(decode = %d.url, ?prompt_tokens, cached_tokens,
            "P/D bypass: little is left to compute on the decode instance");
        return Err(("bypass", "cached"));
    }
    let need = Need::Prefill;
    let prefill = match dispatch::pick(gw, &r.view, &r.model, r.strategy, &[d.engine], need) {
        Ok(p) => Booked::new(gw, p),
        Err(no) => {
            debug!(?no, "P/D bypass: no prefill instance can take the request");
            return Err(("bypass", "no_prefill"));
        }
    };
    let p = prefill.pick();
    let prefill_wait = p.cost.total - p.cost.compute_blocks as f64;
    if !pd::prefill_pays(prefill_wait, d.cost.total) {
        debug!(prefill = %p.url, prefill_wait, decode_cost = d.cost.total,
            "P/D bypass: the prefill instance is further behind than the decode instance's whole cost");
        return Err(("bypass", "busy"));
    }
    let near = gw.shared.as_ref().and_then(|t| t.node_near(&d.url));
    let leg = prefill_leg(r, p, body, near).await;
    match leg.and_then(|params| pd::decode_body(body, params).map_err(|e| ("params", e))) {
        Ok(decode_body) => Ok((decode_body, p.url.clone())),
        Err((reason, why)) => {
            warn!(prefill = %p.url, reason, detail = %why, request_id = r.request_id,
                "P/D prefill leg failed; the decode instance computes the whole prompt");
            Err(("fallback", reason))
        }
    }
}

/// The prefill leg: the request with one unstreamed token and `do_remote_decode`, read to its
/// end; its `kv_transfer_params`. Ejects the prefill instance when it failed as a backend.
async fn prefill_leg(
    r: &Routed<'_>,
    pick: &Pick,
    body: &Bytes,
    near: Option<&str>,
) -> Result<Value, LegFailure> {
    let gw = r.gw;
    let started = Instant::now();
    let leg_body = pd::prefill_body(body, near).map_err(|e| ("params", e))?;
    let id = format!("{}-prefill", r.request_id);
    let timeout = gw.config.pd.prefill_timeout;
    let answer = tokio::time::timeout(timeout, async {
        let response = proxy::send(
            gw,
            pick,
            r.endpoint,
            &Default::default(),
            leg_body.into(),
            &id,
        )
        .await
        .map_err(|e| match e {
            SendError::Connection(why) => {
                eject(gw, pick.engine, &pick.url, &why, true);
                ("connect", why)
            }
            SendError::Timeout => ("timeout", format!("{} sent no answer", pick.url)),
        })?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_PREFILL_ANSWER)
            .collect()
            .await
            .map_err(|e| ("connect", format!("reading {}'s answer: {e}", pick.url)))?
            .to_bytes();
        if !status.is_success() {
            eject_on_server_error(gw, pick, status);
            let head = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            return Err(("status", format!("{} answered {status}: {head}", pick.url)));
        }
        pd::transfer_params(&bytes).map_err(|e| ("params", format!("{}: {e}", pick.url)))
    })
    .await
    .unwrap_or_else(|_| {
        Err((
            "timeout",
            format!("{} did not finish the prefill within {timeout:?}", pick.url),
        ))
    });
    gw.metrics.pd_prefill(&pick.url, started.elapsed());
    answer
}
