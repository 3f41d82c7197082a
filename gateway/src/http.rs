//! The HTTP face (axum): the OpenAI endpoints, /v1/models, /health and /metrics. A request is
//! checked in the order a client can fix it (key, size, JSON, model, limits) and refused with
//! OpenAI's error body before any backend sees it; then it is routed, sent, retried on another
//! backend while nothing was received, and relayed.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde_json::json;
use tracing::info;

use crate::access::{KeyId, Refusal};
use crate::dispatch::{self, PromptView};
use crate::forward::{Routed, no_backend};
use crate::legs;
use crate::openai::{self, ApiError, Endpoint, Inspected};
use crate::pd::Need;
use crate::proxy::{self, REQUEST_ID_HEADER};
use crate::route::Strategy;
use crate::state::Gateway;

/// The header that overrides the routing strategy for one request.
pub const STRATEGY_HEADER: &str = "x-kvcache-strategy";

/// The gateway's routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/explain/v1/completions", post(explain_completions))
        .route(
            "/explain/v1/chat/completions",
            post(explain_chat_completions),
        )
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .with_state(gw)
}

async fn completions(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    handle(gw, Endpoint::Completions, request).await
}

async fn chat_completions(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    handle(gw, Endpoint::ChatCompletions, request).await
}

async fn explain_completions(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    explain(gw, Endpoint::Completions, request).await
}

async fn explain_chat_completions(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    explain(gw, Endpoint::ChatCompletions, request).await
}

/// The same checks as a request (key, body, model; no rate limit is spent), then what
/// routing sees and would pick, as JSON; nothing is sent to a backend.
async fn explain(gw: Arc<Gateway>, endpoint: Endpoint, request: Request) -> Response {
    let result = async {
        let strategy = strategy_of(&gw, request.headers())?;
        let (checked, _) = check(&gw, endpoint, request).await?;
        let view = PromptView::new(&gw, checked.tokens, strategy, &checked.inspected.model).await;
        dispatch::explain(&gw, &view, &checked.inspected.model, strategy)
            .map_err(|no| no_backend(&gw, no, &checked.inspected.model, &[], ""))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A request that passed the checks.
struct Checked {
    inspected: Inspected,
    tokens: Option<Vec<u32>>,
    key: Option<KeyId>,
    body: Bytes,
}

/// Key, size, JSON, model and prompt tokens, in the order a client can fix them.
async fn check(
    gw: &Gateway,
    endpoint: Endpoint,
    request: Request,
) -> Result<(Checked, HeaderMap), ApiError> {
    let (parts, body) = request.into_parts();
    let key = {
        let auth = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        gw.access.lock().authenticate(auth).map_err(refusal)?
    };
    let body = read_body(body, gw.config.max_body_bytes).await?;
    let inspected = openai::inspect(endpoint, &body)?;
    let (known, any_up) = {
        let pool = gw.pool.lock();
        let now = gw.now_ms();
        (
            pool.knows_model(&inspected.model) || gw.adapters.lock().contains_key(&inspected.model),
            pool.backends().iter().any(|b| b.up(now)),
        )
    };
    if !known && !any_up {
        // The models are learned from the backends; with none up, "unknown" would be a guess.
        return Err(ApiError::unavailable(
            "no backend is up (the gateway learns the served models from them)",
            proxy::retry_after(gw),
        ));
    }
    if !known || key.is_some_and(|k| !gw.access.lock().allows(k, &inspected.model)) {
        return Err(ApiError::unknown_model(&inspected.model));
    }
    let tokens = prompt_tokens(gw, &inspected)?;
    Ok((
        Checked {
            inspected,
            tokens,
            key,
            body,
        },
        parts.headers,
    ))
}

async fn handle(gw: Arc<Gateway>, endpoint: Endpoint, request: Request) -> Response {
    let arrived = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| format!("gw-{:016x}", gw.draw()), str::to_string);
    let strategy = strategy_of(&gw, request.headers());
    let label = strategy.as_ref().map_or("invalid", |s| s.name());
    let result = match strategy {
        Ok(strategy) => route(&gw, endpoint, strategy, request, &request_id, arrived).await,
        Err(e) => Err(e),
    };
    let mut response = match result {
        Ok(response) => return response,
        Err(e) => {
            gw.metrics
                .request("none", label, e.status.as_u16(), arrived.elapsed());
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

fn strategy_of(gw: &Gateway, headers: &HeaderMap) -> Result<Strategy, ApiError> {
    match headers.get(STRATEGY_HEADER) {
        None => Ok(gw.config.strategy),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(Strategy::parse)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{STRATEGY_HEADER} must be one of random, round-robin, least-request, prefix, cache-aware"
                ))
            }),
    }
}

