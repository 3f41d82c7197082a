//! The shared cache tier as routing sees it: how many leading blocks of a prompt the kvcache
//! nodes hold, asked with exactly the keys an engine would load (`prefix_match`), under a
//! deadline so a slow or dead node costs routing its credit, never its latency.

use std::sync::Arc;
use std::time::Duration;

use kvcache_client::{ClientConfig, Kvcache, Target};
use kvcache_core::BlockKey;
use tokio::sync::RwLock;
use tracing::{info, warn};

/// A connection to the cache nodes, made in the background and remade when it breaks.
pub struct SharedTier {
    target: Target,
    config: ClientConfig,
    client: RwLock<Option<Kvcache>>,
    /// The configured nodes' (host, address).
    hosts: Vec<(String, String)>,
}

impl SharedTier {
    /// The tier at `addrs` (one node, several members, or one `etcd://` URL); `token` is the
    /// tenant token the engines use when the nodes run with `--auth`.
    pub fn new(addrs: &[String], token: Option<String>, timeout: Duration) -> Arc<Self> {
        let target = if addrs.len() == 1 {
            Target::parse(&addrs[0])
        } else {
            Target::Members(addrs.to_vec())
        };
        let mut config = ClientConfig::new(addrs[0].clone());
        config.timeout = timeout;
        config.token = token;
        config.max_connections = 4;
        let hosts = addrs
            .iter()
            .filter(|a| !a.starts_with("etcd://"))
            .filter_map(|a| a.rsplit_once(':').map(|(h, _)| (h.to_string(), a.clone())))
            .collect();
        Arc::new(Self {
            target,
            config,
            client: RwLock::new(None),
            hosts,
        })
    }

    /// Connects until it succeeds, backing off to 5 s; logs the first failure and the success.
    pub async fn connect_loop(self: Arc<Self>) {
        let mut delay = Duration::from_millis(200);
        let mut said = false;
        loop {
            match Kvcache::connect(self.target.clone(), self.config.clone(), 1).await {
                Ok(c) => {
                    info!(cache = ?self.target.members(), "connected to the shared cache tier");
                    *self.client.write().await = Some(c);
                    return;
                }
                Err(e) => {
                    if !said {
                        warn!(cache = ?self.target.members(), error = %e,
                            "cannot reach the shared cache tier; routing goes on without its credit, retrying");
                        said = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Leading `keys` the tier holds; an error when it is not connected or does not answer.
    pub async fn matched(&self, keys: &[BlockKey]) -> Result<usize, String> {
        let Some(client) = self.client.read().await.clone() else {
            return Err("not connected".into());
        };
        tokio::time::timeout(self.config.timeout, client.prefix_match(keys))
            .await
            .map_err(|_| format!("no answer in {:?}", self.config.timeout))?
            .map_err(|e| e.to_string())
    }

    /// Whether a cache node runs on the host of `backend_url` (its loads are cheaper there).
    pub fn near(&self, backend_url: &str) -> bool {
        self.node_near(backend_url).is_some()
    }

    /// The address of a cache node on the host of `backend_url`, if one is configured (P/D:
    /// where the prefill engine also places the blocks the decode engine there will read).
    pub fn node_near(&self, backend_url: &str) -> Option<&str> {
        let host = backend_url
            .strip_prefix("http://")
            .and_then(|r| r.rsplit_once(':'))
            .map(|(h, _)| h)?;
        self.hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, addr)| addr.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cache_node_on_the_backends_host_is_near() {
        let t = SharedTier::new(&["10.0.0.5:7400".into()], None, Duration::from_millis(20));
        assert!(t.near("http://10.0.0.5:8000"));
        assert!(!t.near("http://10.0.0.6:8000"));
        assert_eq!(t.node_near("http://10.0.0.5:8000"), Some("10.0.0.5:7400"));
        assert_eq!(t.matched(&[]).await, Err("not connected".into()));
    }
}
