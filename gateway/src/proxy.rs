//! Sends a request to the picked backend and relays its answer chunk by chunk (SSE streams pass
//! through as they come, nothing is buffered whole). The relay keeps the books: the first byte
//! ends the backend's pending prefill, the end (or the client going away, which drops the relay
//! and with it the upstream connection, so vLLM aborts the request) ends its in-flight count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::dispatch::Pick;
use crate::index::EngineId;
use crate::openai::Endpoint;
use crate::state::Gateway;
use kvcache_control::error_chain;

/// The header that names the backend that answered.
pub const BACKEND_HEADER: &str = "x-kvcache-backend";
/// The request id header, passed to the backend and back.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Why a send failed before any response byte.
#[derive(Debug)]
pub enum SendError {
    /// Connecting or sending failed, or the connection closed before a response: safe to
    /// retry elsewhere.
    Connection(String),
    /// No response head within the request timeout.
    Timeout,
}

/// Sends `body` to `pick` and waits for the response head.
pub async fn send(
    gw: &Gateway,
    pick: &Pick,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Bytes,
    request_id: &str,
) -> Result<Response<Incoming>, SendError> {
    let mut request = Request::builder()
        .method("POST")
        .uri(format!("{}{}", pick.url, endpoint.path()))
        .header(header::CONTENT_TYPE, "application/json")
        .header(REQUEST_ID_HEADER, request_id);
    if let Some(accept) = headers.get(header::ACCEPT) {
        request = request.header(header::ACCEPT, accept);
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| SendError::Connection(format!("cannot build the request: {e}")))?;
    match tokio::time::timeout(gw.config.request_timeout, gw.http.request(request)).await {
        Err(_) => Err(SendError::Timeout),
        Ok(Err(e)) => Err(SendError::Connection(error_chain(&e))),
        Ok(Ok(response)) => Ok(response),
    }
}

/// What the relay reports when it ends.
struct Books {
    gw: Arc<Gateway>,
    engine: EngineId,
    url: String,
    strategy: &'static str,
    status: StatusCode,
    blocks: u64,
    arrived: Instant,
    dispatched: Instant,
    first_seen: bool,
    /// The body's length when the backend said it (hyper stops reading at it, so the end is
    /// seen by counting, not by the stream's close).
    expected_len: Option<u64>,
    relayed: u64,
    /// Set when the body ended (cleanly or not); unset at drop means the client went away.
    ended: Option<u16>,
}

impl Books {
    /// A chunk of `len` bytes was relayed.
    fn relayed(&mut self, len: usize) {
        self.relayed += len as u64;
        if self.expected_len.is_some_and(|n| self.relayed >= n) {
            self.ended = Some(self.status.as_u16());
        }
        if self.first_seen {
            return;
        }
        self.first_seen = true;
        self.gw
            .metrics
            .first_byte(&self.url, self.dispatched.elapsed());
        self.gw.pool.lock().first_byte(self.engine, self.blocks);
    }
}

impl Drop for Books {
    fn drop(&mut self) {
        let left = if self.first_seen { 0 } else { self.blocks };
        self.gw.pool.lock().finished(self.engine, left);
        // 499: the client closed the connection first (nginx's code for it).
        let status = self.ended.unwrap_or_else(|| {
            debug!(backend = %self.url, "client went away; upstream request cancelled");
            499
        });
        self.gw
            .metrics
            .request(&self.url, self.strategy, status, self.arrived.elapsed());
        self.gw.publish_backend(self.engine);
    }
}

/// Relays `upstream` to the client, with the backend and request id headers added.
#[allow(clippy::too_many_arguments)]
pub fn relay(
    gw: Arc<Gateway>,
    pick: &Pick,
    strategy: &'static str,
    upstream: Response<Incoming>,
    request_id: &str,
    arrived: Instant,
    dispatched: Instant,
) -> Response<Body> {
    let (parts, incoming) = upstream.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let deadline = tokio::time::Instant::from_std(arrived) + gw.config.request_timeout;
    let books = Books {
        gw,
        engine: pick.engine,
        url: pick.url.clone(),
        strategy,
        status: parts.status,
        blocks: pick.cost.compute_blocks as u64,
        arrived,
        dispatched,
        first_seen: false,
        expected_len: parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        relayed: 0,
        ended: None,
    };
    let mut books = books;
    if books.expected_len == Some(0) {
        books.ended = Some(books.status.as_u16());
    }
    let stream = futures_util::stream::unfold(
        Some((incoming.into_data_stream(), books)),
        move |state| async move {
            let (mut body, mut books) = state?;
            let failure = match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(Ok(chunk))) => {
                    books.relayed(chunk.len());
                    return Some((Ok(chunk), Some((body, books))));
                }
                Ok(None) => {
                    books.ended = Some(books.status.as_u16());
                    return None;
                }
                Ok(Some(Err(e))) => {
                    format!("the backend's response broke off: {}", error_chain(&e))
                }
                Err(_) => "the request timed out (limits.request_timeout_s)".to_string(),
            };
            warn!(backend = %books.url, reason = %failure, "response cut short");
            books.ended = Some(502);
            if sse {
                // Tell a streaming client why its stream ends early, in the stream.
                let event = serde_json::json!({"error": {"message": failure, "type": "server_error", "code": "backend_failed"}});
                Some((Ok(Bytes::from(format!("data: {event}\n\n"))), None))
            } else {
                Some((Err(std::io::Error::other(failure)), None))
            }
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&pick.url) {
        response.headers_mut().insert(BACKEND_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-connection"
    )
}

/// Seconds a client should wait before retrying when no backend is up.
pub fn retry_after(gw: &Gateway) -> u64 {
    gw.config
        .health_interval
        .max(Duration::from_secs(1))
        .as_secs()
}
