//! RDMA for clients on other hosts (feature `rdma`).
//!
//! At start the node opens the first RDMA device with an active port and registers its pool
//! for remote reads only. A client sends `RdmaConnect` on an ordinary TCP connection with its
//! queue pair's endpoint; the node creates a queue pair, connects it to the client's, and
//! answers with its own endpoint, the pool's region and a staging window registered for remote
//! writes only. From then on that connection serves the shared-memory ops: `ShmGet` leases
//! blocks and says where they lie, the client READs them (and checks every chunk as it lands),
//! `ShmRelease` ends the lease; for puts the client WRITEs blocks into its staging window and
//! `ShmPut` copies them into the pool with checksums. As with shared memory, no client can
//! write the pool, so none can alter a committed block.
//!
//! The node never posts work requests itself: one-sided verbs need only its queue pair in the
//! ready state, so serving RDMA costs the node no CPU per byte.

use std::sync::Arc;

use kvcache_core::wire::FrameHeader;
use kvcache_transport::tcp::FrameReadError;
use tokio::io::AsyncWrite;

use crate::config::RdmaConfig;
use crate::service::{Outcome, ServiceContext};
use crate::shm::ShmSession;
use crate::store::Store;

/// Whether this node serves RDMA.
pub enum RdmaState {
    /// Why not (built without the feature, turned off, no device): the reason `RdmaConnect`
    /// is refused with.
    Off(String),
    #[cfg(feature = "rdma")]
    On(Arc<on::RdmaServe>),
}

impl RdmaState {
    /// Opens the device and registers the pool, or says why not (logged once either way).
    pub fn start(cfg: Option<&RdmaConfig>, store: &Store) -> RdmaState {
        let state = Self::open(cfg, store);
        match &state {
            RdmaState::Off(why) => tracing::info!("RDMA off: {why}"),
            #[cfg(feature = "rdma")]
            RdmaState::On(serve) => {
                tracing::info!(
                    device = serve.device.name(),
                    "RDMA on: clients on other hosts read the pool with one-sided READs"
                )
            }
        }
        state
    }

    #[cfg(not(feature = "rdma"))]
    fn open(cfg: Option<&RdmaConfig>, _store: &Store) -> RdmaState {
        RdmaState::Off(match cfg {
            None => "turned off with --rdma off".into(),
            Some(_) => "this kvcache-server was built without the `rdma` feature".into(),
        })
    }

    #[cfg(feature = "rdma")]
    fn open(cfg: Option<&RdmaConfig>, store: &Store) -> RdmaState {
        let Some(cfg) = cfg else {
            return RdmaState::Off("turned off with --rdma off".into());
        };
        match on::RdmaServe::open(cfg, store) {
            Ok(serve) => RdmaState::On(Arc::new(serve)),
            Err(e) => RdmaState::Off(e.to_string()),
        }
    }

    /// The device's name, advertised by `Ping`.
    pub fn device_name(&self) -> Option<&str> {
        match self {
            RdmaState::Off(_) => None,
            #[cfg(feature = "rdma")]
            RdmaState::On(serve) => Some(serve.device.name()),
        }
    }
}

/// Serves `RdmaConnect`: on success `session` holds the connection's queue pair, staging
/// window and leases from now on.
pub(crate) async fn connect<W: AsyncWrite + Unpin>(
    ctx: &Arc<ServiceContext>,
    h: &FrameHeader,
    control: &[u8],
    wr: &mut W,
    session: &mut Option<Arc<ShmSession>>,
) -> Result<Outcome, FrameReadError> {
    if session.is_some() {
        return Ok(Outcome::Refused(
            "this connection already moves bytes through shared memory or RDMA".into(),
        ));
    }
    match &ctx.rdma {
        RdmaState::Off(why) => {
            let _ = (h, control, wr);
            Ok(Outcome::Refused(format!("this node serves no RDMA: {why}")))
        }
        #[cfg(feature = "rdma")]
        RdmaState::On(serve) => on::connect(ctx, serve, h, control, wr, session).await,
    }
}

#[cfg(feature = "rdma")]
mod on {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use anyhow::Context;
    use kvcache_core::wire::{FrameHeader, Op, RdmaConnectReply, RdmaConnectRequest};
    use kvcache_transport::MemoryRegion;
    use kvcache_transport::rdma::QpEndpoint;
    use kvcache_transport::rdma::verbs::{Device, Link, Registration};
    use kvcache_transport::tcp::FrameReadError;
    use tokio::io::AsyncWrite;

    use crate::config::RdmaConfig;
    use crate::metrics::Transport;
    use crate::service::{Outcome, ServiceContext, decode, send_reply, try_outcome};
    use crate::shm::{self, ShmSession};
    use crate::store::Store;

