//! Starting and stopping a server: bind the listeners, accept connections, shut down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::auth::Auth;
use crate::config::{ServerConfig, ShmSocket};
use crate::dataplane::connection::{self, DataPlane};
use crate::dataplane::request::{ServiceContext, warn_allowed};
use crate::dataplane::unix::{self, ShmServe};
use crate::dataplane::{rdma, session::UpgradePath};
use crate::http::{self, HttpContext};
use crate::metrics::Metrics;
use kvcache_store::Store;

/// A server accepting connections; [`RunningServer::shutdown`] stops it.
pub struct RunningServer {
    data_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shm_socket: Option<PathBuf>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    grace: std::time::Duration,
}

impl RunningServer {
    /// Builds the store, binds both listeners and starts serving on the current tokio runtime.
    pub async fn start(cfg: &ServerConfig) -> anyhow::Result<Self> {
        raise_open_files_limit(cfg.max_connections + cfg.metrics_max_connections + 256);
        let auth = Arc::new(match &cfg.auth {
            Some(path) => Auth::from_file(path)?,
            None => Auth::open(),
        });
        let store = Store::new(&cfg.store).context("cannot create the memory pool")?;
        if let Some(tier) = lower_tiers(cfg, &store)? {
            store.attach_lower(tier);
        }
        let metrics = Arc::new(Metrics::default());
        let data = TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let data_addr = data.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        let cluster_rx = rx.clone();
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
                    max_connections: cfg.metrics_max_connections,
                });
                tasks.spawn(http::serve(l, ctx, rx.clone()));
                Some(bound)
            }
            None => None,
        };
        let host_id = kvcache_transport::shm::host_id().unwrap_or_default();
        let shm_listener = match &cfg.shm {
            Some(shm) => {
                let path = match &shm.socket {
                    ShmSocket::Auto => {
                        let path = kvcache_transport::shm::default_socket_path(data_addr.port());
                        unix::prepare_socket_dir(&path)?;
                        path
                    }
                    ShmSocket::Path(p) => p.clone(),
                };
                let (listener, file) = unix::bind(&path, shm.mode)?;
                unix::hint_huge_pages();
                let pool = store
                    .shared_pool()
                    .context("shared memory is on but the pool is not shared")?;
                let serve = Arc::new(ShmServe {
                    lease_timeout: shm.lease_timeout,
                    max_staging: shm.max_staging,
                    pool_ro: pool
                        .read_only_fd()
                        .context("cannot open a read-only view of the pool")?,
                    pool_bytes: store.capacity(),
                    pool_id: format!(
                        "{host_id}-{}-{}",
                        std::process::id(),
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos())
                    ),
                    allow_uids: shm.allow_uids.clone(),
                });
                Some((path, listener, file, serve))
            }
            None => None,
        };
        let shm_socket = shm_listener.as_ref().map(|(p, ..)| p.clone());
        let upgrade = rdma::open(cfg.rdma.as_ref(), &store);
        let rdma_device = match &upgrade {
            UpgradePath::Open(rdma) => rdma.advertise().to_string(),
            UpgradePath::Off(_) => String::new(),
        };
        let ctx = Arc::new(ServiceContext {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            limits: cfg.limits,
            request_timeout: cfg.request_timeout,
            idle_timeout: cfg.idle_timeout,
            max_keys: cfg.max_keys,
            max_leased_bytes: cfg.max_leased_bytes,
            auth: Arc::clone(&auth),
            shm_socket: shm_socket.as_ref().map(|p| p.display().to_string()),
            host_id,
            rdma_device,
            landing: Default::default(),
        });
        let plane = Arc::new(DataPlane { ctx, upgrade });
        // TCP and Unix-socket connections share one limit.
        let slots = Arc::new(Semaphore::new(cfg.max_connections));
        let tcp_plane = Arc::clone(&plane);
        tasks.spawn(accept_loop(
            data,
            Arc::clone(&slots),
            Arc::clone(&metrics),
            rx.clone(),
            move |stream: TcpStream, peer: String, shutdown| {
                let plane = Arc::clone(&tcp_plane);
                async move { connection::serve_connection(plane, stream, &peer, shutdown).await }
            },
        ));
        if let Some((_, listener, file, serve)) = shm_listener {
            let metrics = Arc::clone(&metrics);
            tasks.spawn(async move {
                accept_loop(
                    listener,
                    slots,
                    metrics,
                    rx,
                    move |stream: UnixStream, _peer: String, shutdown| {
                        unix::serve_unix(Arc::clone(&plane), Arc::clone(&serve), stream, shutdown)
                    },
                )
                .await;
                drop(file);
            });
        }
        if let Some(cluster) = &cfg.cluster {
            let advertise = match &cluster.advertise {
                Some(a) => a.clone(),
                None if data_addr.ip().is_unspecified() => anyhow::bail!(
                    "a cluster node needs --advertise HOST:PORT when listening on {data_addr}: \
                     clients and peers cannot connect to an unspecified address"
                ),
                None => data_addr.to_string(),
            };
            crate::cluster::check_node_id_free(cluster, &advertise).await?;
            crate::cluster::start(
                cluster,
                advertise,
                &store,
                &metrics,
                &auth,
                &mut tasks,
                &cluster_rx,
            )?;
        }
        match auth.path() {
            Some(path) => {
                tracing::info!(auth = %path.display(), tenants = auth.tenants().len(), "the data plane authenticates: every connection presents a tenant's token; SIGHUP reloads the file");
                tasks.spawn(reload_on_hangup(Arc::clone(&auth), cluster_rx.clone()));
            }
            None => tracing::warn!(
                "the data plane is open: anyone who can reach {data_addr} (or the shared-memory socket) can read, write and list every block; start with --auth FILE to require tokens"
            ),
        }
        let stats = store.stats();
        tracing::info!(
            listen = %data_addr,
            shm_socket = %shm_socket.as_ref().map_or("off".to_string(), |p| p.display().to_string()),
            metrics = %metrics_addr.map_or("off".to_string(), |a| a.to_string()),
            pool = %kvcache_core::ByteSize(stats.capacity_bytes),
            locked = stats.locked,
            eviction = ?cfg.store.policy,
            "kvcache-server ready"
        );
        Ok(Self {
            data_addr,
            metrics_addr,
            shm_socket,
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

    /// The shared-memory socket's path, if shared memory is on.
    pub fn shm_socket(&self) -> Option<&std::path::Path> {
        self.shm_socket.as_deref()
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
        self.store.flush_lower();
        tracing::info!("kvcache-server stopped");
    }
}

/// Opens the tiers under the pool, top down: the GPU tier (`--gpu-tier`) over the disk tier
/// (`--disk`). Config resolution refuses either flag in a build without its feature.
fn lower_tiers(
    cfg: &ServerConfig,
    store: &Store,
) -> anyhow::Result<Option<Arc<dyn kvcache_store::LowerTier>>> {
    let disk = open_disk(cfg)?;
    open_gpu(cfg, store, disk)
}

#[cfg(feature = "disk")]
fn open_disk(cfg: &ServerConfig) -> anyhow::Result<Option<Arc<dyn kvcache_store::LowerTier>>> {
    let Some((path, capacity)) = &cfg.disk else {
        return Ok(None);
    };
    let cfg = kvcache_store::tier::disk::DiskConfig::new(path.clone(), *capacity);
    Ok(Some(kvcache_store::tier::disk::DiskTier::open(cfg)?))
}

#[cfg(not(feature = "disk"))]
fn open_disk(_cfg: &ServerConfig) -> anyhow::Result<Option<Arc<dyn kvcache_store::LowerTier>>> {
    Ok(None)
}

#[cfg(feature = "cuda")]
fn open_gpu(
    cfg: &ServerConfig,
    store: &Store,
    below: Option<Arc<dyn kvcache_store::LowerTier>>,
) -> anyhow::Result<Option<Arc<dyn kvcache_store::LowerTier>>> {
    let Some((device, bytes)) = cfg.gpu_tier else {
        return Ok(below);
    };
    let mem = kvcache_store::tier::gpu::DeviceMemory::open(device, bytes as usize)
        .with_context(|| format!("--gpu-tier: cannot allocate {bytes} bytes on GPU {device}"))?;
    tracing::info!(device, size = %kvcache_core::ByteSize(bytes), "GPU tier open");
    // Page-lock the pool with the driver so copies to and from the GPU are plain DMA; without
    // it they still work, staged by the driver.
    let pool = store.pool_region();
    // SAFETY: the store holds the registration and drops it before it unmaps the pool.
    match unsafe { mem.gpu().register_host(pool.base(), pool.len()) } {
        Ok(pin) => {
            store.pin_pool(Box::new(pin));
            tracing::info!("GPU tier copies are DMA: the pool is registered with the CUDA driver");
        }
        Err(e) => tracing::warn!(
            error = %e,
            "GPU tier copies go through the driver's staging: the pool could not be registered"
        ),
    }
    Ok(Some(kvcache_store::tier::gpu::GpuTier::new(mem, below)))
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(
    _cfg: &ServerConfig,
    _store: &Store,
    below: Option<Arc<dyn kvcache_store::LowerTier>>,
) -> anyhow::Result<Option<Arc<dyn kvcache_store::LowerTier>>> {
    Ok(below)
}

/// A listener the accept loop can drive: TCP for the network, Unix for shared memory.
trait Acceptor: Send + 'static {
    type Conn: Send + 'static;
    fn next(&self) -> impl Future<Output = std::io::Result<(Self::Conn, String)>> + Send;
}

impl Acceptor for TcpListener {
    type Conn = TcpStream;
    async fn next(&self) -> std::io::Result<(TcpStream, String)> {
        let (s, peer) = self.accept().await?;
        Ok((s, peer.to_string()))
    }
}

impl Acceptor for UnixListener {
    type Conn = UnixStream;
    async fn next(&self) -> std::io::Result<(UnixStream, String)> {
        let (s, _) = self.accept().await?;
        Ok((s, "local".to_string()))
    }
}

async fn accept_loop<A, F, Fut>(
    listener: A,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    A: Acceptor,
    F: Fn(A::Conn, String, watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.next() => a,
            _ = shutdown.wait_for(|s| *s) => break,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    // Refusing at once (closing) beats queueing without bound.
                    metrics.connection_rejected();
                    if warn_allowed() {
                        tracing::warn!(%peer, "connection refused: too many open connections (--max-connections)");
                    }
                    drop(stream);
                    continue;
                };
                tracing::debug!(%peer, "connection accepted");
                let fut = serve(stream, peer, shutdown.clone());
                conns.spawn(async move {
                    fut.await;
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

/// Reloads the auth file on every SIGHUP until shutdown; a file that fails to load keeps the
/// tenants already loaded.
async fn reload_on_hangup(auth: Arc<Auth>, mut shutdown: watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: the auth file is read only at start");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hangups.recv() => if got.is_none() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match auth.reload() {
            Ok(tenants) => tracing::info!(
                tenants,
                "reloaded the auth file; connections whose token it no longer lists are refused at their next request"
            ),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot reload the auth file; the tenants loaded before stay in force")
            }
        }
    }
}

/// Raises the soft limit on open files towards `wanted` (within the hard limit), so the
/// connection limits, not the usual 1024 descriptors, decide who is refused.
fn raise_open_files_limit(wanted: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = (wanted as libc::rlim_t).min(lim.rlim_max);
        if lim.rlim_cur >= want {
            return;
        }
        let old = lim.rlim_cur;
        lim.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(from = old, to = want, "raised the open-files limit");
        } else if (old as usize) < wanted {
            tracing::warn!(
                limit = old,
                wanted,
                "the open-files limit is below what the connection limits need: raise `ulimit -n`"
            );
        }
    }
}
