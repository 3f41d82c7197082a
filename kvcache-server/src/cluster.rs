//! Cluster membership from the node's side: registration in etcd.
//!
//! The node writes `/kvcache/members/<node id>` = `{"addr": "<advertised host:port>"}` under a
//! lease of `--etcd-ttl` seconds and renews the lease three times per TTL. Clients of
//! `etcd://...` read that prefix; a node that dies stops renewing, etcd drops its key when the
//! lease expires, and clients route around it. A node that loses etcd keeps serving (the data
//! plane never waits for etcd) and keeps retrying; if its lease expired meanwhile, it registers
//! again. Shutdown revokes the lease so clients learn at once.

use std::sync::Arc;
use std::time::Duration;

use kvcache_transport::etcd::{Etcd, EtcdError, MEMBERS_PREFIX};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What the node registers, and where.
pub struct Registration {
    pub etcd: Etcd,
    pub node_id: String,
    pub advertise: String,
    pub ttl: u64,
}

impl Registration {
    fn key(&self) -> String {
        format!("{MEMBERS_PREFIX}{}", self.node_id)
    }

    /// Renews `lease`, or registers anew when there is none or etcd forgot it.
    async fn renew(&self, lease: Option<i64>) -> Result<i64, EtcdError> {
        if let Some(id) = lease
            && self.etcd.keep_alive(id).await?
        {
            return Ok(id);
        }
        let id = self.etcd.grant(self.ttl).await?;
        let value = serde_json::json!({ "addr": self.advertise }).to_string();
        self.etcd.put(&self.key(), &value, Some(id)).await?;
        tracing::info!(
            etcd = self.etcd.addr(),
            key = self.key(),
            addr = self.advertise,
            ttl_s = self.ttl,
            "registered in etcd"
        );
        Ok(id)
    }

    /// Keeps the registration alive until shutdown, then revokes it.
    pub async fn run(self, metrics: Arc<Metrics>, mut shutdown: watch::Receiver<bool>) {
        let period = Duration::from_millis(self.ttl * 1000 / 3);
        let mut lease = None;
        let mut failing = false;
        loop {
            match self.renew(lease).await {
                Ok(id) => {
                    if failing {
                        tracing::info!(etcd = self.etcd.addr(), "etcd reachable again");
                    }
                    (lease, failing) = (Some(id), false);
                    metrics.etcd_registered(true);
                }
                Err(e) => {
                    metrics.etcd_error();
                    if !failing {
                        tracing::warn!(etcd = self.etcd.addr(), error = %e, "cannot renew the etcd registration; still serving, retrying");
                    }
                    failing = true;
                    metrics.etcd_registered(false);
                }
            }
            let wait = if failing {
                Duration::from_secs(1).min(period)
            } else {
                period
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if let Some(id) = lease {
            match self.etcd.revoke(id).await {
                Ok(()) => tracing::info!(key = self.key(), "left the cluster (etcd lease revoked)"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot revoke the etcd lease; it expires by itself")
                }
            }
        }
        metrics.etcd_registered(false);
    }
}