    pub struct RdmaServe {
        pub(super) device: Arc<Device>,
        /// The pool, registered for remote reads only.
        pool: Registration,
        lease_timeout: Duration,
        max_staging: u64,
        /// Staging bytes pinned by RDMA connections now, and the most they may pin together
        /// (the pool's size): a flood of `RdmaConnect`s cannot pin the host's memory.
        pinned: Arc<AtomicU64>,
        max_pinned: u64,
    }

    /// A connection's share of the pinned staging bytes, returned when it closes.
    struct Pinned {
        total: Arc<AtomicU64>,
        bytes: u64,
    }

    impl Drop for Pinned {
        fn drop(&mut self) {
            self.total.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }

    impl RdmaServe {
        /// Reserves `bytes` of pinned staging, or says why not.
        fn pin(&self, bytes: u64) -> anyhow::Result<Pinned> {
            let reserved = self
                .pinned
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                    (now + bytes <= self.max_pinned).then_some(now + bytes)
                });
            anyhow::ensure!(
                reserved.is_ok(),
                "RDMA connections already pin {} of staging windows, the node's limit (its pool's size); retry later or over TCP",
                kvcache_core::ByteSize(self.max_pinned)
            );
            Ok(Pinned {
                total: Arc::clone(&self.pinned),
                bytes,
            })
        }
    }

    impl RdmaServe {
        pub(super) fn open(cfg: &RdmaConfig, store: &Store) -> anyhow::Result<RdmaServe> {
            let device = Device::open()?;
            let region = store.pool_region();
            // SAFETY: the pool is mapped for the store's lifetime, which outlives the server
            // and so this registration.
            let pool = unsafe { device.register(region.base(), region.len(), true, false) }
                .context("cannot register the pool with the RDMA device")?;
            Ok(RdmaServe {
                device,
                pool,
                lease_timeout: cfg.lease_timeout,
                max_staging: cfg.max_staging,
                pinned: Arc::new(AtomicU64::new(0)),
                max_pinned: store.capacity().max(cfg.max_staging),
            })
        }
    }

    /// What an RDMA connection holds beyond its session's window and leases.
    struct Held {
        _link: Link,
        _staging: Registration,
        _pinned: Pinned,
    }

    pub(super) async fn connect<W: AsyncWrite + Unpin>(
        ctx: &Arc<ServiceContext>,
        serve: &RdmaServe,
        h: &FrameHeader,
        control: &[u8],
        wr: &mut W,
        session: &mut Option<Arc<ShmSession>>,
    ) -> Result<Outcome, FrameReadError> {
        let req: RdmaConnectRequest = try_outcome!(decode(h, control));
        let client = match QpEndpoint::decode(&req.endpoint) {
            Ok(ep) => ep,
            Err(e) => return Ok(Outcome::Refused(e.to_string())),
        };
        let built = (|| -> anyhow::Result<(ShmSession, RdmaConnectReply, usize)> {
            let staging =
                shm::staging_window("kvcache-rdma-staging", req.staging_bytes, serve.max_staging)?;
            let granted = staging.len();
            let pinned = serve.pin(granted as u64)?;
            // SAFETY: the registration is kept in the session and dropped before the window.
            let staging_mr = unsafe {
                serve
                    .device
                    .register(staging.base(), staging.len(), false, true)
            }?;
            let mut link = Link::new(&serve.device)?;
            link.connect(&client)?;
            let reply = RdmaConnectReply {
                endpoint: link.endpoint().encode().to_vec(),
                pool: serve.pool.remote().encode().to_vec(),
                staging: staging_mr.remote().encode().to_vec(),
                lease_timeout_ms: serve.lease_timeout.as_millis().min(u32::MAX as u128) as u32,
            };
            let held = Held {
                _link: link,
                _staging: staging_mr,
                _pinned: pinned,
            };
            let s =
                ShmSession::new(staging, serve.lease_timeout, Transport::Rdma).keep(Box::new(held));
            Ok((s, reply, granted))
        })();
        let (new, reply, granted) = match built {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot set up an RDMA connection");
                return Ok(Outcome::Refused(format!(
                    "RDMA setup failed on the node: {e:#}"
                )));
            }
        };
        let new = Arc::new(new);
        // The reaper ends by itself once the session is gone.
        drop(shm::spawn_reaper(&new, ctx));
        *session = Some(new);
        send_reply(wr, Op::RdmaConnect, h.request_id, &reply).await?;
        tracing::debug!(qpn = client.qpn, staging = granted, "RDMA client connected");
        Ok(Outcome::Done)
    }
}
