//! Starting and stopping a server: bind the listeners, accept connections, shut down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::config::ServerConfig;
use crate::http::{self, HttpContext};
use crate::metrics::Metrics;
use crate::service::{self, ServiceContext};
use crate::store::Store;

/// A server accepting connections; [`RunningServer::shutdown`] stops it.
pub struct RunningServer {
    data_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    grace: std::time::Duration,
}

impl RunningServer {
    /// Builds the store, binds both listeners and starts serving on the current tokio runtime.
    pub async fn start(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let store = Store::new(&cfg.store).context("cannot create the memory pool")?;
        let metrics = Arc::new(Metrics::default());
        let data = TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let data_addr = data.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let metrics_addr = match &cfg.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?;
                let bound = l.local_addr()?;
                let ctx = Arc::new(HttpContext {
                    store: Arc::clone(&store),
                    metrics: Arc::clone(&metrics),
                    test_hooks: cfg.test_hooks,
                });
                tasks.spawn(http::serve(l, ctx, rx.clone()));
                Some(bound)
            }
            None => None,
        };
        let ctx = Arc::new(ServiceContext {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            limits: cfg.limits,
            request_timeout: cfg.request_timeout,
        });
        tasks.spawn(accept_loop(data, ctx, cfg.max_connections, rx));
        let stats = store.stats();
        tracing::info!(
            listen = %data_addr,
            metrics = %metrics_addr.map_or("off".to_string(), |a| a.to_string()),
            pool = %kvcache_core::ByteSize(stats.capacity_bytes),
            locked = stats.locked,
            eviction = ?cfg.store.policy,
            "kvcache-server ready"
        );
        Ok(Self {
            data_addr,
            metrics_addr,
            store,
            metrics,
            shutdown,
            tasks,
            grace: cfg.shutdown_grace,
        })
    }

    /// The bound data-plane address (useful with port 0).
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The bound metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The store, for in-process inspection and test hooks.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, then returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(self.grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?self.grace, "requests still running after the grace period; aborting them");
            self.tasks.abort_all();
        }
        tracing::info!("kvcache-server stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ServiceContext>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    // Refusing at once (closing) beats queueing without bound.
                    ctx.metrics.connection_rejected();
                    if service::warn_allowed() {
                        tracing::warn!(%peer, max_connections, "connection refused: too many open connections");
                    }
                    drop(stream);
                    continue;
                };
                tracing::debug!(%peer, "connection accepted");
                let (ctx, shutdown) = (Arc::clone(&ctx), shutdown.clone());
                conns.spawn(async move {
                    service::serve_connection(ctx, stream, peer, shutdown).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}
