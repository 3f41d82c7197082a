//! `GET /status` (JSON: per target the metric values, current, desired, the last decision and
//! why, the sources' health), `/metrics` and `/health`.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::scaler::Scaler;

async fn status(axum::extract::State(s): axum::extract::State<Arc<Scaler>>) -> Response {
    axum::Json(json!({"targets": s.status()})).into_response()
}

async fn metrics(axum::extract::State(s): axum::extract::State<Arc<Scaler>>) -> Response {
    (
        [(header::CONTENT_TYPE, kvcache_control::METRICS_CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

/// The routes.
pub fn router(s: Arc<Scaler>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .fallback(|uri: Uri| async move {
            let body = json!({"error": {"message": format!("no route {}", uri.path()), "type": "not_found"}});
            (StatusCode::NOT_FOUND, axum::Json(body))
        })
        .with_state(s)
}

/// Serves until SIGTERM or Ctrl-C (`kvcache-autoscaler ready http=ADDR` on stdout when ready).
pub async fn serve(s: Arc<Scaler>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    kvcache_control::serve::serve("kvcache-autoscaler", listener, router(s)).await
}