/// Checks, routes, sends (retrying elsewhere while nothing was received) and relays.
async fn route(
    gw: &Arc<Gateway>,
    endpoint: Endpoint,
    strategy: Strategy,
    request: Request,
    request_id: &str,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let (
        Checked {
            inspected,
            tokens,
            key,
            body,
        },
        headers,
    ) = check(gw, endpoint, request).await?;
    if let Some(k) = key {
        // Tokens this request may use: its prompt (estimated at 4 bytes a token when it cannot
        // be tokenized) and the completion it asks for.
        let prompt = tokens
            .as_ref()
            .map_or(body.len() as u64 / 4, |t| t.len() as u64);
        let spend = prompt + inspected.max_tokens.unwrap_or(0);
        let admitted = gw.access.lock().admit(k, spend, gw.now_s());
        if let Err(r) = admitted {
            gw.metrics.rate_limited(match r {
                Refusal::Tokens { .. } => "tokens",
                _ => "requests",
            });
            info!(key = gw.access.lock().name(k), refusal = ?r, "rate limit reached");
            return Err(refusal(r));
        }
    }
    let routing = Instant::now();
    let view = PromptView::new(gw, tokens, strategy, &inspected.model).await;
    let request = Routed {
        gw,
        endpoint,
        strategy,
        view,
        model: inspected.model.clone(),
        headers,
        request_id,
        arrived,
        routing,
    };
    if gw.pool.lock().disaggregated() {
        legs::disaggregated(&request, body).await
    } else {
        request.forward(Need::Any, body, None, None).await
    }
}

/// The engine-exact tokens of the prompt, or None when they cannot be known (no tokenizer
/// and a text prompt): routing then sees no prefixes.
fn prompt_tokens(gw: &Gateway, r: &Inspected) -> Result<Option<Vec<u32>>, ApiError> {
    match (&gw.tokenizer, &r.prompt) {
        (_, openai::Prompt::Tokens(ids)) => Ok(Some(ids.clone())),
        (Some(t), openai::Prompt::Messages(_)) if !t.has_chat_template() => Ok(None),
        (Some(t), _) => t
            .tokens(r)
            .map(Some)
            .map_err(|e| ApiError::bad_request(format!("{e:#}"))),
        (None, _) => Ok(None),
    }
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::Missing => {
            ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
        }
        Refusal::Wrong => ApiError::unauthorized("invalid API key"),
        Refusal::Requests { retry_after } => ApiError::rate_limited(
            "rate limit reached: requests per minute of this key",
            retry_after,
        ),
        Refusal::Tokens {
            retry_after: Some(s),
        } => ApiError::rate_limited("rate limit reached: tokens per minute of this key", s),
        Refusal::Tokens { retry_after: None } => ApiError::rate_limited(
            "this request needs more tokens than the key's whole per-minute limit; lower max_tokens or shorten the prompt",
            60,
        ),
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let key = match gw.access.lock().authenticate(auth) {
        Ok(k) => k,
        Err(r) => return refusal(r).into_response(),
    };
    let names = gw.pool.lock().models();
    let access = gw.access.lock();
    let data: Vec<_> = names
        .iter()
        .filter(|m| key.is_none_or(|k| access.allows(k, m)))
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "kvcache-gateway"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Ready when a backend is up; with P/D, when both a prefill-capable and a decode-capable one
/// are (requests would still be served decode-only without a prefill instance, but the
/// deployment is not what it was configured to be, and the body says which pool is empty).
async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let now = gw.now_ms();
    let (up, total, pd) = {
        let pool = gw.pool.lock();
        let b = pool.backends();
        let pd = pool.disaggregated().then(|| {
            (
                pool.up_for(Need::Prefill, now),
                pool.up_for(Need::Decode, now),
            )
        });
        (b.iter().filter(|b| b.up(now)).count(), b.len(), pd)
    };
    let mut body = json!({
        "backends_up": up,
        "backends": total,
    });
    let ready = match pd {
        None => up > 0,
        Some((prefill, decode)) => {
            body["prefill_up"] = json!(prefill);
            body["decode_up"] = json!(decode);
            prefill > 0 && decode > 0
        }
    };
    body["status"] = json!(if ready { "ok" } else { "unavailable" });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.publish_index();
    (
        [(header::CONTENT_TYPE, kvcache_control::METRICS_CONTENT_TYPE)],
        gw.metrics.render(),
    )
        .into_response()
}

/// Serves the routes on `listener` until ctrl-c or SIGTERM (`kvcache-gateway ready http=ADDR` on
/// stdout when ready, for scripts and tests that start it on port 0).
pub async fn serve(gw: Arc<Gateway>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    kvcache_control::serve::serve("kvcache-gateway", listener, router(gw)).await
}
