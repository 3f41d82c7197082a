//! The Kubernetes actuator as far as this machine allows: no API server runs here (no cluster,
//! no image registry), so kube-rs's client talks to a small HTTP server of the test's own that
//! answers the two calls the actuator makes, `GET` and a merge `PATCH` of
//! `/apis/apps/v1/namespaces/NS/{deployments,statefulsets}/NAME/scale`, and records what it was
//! sent. What this proves: the paths, the verb, the patch body and its content type, reading
//! `spec.replicas`, and errors that name the workload. What it cannot: RBAC, admission, a real
//! controller acting on the new count (deploy/ documents the Role the actuator needs).
#![cfg(feature = "kubernetes")]

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use kvcache_autoscaler::actuator::Scale;
use kvcache_autoscaler::actuator::kubernetes::Kubernetes;
use kvcache_autoscaler::config::KubernetesTarget;
use parking_lot::Mutex;
use serde_json::{Value, json};

#[derive(Default)]
struct Cluster {
    replicas: Mutex<std::collections::HashMap<String, u32>>,
    patches: Mutex<Vec<(String, String, Value)>>,
}

fn scale(ns: &str, name: &str, n: u32) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": n}, "status": {"replicas": n}})
}

async fn get_scale(
    State(c): State<Arc<Cluster>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
) -> impl IntoResponse {
    match c.replicas.lock().get(&format!("{kind}/{name}")) {
        Some(n) => (StatusCode::OK, axum::Json(scale(&ns, &name, *n))),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("{kind}.apps \"{name}\" not found"), "reason": "NotFound", "code": 404}),
            ),
        ),
    }
}

async fn patch_scale(
    State(c): State<Arc<Cluster>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    c.patches
        .lock()
        .push((format!("{kind}/{name}"), content_type, patch.clone()));
    let n = patch
        .pointer("/spec/replicas")
        .and_then(Value::as_u64)
        .unwrap_or(0) as u32;
    c.replicas.lock().insert(format!("{kind}/{name}"), n);
    (StatusCode::OK, axum::Json(scale(&ns, &name, n)))
}

async fn cluster() -> (Arc<Cluster>, kube::Client) {
    let c = Arc::new(Cluster::default());
    c.replicas.lock().insert("deployments/vllm".into(), 1);
    c.replicas.lock().insert("statefulsets/cache".into(), 2);
    let app = Router::new()
        .route(
            "/apis/apps/v1/namespaces/{ns}/{kind}/{name}/scale",
            get(get_scale).patch(patch_scale),
        )
        .with_state(c.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(url.parse().unwrap());
    (c, kube::Client::try_from(config).unwrap())
}

fn target(kind: &str, name: &str) -> KubernetesTarget {
    KubernetesTarget {
        namespace: "inference".into(),
        kind: kind.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn the_scale_subresource_is_read_and_merge_patched() {
    let (c, client) = cluster().await;
    let mut deployment = Kubernetes::with_client(target("Deployment", "vllm"), client.clone());
    assert_eq!(deployment.current().await, Ok(Some(1)));
    deployment.set(3).await.unwrap();
    assert_eq!(deployment.current().await, Ok(Some(3)));
    let mut cache = Kubernetes::with_client(target("StatefulSet", "cache"), client.clone());
    cache.set(4).await.unwrap();
    let patches = c.patches.lock().clone();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[0].0, "deployments/vllm");
    assert_eq!(patches[0].1, "application/merge-patch+json");
    assert_eq!(patches[0].2, json!({"spec": {"replicas": 3}}));
    assert_eq!(patches[1].0, "statefulsets/cache");
    let mut missing = Kubernetes::with_client(target("Deployment", "absent"), client);
    let e = missing.current().await.unwrap_err();
    assert!(
        e.contains("Deployment inference/absent") && e.contains("not found"),
        "{e}"
    );
}
