//! Serves a router until SIGTERM or Ctrl-C, letting requests in flight finish. When it listens,
//! one line goes to stdout, `NAME ready http=ADDR`, for scripts and tests that start a binary on
//! port 0.

use axum::Router;
use tracing::info;

/// Serves `router` on `listener` as `name`.
pub async fn serve(
    name: &str,
    listener: tokio::net::TcpListener,
    router: Router,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    info!(listen = %addr, "{name} serving");
    println!("{name} ready http={addr}");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}
