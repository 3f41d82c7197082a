//! The metrics and health listener: a deliberately small HTTP/1.1 responder (one request per
//! connection) so the daemon needs no web framework. Routes:
//! - `GET /metrics`: Prometheus text;
//! - `GET /health`: 200 `{"status":"ok"}` while serving, 503 while shutting down;
//! - `POST /debug/corrupt/<32 hex key>`: flips a byte of a stored block (only with
//!   `--enable-test-hooks`, and only for callers on loopback; for fault-injection tests).
//!
//! The port has its own connection limit (`--metrics-max-connections`), separate from the
//! data plane's, and every connection has 10 seconds to ask and be answered: a flood of
//! scrapes or idle sockets here costs the data plane nothing.

use std::sync::Arc;
use std::time::Duration;

use kvcache_core::BlockKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::metrics::Metrics;
use kvcache_store::Store;

/// What the HTTP listener serves.
pub struct HttpContext {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub test_hooks: bool,
    /// Most connections served at once.
    pub max_connections: usize,
}

/// Accepts HTTP connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(ctx.max_connections));
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
                let ctx = Arc::clone(&ctx);
                let stopping = *shutdown.borrow();
                let local = peer.ip().is_loopback();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        respond(stream, &ctx, stopping, local),
                    )
                    .await;
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

async fn respond(
    mut stream: TcpStream,
    ctx: &HttpContext,
    stopping: bool,
    local: bool,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = route(ctx, method, path, stopping, local);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn route(
    ctx: &HttpContext,
    method: &str,
    path: &str,
    stopping: bool,
    local: bool,
) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            ctx.metrics.render(&ctx.store.stats()),
        ),
        ("GET", "/health") if stopping => (
            "503 Service Unavailable",
            JSON,
            "{\"status\":\"shutting_down\"}".into(),
        ),
        ("GET", "/health") => {
            let s = ctx.store.stats();
            let body = format!(
                "{{\"status\":\"ok\",\"blocks\":{},\"used_bytes\":{},\"capacity_bytes\":{}}}",
                s.blocks, s.used_bytes, s.capacity_bytes
            );
            ("200 OK", JSON, body)
        }
        ("POST", p) if ctx.test_hooks && p.starts_with("/debug/") && !local => (
            "403 Forbidden",
            TEXT,
            "test hooks answer only callers on loopback\n".into(),
        ),
        ("POST", p) if ctx.test_hooks && p.starts_with("/debug/corrupt/") => {
            match BlockKey::from_hex(&p["/debug/corrupt/".len()..]) {
                Some(key) if ctx.store.corrupt_block_for_test(key) => {
                    ("200 OK", TEXT, "corrupted\n".into())
                }
                Some(_) => ("404 Not Found", TEXT, "no such unleased block\n".into()),
                None => (
                    "400 Bad Request",
                    TEXT,
                    "expected 32 hex characters\n".into(),
                ),
            }
        }
        _ => (
            "404 Not Found",
            TEXT,
            "routes: GET /metrics, GET /health\n".into(),
        ),
    }
}
