//! The metrics and health listener, on axum (the workspace's one HTTP convention). Routes:
//! - `GET /metrics`: OpenMetrics text (the names: `kvcache_core::metric_names`);
//! - `GET /health`: 200 `{"status":"ok",...}` while serving, 503 while shutting down;
//! - `POST /debug/corrupt/<32 hex key>`: flips a byte of a stored block (only with
//!   `--enable-test-hooks`, and only for callers on loopback; for fault-injection tests).
//!
//! The port has its own connection limit (`--metrics-max-connections`), separate from the
//! data plane's, and every connection has 10 seconds to ask and be answered: a flood of
//! scrapes or idle sockets here costs the data plane nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use kvcache_core::BlockKey;
use kvcache_store::Store;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::metrics::Metrics;
use crate::metrics::render::CONTENT_TYPE;

/// Longest one metrics-port connection may live.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// What the HTTP listener serves.
pub struct HttpContext {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub test_hooks: bool,
    /// Most connections served at once.
    pub max_connections: usize,
}

/// The routes' shared state.
#[derive(Clone)]
struct Served {
    ctx: Arc<HttpContext>,
    shutdown: watch::Receiver<bool>,
}

/// Whether the connection's peer is on loopback.
#[derive(Clone, Copy)]
struct Loopback(bool);

fn router(ctx: Arc<HttpContext>, shutdown: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/debug/corrupt/{key}", post(corrupt))
        .fallback(|| async { (StatusCode::NOT_FOUND, "routes: GET /metrics, GET /health\n") })
        .with_state(Served { ctx, shutdown })
}

/// Accepts HTTP connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(ctx.max_connections));
    let routes = router(Arc::clone(&ctx), shutdown.clone());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    // Closed at once: the limit is what keeps a flood from taking the
                    // process's descriptors.
                    ctx.metrics.http_connection_rejected();
                    drop(stream);
                    continue;
                };
                let service = routes
                    .clone()
                    .layer(Extension(Loopback(peer.ip().is_loopback())));
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
                    let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn metrics(State(s): State<Served>) -> Response {
    let body = s.ctx.metrics.render(&s.ctx.store.stats());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

async fn health(State(s): State<Served>) -> Response {
    if *s.shutdown.borrow() {
        let body = serde_json::json!({ "status": "shutting_down" });
        return json(StatusCode::SERVICE_UNAVAILABLE, body);
    }
    let st = s.ctx.store.stats();
    let body = serde_json::json!({
        "status": "ok",
        "blocks": st.blocks,
        "used_bytes": st.used_bytes,
        "capacity_bytes": st.capacity_bytes,
    });
    json(StatusCode::OK, body)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    let content = [(header::CONTENT_TYPE, "application/json")];
    (status, content, body.to_string()).into_response()
}

async fn corrupt(
    State(s): State<Served>,
    Extension(Loopback(local)): Extension<Loopback>,
    Path(key): Path<String>,
) -> (StatusCode, &'static str) {
    if !s.ctx.test_hooks {
        return (StatusCode::NOT_FOUND, "routes: GET /metrics, GET /health\n");
    }
    if !local {
        return (
            StatusCode::FORBIDDEN,
            "test hooks answer only callers on loopback\n",
        );
    }
    match BlockKey::from_hex(&key) {
        Some(key) if s.ctx.store.corrupt_block_for_test(key) => (StatusCode::OK, "corrupted\n"),
        Some(_) => (StatusCode::NOT_FOUND, "no such unleased block\n"),
        None => (StatusCode::BAD_REQUEST, "expected 32 hex characters\n"),
    }
}
