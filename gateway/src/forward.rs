//! Sending a checked request: pick a backend, send, retry on another backend while nothing was
//! received (connect errors, 502-504), eject the ones that failed, and relay the answer. Whole
//! requests and P/D decode legs both go through [`Routed::forward`].

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use tracing::warn;

use crate::dispatch::{self, Pick, PromptView};
use crate::index::EngineId;
use crate::openai::{ApiError, Endpoint};
use crate::pd::Need;
use crate::pool::NoBackend;
use crate::proxy::{self, SendError};
use crate::route::Strategy;
use crate::state::Gateway;

/// The header that names the prefill instance of a disaggregated request.
pub const PREFILL_HEADER: &str = "x-kvcache-prefill";

/// A request that passed the checks, with what routing knows of its prompt.
pub struct Routed<'a> {
    pub gw: &'a Arc<Gateway>,
    pub endpoint: Endpoint,
    pub strategy: Strategy,
    pub view: PromptView,
    pub model: String,
    pub headers: HeaderMap,
    pub request_id: &'a str,
    pub arrived: Instant,
    /// When routing began (the gateway's own time ends at the first dispatch).
    pub routing: Instant,
}

impl Routed<'_> {
    /// Picks a backend that takes `need` (or starts with `first`, already picked), sends
    /// `body`, retries elsewhere while nothing was received, and relays the answer.
    /// `prefill` names the instance that prefilled it (P/D), for the response's header.
    pub async fn forward(
        &self,
        need: Need,
        body: Bytes,
        mut first: Option<Pick>,
        prefill: Option<&str>,
    ) -> Result<Response, ApiError> {
        let gw = self.gw;
        let mut tried: Vec<EngineId> = Vec::new();
        let mut last_failure = String::new();
        // The gateway's own time ends at its first pick; a caller that picked did the count.
        let count_routing = first.is_none();
        loop {
            let pick = match first.take() {
                Some(p) => p,
                None => {
                    match dispatch::pick(gw, &self.view, &self.model, self.strategy, &tried, need) {
                        Ok(p) => p,
                        Err(no) => {
                            return Err(no_backend(gw, no, &self.model, &tried, &last_failure));
                        }
                    }
                }
            };
            if tried.is_empty() && count_routing {
                gw.metrics.routed(self.routing.elapsed());
            }
            let dispatched = Instant::now();
            let sent = proxy::send(
                gw,
                &pick,
                self.endpoint,
                &self.headers,
                body.clone(),
                self.request_id,
            )
            .await;
            match sent {
                Ok(upstream) => {
                    let status = upstream.status();
                    let retry = status.is_server_error()
                        && matches!(status.as_u16(), 502..=504)
                        && tried.len() + 1 < gw.config.max_attempts;
                    eject_on_server_error(gw, &pick, status);
                    if retry {
                        finish_failed(gw, &pick, self.strategy, status.as_u16(), self.arrived);
                        last_failure = format!("{} answered {status}", pick.url);
                        tried.push(pick.engine);
                        gw.metrics.retries.inc();
                        continue;
                    }
                    let mut response = proxy::relay(
                        gw.clone(),
                        &pick,
                        self.strategy.name(),
                        upstream,
                        self.request_id,
                        self.arrived,
                        dispatched,
                    );
                    if let Some(v) = prefill.and_then(|p| HeaderValue::from_str(p).ok()) {
                        response.headers_mut().insert(PREFILL_HEADER, v);
                    }
                    return Ok(response);
                }
                Err(SendError::Timeout) => {
                    finish_failed(gw, &pick, self.strategy, 504, self.arrived);
                    return Err(ApiError::timeout(format!(
                        "{} did not answer within {:?}",
                        pick.url, gw.config.request_timeout
                    )));
                }
                Err(SendError::Connection(why)) => {
                    finish_failed(gw, &pick, self.strategy, 502, self.arrived);
                    eject(gw, pick.engine, &pick.url, &why, true);
                    last_failure = format!("{}: {why}", pick.url);
                    tried.push(pick.engine);
                    if tried.len() >= gw.config.max_attempts {
                        return Err(ApiError::bad_gateway(format!(
                            "every backend tried failed before answering; last: {last_failure}"
                        )));
                    }
                    gw.metrics.retries.inc();
                }
            }
        }
    }
}

/// Counts a failed attempt on `pick` (its books: in flight, pending blocks, the request metric).
fn finish_failed(gw: &Gateway, pick: &Pick, strategy: Strategy, status: u16, arrived: Instant) {
    gw.pool
        .lock()
        .finished(pick.engine, pick.cost.compute_blocks as u64);
    gw.metrics
        .request(&pick.url, strategy.name(), status, arrived.elapsed());
    gw.publish_backend(pick.engine);
}

/// Sits `pick`'s backend out when it answered a 5xx.
pub fn eject_on_server_error(gw: &Gateway, pick: &Pick, status: StatusCode) {
    if status.is_server_error() {
        eject(
            gw,
            pick.engine,
            &pick.url,
            &format!("answered {status}"),
            false,
        );
    }
}

/// Sits backend `e` out after a failed request.
pub fn eject(gw: &Gateway, e: EngineId, url: &str, why: &str, connection_failed: bool) {
    let until = gw.now_ms() + gw.config.eject_for.as_millis() as u64;
    gw.pool.lock().eject(e, until, connection_failed);
    gw.metrics.ejected(url);
    gw.publish_backend(e);
    warn!(backend = %url, reason = %why, eject_for = ?gw.config.eject_for,
        "backend ejected after a failed request");
}

/// The error for a request no backend can take.
pub fn no_backend(
    gw: &Gateway,
    no: NoBackend,
    model: &str,
    tried: &[EngineId],
    last_failure: &str,
) -> ApiError {
    if !tried.is_empty() {
        return ApiError::bad_gateway(format!(
            "every backend tried failed before answering; last: {last_failure}"
        ));
    }
    match no {
        NoBackend::UnknownModel => ApiError::unknown_model(model),
        NoBackend::AllDown => ApiError::unavailable(
            format!("no healthy backend serves `{model}` now"),
            proxy::retry_after(gw),
        ),
        NoBackend::AllBusy => ApiError::unavailable(
            format!("every backend serving `{model}` is at its concurrency limit"),
            1,
        ),
        NoBackend::AdapterNotReady { phase, error } => {
            let why = error.map(|e| format!(": {e}")).unwrap_or_default();
            match phase.as_str() {
                "Failed" => {
                    ApiError::unavailable(format!("LoRA adapter `{model}` failed to load{why}"), 30)
                }
                "Unloading" => ApiError::unknown_model(model),
                _ => ApiError::unavailable(
                    format!(
                        "LoRA adapter `{model}` is {phase}, not yet Ready on any instance{why}"
                    ),
                    2,
                ),
            }
        }
    }
}
