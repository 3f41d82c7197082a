//! Backends from etcd: the engines the vLLM connector registers (with `advertise` set) under
//! `ENGINES_PREFIX`, each record naming its URL, block size, lookup namespace and KV-event
//! endpoints. Read every second; an engine whose record appears joins the pool (and its KV
//! events are subscribed), one whose record expires is retired. An unreachable etcd changes
//! nothing: the gateway keeps routing to what it knew.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kvcache_membership::{ENGINES_PREFIX, Etcd};
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::{BackendConfig, backend_config};
use crate::feed::{self, Feed};
use crate::index::EngineId;
use crate::state::Gateway;

/// How often the registrations are read.
const PERIOD: Duration = Duration::from_secs(1);

/// An engine's record, as the connector writes it (unknown fields are ignored: newer
/// connectors may say more; a missing one is None).
#[derive(Debug, Deserialize, PartialEq)]
pub struct EngineRecord {
    pub url: String,
    pub model: Option<String>,
    pub role: Option<String>,
    pub block_size: Option<usize>,
    pub namespace: Option<String>,
    pub kv_events: Option<String>,
    pub kv_events_replay: Option<String>,
    pub kv_events_topic: Option<String>,
}

impl EngineRecord {
    /// The backend it describes.
    pub fn backend(&self) -> anyhow::Result<BackendConfig> {
        backend_config(
            &self.url,
            self.kv_events.clone(),
            self.kv_events_replay.clone(),
            self.kv_events_topic.clone(),
            self.namespace.as_deref(),
            self.block_size,
            self.role.as_deref(),
        )
    }
}

/// Keeps the pool in step with the engines registered in the etcd at `url`.
pub async fn run(gw: Arc<Gateway>, url: String) {
    let etcd = match Etcd::new(&url, Duration::from_secs(2)) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "invalid --discover etcd URL; no engines will be discovered");
            return;
        }
    };
    let mut feeds: HashMap<EngineId, Option<Feed>> = HashMap::new();
    let mut failing = false;
    let mut bad_said: HashSet<String> = HashSet::new();
    loop {
        match etcd.range_prefix(ENGINES_PREFIX).await {
            Ok(records) => {
                if failing {
                    info!(
                        etcd = etcd.addr(),
                        "etcd reachable again: engine discovery resumes"
                    );
                    failing = false;
                }
                let mut seen = HashSet::new();
                for (key, value) in records {
                    let parsed = serde_json::from_str::<EngineRecord>(&value)
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r.backend());
                    let config = match parsed {
                        Ok(c) => c,
                        Err(e) => {
                            if bad_said.insert(key.clone()) {
                                warn!(%key, error = %e, "ignoring an engine record that cannot be used");
                            }
                            continue;
                        }
                    };
                    let url = config.url.clone();
                    let (e, changed) = gw.pool.lock().upsert(config);
                    seen.insert(e);
                    if changed {
                        info!(backend = %url, %key, "engine discovered in etcd");
                        feeds.insert(e, feed::start_one(&gw, e));
                    }
                }
                let gone: Vec<EngineId> = feeds
                    .keys()
                    .copied()
                    .filter(|e| !seen.contains(e))
                    .collect();
                for e in gone {
                    feeds.remove(&e);
                    let url = {
                        let mut pool = gw.pool.lock();
                        pool.retire(e);
                        pool.get(e).config.url.clone()
                    };
                    gw.index.lock().clear(e);
                    info!(backend = %url, "engine's etcd record is gone: retired from routing");
                    gw.publish_backend(e);
                }
            }
            Err(e) => {
                if !failing {
                    warn!(etcd = etcd.addr(), error = %e,
                        "cannot read engine registrations; routing to the engines known so far");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connectors_record_becomes_a_backend() {
        let record: EngineRecord = serde_json::from_str(
            r#"{"url": "http://10.0.0.7:8000", "model": "tiny", "role": "kv_both",
                "block_size": 16, "namespace": "00112233445566778899aabbccddeeff",
                "kv_events": "tcp://10.0.0.7:5557", "kv_events_replay": null,
                "kv_events_topic": "kv", "some_future_field": 1}"#,
        )
        .unwrap();
        let b = record.backend().unwrap();
        assert_eq!(b.url, "http://10.0.0.7:8000");
        assert_eq!(b.block_size, 16);
        assert!(b.namespace.is_some());
        assert_eq!(b.kv_events.as_deref(), Some("tcp://10.0.0.7:5557"));
        let bad: EngineRecord = serde_json::from_str(r#"{"url": "ftp://x"}"#).unwrap();
        assert!(bad.backend().is_err());
    }
}
