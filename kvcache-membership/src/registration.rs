//! A record kept alive in etcd: a cache node's under `MEMBERS_PREFIX<node id>`, or an engine's
//! under `ENGINES_PREFIX<url>` (the vLLM connector's, through the Python module), with a lease
//! renewed every third of its TTL, registered anew when etcd forgot the lease (etcd restarted
//! or the process was cut off past the TTL), and revoked at shutdown.

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

/// What is registered, and where.
pub struct Registration {
    pub etcd: Etcd,
    /// The record's key.
    pub key: String,
    /// The record (JSON).
    pub value: String,
    /// Seconds the record outlives its last renewal.
    pub ttl: u64,
}

impl Registration {
    /// A cache node's record: `{"addr": advertise}` under `MEMBERS_PREFIX<node_id>`.
    pub fn member(etcd: Etcd, node_id: &str, advertise: &str, ttl: u64) -> Self {
        Self {
            etcd,
            key: format!("{MEMBERS_PREFIX}{node_id}"),
            value: serde_json::json!({ "addr": advertise }).to_string(),
            ttl,
        }
    }

    /// The key the record lives under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Renews `lease`, or registers anew when there is none or etcd forgot it.
    async fn renew(&self, lease: Option<i64>) -> Result<i64, EtcdError> {
        if let Some(id) = lease
            && self.etcd.keep_alive(id).await?
        {
            return Ok(id);
        }
        let id = self.etcd.grant(self.ttl).await?;
        self.etcd.put(&self.key, &self.value, Some(id)).await?;
        tracing::info!(
            etcd = self.etcd.addr(),
            key = self.key,
            value = self.value,
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
                        tracing::error!(etcd = self.etcd.addr(), key = self.key, error = %e, "etcd refuses this registration: give this etcd user a role that may write the key's prefix; serving, but nobody watching etcd will find this process");
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
                Ok(()) => tracing::info!(key = self.key, "deregistered (etcd lease revoked)"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot revoke the etcd lease; it expires by itself")
                }
            }
        }
        observer.registered(false);
    }
}
