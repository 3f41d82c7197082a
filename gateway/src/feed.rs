//! Keeps the prefix index exact from each engine's KV events: one subscriber per backend that
//! publishes them (`events::subscribe`), its updates applied here in order.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::events::{self, KvEvent, Update};
use crate::index::{EngineId, StoreError};
use crate::pool::adapter_namespace;
use crate::state::Gateway;

/// Starts the subscriber of every configured backend with `kv_events`.
pub fn start(gw: &Arc<Gateway>) -> Vec<Option<Feed>> {
    let n = gw.pool.lock().backends().len() as EngineId;
    (0..n).map(|e| start_one(gw, e)).collect()
}

/// A running subscription; dropping it stops the subscriber.
pub struct Feed {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        // The apply loop owns the receiver: ending it closes the channel, which stops the
        // subscriber.
        self.task.abort();
    }
}

/// Starts backend `e`'s subscriber if it publishes KV events (forgetting what the index held
/// for it), and says where its index entries come from.
pub fn start_one(gw: &Arc<Gateway>, e: EngineId) -> Option<Feed> {
    let b = gw.pool.lock().get(e).config.clone();
    gw.index.lock().clear(e);
    gw.metrics.set_index_source(&b.url, b.kv_events.is_some());
    let Some(endpoint) = b.kv_events else {
        info!(backend = %b.url, ttl = ?gw.config.learned_ttl,
            "no kv_events for this backend: its cache is learned from routing decisions, with a time-to-live");
        return None;
    };
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(events::subscribe(
        endpoint,
        b.kv_events_topic.clone(),
        b.kv_events_replay.clone(),
        tx,
    ));
    Some(Feed {
        task: tokio::spawn(apply_loop(gw.clone(), e, rx)),
    })
}

async fn apply_loop(gw: Arc<Gateway>, e: EngineId, mut rx: mpsc::Receiver<Update>) {
    while let Some(update) = rx.recv().await {
        apply(&gw, e, update);
    }
}

/// Applies one update of engine `e` to the index and counts it.
pub fn apply(gw: &Gateway, e: EngineId, update: Update) {
    let (url, ns, block_size) = {
        let pool = gw.pool.lock();
        let b = pool.get(e);
        (b.config.url.clone(), b.index_namespace, b.config.block_size)
    };
    let batch = match update {
        Update::Batch(batch) => batch,
        Update::Resync { reason } => {
            gw.index.lock().clear(e);
            gw.metrics.kv_events(&url, "resync", 1);
            info!(backend = %url, %reason, "KV events lost: forgot this engine's blocks until it reports them again");
            return;
        }
    };
    if batch.unknown > 0 {
        gw.metrics.kv_events(&url, "unknown", batch.unknown as u64);
    }
    let mut index = gw.index.lock();
    for event in batch.events {
        match event {
            KvEvent::Stored {
                hashes,
                parent,
                token_ids,
                block_size: event_block_size,
                lora_name,
                ..
            } => {
                if event_block_size != block_size {
                    warn!(backend = %url, configured = block_size, reported = event_block_size,
                        "the engine's block size differs from the backend's block_size setting; event skipped");
                    gw.metrics.kv_events(&url, "unchained", 1);
                    continue;
                }
                // An adapter's KV differs from the base model's for the same tokens: its
                // blocks are keyed in a namespace of their own.
                let (ns, kind) = match &lora_name {
                    Some(adapter) => (adapter_namespace(ns, adapter), "stored_lora"),
                    None => (ns, "stored"),
                };
                match index.stored(e, ns, parent, &hashes, &token_ids, block_size) {
                    Ok(_) => gw.metrics.kv_events(&url, kind, 1),
                    Err(StoreError::UnknownParent) => {
                        debug!(backend = %url, "stored blocks after an unknown parent; skipped");
                        gw.metrics.kv_events(&url, "unchained", 1);
                    }
                    Err(err) => {
                        warn!(backend = %url, error = %err, "malformed BlockStored event; skipped");
                        gw.metrics.kv_events(&url, "unchained", 1);
                    }
                }
            }
            KvEvent::Removed { hashes, .. } => {
                index.removed(e, &hashes);
                gw.metrics.kv_events(&url, "removed", 1);
            }
            KvEvent::Cleared => {
                index.clear(e);
                gw.metrics.kv_events(&url, "cleared", 1);
            }
        }
    }
    drop(index);
    gw.publish_index();
}
