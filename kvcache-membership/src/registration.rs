//! A node's own registration in etcd: its record under `MEMBERS_PREFIX<node id>` with a lease
//! renewed every third of its TTL, registered anew when etcd forgot the lease (etcd restarted
//! or the node was cut off past the TTL), and revoked at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::etcd::{Etcd, EtcdError, MEMBERS_PREFIX};

/// What the registration loop reports, for the node's metrics.
pub trait RegistrationObserver: Send + Sync {
    /// Whether the node's record is in etcd now.
    fn registered(&self, yes: bool);
    /// A renewal failed.
    fn failed(&self);
}

/// What the node registers, and where.
pub struct Registration {
    pub etcd: Etcd,
    pub node_id: String,
    pub advertise: String,
    pub ttl: u64,
}

impl Registration {
    /// The key this node's record lives under.
    pub fn key(&self) -> String {
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
    pub async fn run(
        self,
        observer: Arc<dyn RegistrationObserver>,
        mut shutdown: watch::Receiver<bool>,
    ) {
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
                    observer.registered(true);
                }
                Err(e @ EtcdError::Denied { .. }) => {
                    observer.failed();
                    if !failing {
                        tracing::error!(etcd = self.etcd.addr(), error = %e, "etcd refuses this node's registration: give its etcd user a role that may write /kvcache/members/; serving, but clients of etcd will not find this node");
                    }
                    failing = true;
                    observer.registered(false);
                }
                Err(e) => {
                    observer.failed();
                    if !failing {
                        tracing::warn!(etcd = self.etcd.addr(), error = %e, "cannot renew the etcd registration; still serving, retrying");
                    }
                    failing = true;
                    observer.registered(false);
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
        observer.registered(false);
    }
}
