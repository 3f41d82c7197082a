//! The HTTP API (axum): `GET/POST /v1/adapters`, `GET/DELETE /v1/adapters/NAME`,
//! `GET /v1/instances`, `/health` and `/metrics`. Errors are JSON: `{"error": {"message", "type"}}`.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::manager::Manager;
use crate::registry::{Declared, RegistryError};
use crate::spec::AdapterSpec;

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "code": status.as_u16()}});
    (status, axum::Json(body)).into_response()
}

fn registry_error(e: RegistryError) -> Response {
    let status = match e {
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::Conflict(_) | RegistryError::InFile(_) | RegistryError::Unloading(_) => {
            StatusCode::CONFLICT
        }
    };
    error(status, "invalid_request_error", e.to_string())
}

async fn list(State(m): State<Arc<Manager>>) -> Response {
    axum::Json(json!({"adapters": m.registry.lock().view()})).into_response()
}

async fn create(
    State(m): State<Arc<Manager>>,
    body: Result<axum::Json<AdapterSpec>, JsonRejection>,
) -> Response {
    let spec = match body {
        Ok(axum::Json(spec)) => spec,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("adapter declaration: {}", e.body_text()),
            );
        }
    };
    let spec = match m.resolve(spec) {
        Ok(s) => s,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", why),
    };
    let name = spec.name.clone();
    let declared = m.registry.lock().declare(spec);
    match declared {
        Ok(d) => {
            tracing::info!(adapter = %name, ?d, "declared through the API");
            m.wake();
            let status = if d == Declared::Created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let view = m.registry.lock().get(&name);
            (status, axum::Json(view)).into_response()
        }
        Err(e) => registry_error(e),
    }
}

async fn show(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Response {
    match m.registry.lock().get(&name) {
        Some(v) => axum::Json(v).into_response(),
        None => registry_error(RegistryError::NotFound(name)),
    }
}

async fn delete(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Response {
    let mut registry = m.registry.lock();
    match registry.delete(&name) {
        Ok(()) => {
            tracing::info!(adapter = %name, "deleted through the API: draining, then unloading");
            let view = registry.get(&name);
            drop(registry);
            m.wake();
            (StatusCode::ACCEPTED, axum::Json(view)).into_response()
        }
        Err(e) => registry_error(e),
    }
}

async fn instances(State(m): State<Arc<Manager>>) -> Response {
    let list: Vec<_> = m.instances.lock().values().cloned().collect();
    axum::Json(json!({"instances": list})).into_response()
}

async fn health(State(m): State<Arc<Manager>>) -> Response {
    let up = m.instances.lock().values().filter(|i| i.up).count();
    axum::Json(json!({"status": "ok", "instances_up": up})).into_response()
}

async fn metrics(State(m): State<Arc<Manager>>) -> Response {
    (
        [(header::CONTENT_TYPE, kvcache_control::METRICS_CONTENT_TYPE)],
        m.metrics.render(),
    )
        .into_response()
}

/// The API's routes.
pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/adapters", get(list).post(create))
        .route("/v1/adapters/{*name}", get(show).delete(delete))
        .route("/v1/instances", get(instances))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {}", uri.path()),
            )
        })
        .with_state(m)
}

/// Serves the API on `listener` until SIGTERM or Ctrl-C (`kvcache-lora ready http=ADDR` on
/// stdout when ready, for scripts and tests that start it on port 0).
pub async fn serve(m: Arc<Manager>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    kvcache_control::serve::serve("kvcache-lora", listener, router(m)).await
}
