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
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
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

/// Serves until SIGTERM or Ctrl-C; prints `kvcache-autoscaler ready http=ADDR` on stdout when
/// ready, for scripts and tests that start it on port 0.
pub async fn serve(s: Arc<Scaler>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(listen = %addr, "kvcache-autoscaler serving /status and /metrics");
    println!("kvcache-autoscaler ready http={addr}");
    axum::serve(listener, router(s))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        })
        .await
}
