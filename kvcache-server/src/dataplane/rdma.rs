//! RDMA for clients on other hosts (feature `rdma`): an [`Upgrade`](crate::dataplane::session::Upgrade) of a TCP connection.
//!
//! At start the node opens the first RDMA device with an active port and registers its pool
//! for remote reads only. A client sends `RdmaConnect` on an ordinary TCP connection with its
//! queue pair's endpoint; the node creates a queue pair, connects it to the client's, and
//! answers with its own endpoint, the pool's region and a staging window registered for remote
//! writes only. From then on that connection is a [`Session`](crate::dataplane::session::Session): `LeaseGet` leases blocks and
//! says where they lie, the client READs them (and checks every chunk as it lands), `Release`
//! ends the lease; for puts the client WRITEs blocks into its staging window and `StagedPut`
//! copies them into the pool with checksums. As with shared memory, no client can write the
//! pool, so none can alter a committed block.
//!
//! The node never posts work requests itself: one-sided verbs need only its queue pair in the
//! ready state, so serving RDMA costs the node no CPU per byte.

use crate::config::RdmaConfig;
use crate::dataplane::session::UpgradePath;
use kvcache_store::Store;

/// Opens the device and registers the pool, or says why not (logged once either way).
pub fn open(cfg: Option<&RdmaConfig>, store: &Store) -> UpgradePath {
    let path = open_path(cfg, store);
    match &path {
        UpgradePath::Off(why) => tracing::info!("RDMA off: {why}"),
        UpgradePath::Open(rdma) => tracing::info!(
            device = rdma.advertise(),
            "RDMA on: clients on other hosts read the pool with one-sided READs"
        ),
    }
    path
}

#[cfg(not(feature = "rdma"))]
fn open_path(cfg: Option<&RdmaConfig>, _store: &Store) -> UpgradePath {
    UpgradePath::Off(match cfg {
        None => "turned off with --rdma off".into(),
        Some(_) => "this kvcache-server was built without the `rdma` feature".into(),
    })
}

#[cfg(feature = "rdma")]
fn open_path(cfg: Option<&RdmaConfig>, store: &Store) -> UpgradePath {
    let Some(cfg) = cfg else {
        return UpgradePath::Off("turned off with --rdma off".into());
    };
    match on::RdmaUpgrade::open(cfg, store) {
        Ok(rdma) => UpgradePath::Open(std::sync::Arc::new(rdma)),
        Err(e) => UpgradePath::Off(e.to_string()),
    }
}

#[cfg(feature = "rdma")]
mod on {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use anyhow::Context;
    use kvcache_core::wire::{FrameHeader, RdmaConnectReply, RdmaConnectRequest};
    use kvcache_transport::MemoryRegion;
    use kvcache_transport::rdma::QpEndpoint;
    use kvcache_transport::rdma::verbs::{Device, Link, Registration};
    use prost::Message;

    use crate::config::RdmaConfig;
    use crate::dataplane::request::{Outcome, decode};
    use crate::dataplane::session::{Session, Upgrade, staging_window};
    use crate::metrics::Via;
    use kvcache_store::Store;

    pub struct RdmaUpgrade {
        device: Arc<Device>,
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

    /// What an RDMA connection holds beyond its session's window and leases.
    struct Held {
        _link: Link,
        _staging: Registration,
        _pinned: Pinned,
    }

    impl RdmaUpgrade {
        pub(super) fn open(cfg: &RdmaConfig, store: &Store) -> anyhow::Result<RdmaUpgrade> {
            let device = Device::open()?;
            let region = store.pool_region();
            // SAFETY: the pool is mapped for the store's lifetime, which outlives the server
            // and so this registration.
            let pool = unsafe { device.register(region.base(), region.len(), true, false) }
                .context("cannot register the pool with the RDMA device")?;
            Ok(RdmaUpgrade {
                device,
                pool,
                lease_timeout: cfg.lease_timeout,
                max_staging: cfg.max_staging,
                pinned: Arc::new(AtomicU64::new(0)),
                max_pinned: store.capacity().max(cfg.max_staging),
            })
        }

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

        fn build(
            &self,
            req: &RdmaConnectRequest,
            client: &QpEndpoint,
        ) -> anyhow::Result<(Session, RdmaConnectReply)> {
            let staging =
                staging_window("kvcache-rdma-staging", req.staging_bytes, self.max_staging)?;
            let pinned = self.pin(staging.len() as u64)?;
            // SAFETY: the registration is held by the session and dropped before the window.
            let staging_mr = unsafe {
                self.device
                    .register(staging.base(), staging.len(), false, true)
            }?;
            let mut link = Link::new(&self.device)?;
            link.connect(client)?;
            let reply = RdmaConnectReply {
                endpoint: link.endpoint().encode().to_vec(),
                pool: self.pool.remote().encode().to_vec(),
                staging: staging_mr.remote().encode().to_vec(),
                lease_timeout_ms: self.lease_timeout.as_millis().min(u32::MAX as u128) as u32,
            };
            let held = Held {
                _link: link,
                _staging: staging_mr,
                _pinned: pinned,
            };
            let session = Session::new(staging, self.lease_timeout, Via::Rdma).hold(Box::new(held));
            Ok((session, reply))
        }
    }

    impl Upgrade for RdmaUpgrade {
        fn advertise(&self) -> &str {
            self.device.name()
        }

        fn upgrade(&self, h: &FrameHeader, control: &[u8]) -> Result<(Session, Vec<u8>), Outcome> {
            let req: RdmaConnectRequest = decode(h, control)?;
            let client =
                QpEndpoint::decode(&req.endpoint).map_err(|e| Outcome::Refused(e.to_string()))?;
            match self.build(&req, &client) {
                Ok((session, reply)) => {
                    tracing::debug!(
                        qpn = client.qpn,
                        staging = session.staging_len(),
                        "RDMA client connected"
                    );
                    Ok((session, reply.encode_to_vec()))
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot set up an RDMA connection");
                    Err(Outcome::Refused(format!(
                        "RDMA setup failed on the node: {e:#}"
                    )))
                }
            }
        }
    }
}
