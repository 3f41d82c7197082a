//! The disk tier (`--disk PATH`, cargo feature `disk`): blocks evicted from memory are appended
//! to segment files, RocksDB indexes them, and a read that misses memory brings them back up.
//!
//! Layout under PATH:
//! - `segments/NNNNNNNNNNNNNNNN.seg`: append-only files of at most `segment_bytes`, each record
//!   a 32-byte header (`KVD1`, the key, the length, the checksum) and the block's bytes. The
//!   headers make a segment readable without the index.
//! - `index/`: a RocksDB with `k<key>` → (segment, offset, length, checksum) and
//!   `s<segment><key>` → "" (which keys a segment holds, so dropping it is one prefix scan).
//!
//! The bytes of records, index keys and values are [`kvcache_core::disk_record`]'s (no I/O
//! there, so they are unit-tested and fuzzed without RocksDB).
//!
//! Eviction on disk is by whole segment, oldest first (FIFO): when a new segment would make
//! more than `capacity / segment_bytes`, the oldest file is deleted and its keys leave the index.
//! Large sequential writes and no per-block free space suit SSDs.
//!
//! Every read is checked: the bytes' xxh3 (seeded with the key) must match the index, else the
//! entry is deleted and the read is a miss. A restart finds the index and the segments again
//! (warm restart); index entries whose segment is gone are dropped when the tier opens. An index
//! RocksDB cannot open (corrupt, or torn by a crash) is moved aside to `index.broken-<time>` and
//! rebuilt from the segments' record headers, each record checked; a torn record ends its
//! segment. The tier is a cache: the node starts either way, and never serves a record that
//! fails its checksum.
//!
//! Tenants' KV is private: PATH's `segments/` and `index/` are made mode 0700 and segment files
//! are created 0600, so other users of the host read nothing.
//!
//! Demotion is asynchronous: the evicting thread copies the block into a bounded queue and one
//! writer thread appends it. When the queue is full the evicting thread waits, which slows puts
//! to the disk's pace instead of dropping blocks.
//!
//! The rooms: `config` ([`DiskConfig`]), `state` (the index, the segment files and the
//! counters readers and the writer share; open, rebuild, reconcile, drop a segment), `writer`
//! (the thread that appends and rolls segments), and this file (the tier: demote, read, stats).

mod config;
mod state;
mod writer;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use anyhow::Context;
use kvcache_core::BlockKey;
use kvcache_core::disk_record::index_key;
use parking_lot::Mutex;

pub use self::config::DiskConfig;
use self::state::{Counters, HEADER, Shared, open_index, private_dir, segment_id};
use self::writer::{Queued, Writer};
use crate::tier::{LowerTier, TierStats, tier_checksum as checksum};

/// Blocks waiting for the writer.
const QUEUE: usize = 64;

/// The disk tier. Attach it under a store with [`Store::attach_lower`](crate::store::Store).
pub struct DiskTier {
    shared: Arc<Shared>,
    queue: Mutex<Option<mpsc::SyncSender<Queued>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl DiskTier {
    /// Opens (or creates) the tier at `cfg.path` and finds the blocks a previous run left.
    pub fn open(cfg: DiskConfig) -> anyhow::Result<Arc<Self>> {
        if cfg.capacity < 2 * cfg.segment_bytes {
            anyhow::bail!(
                "--disk-capacity must hold at least two segments of {} bytes",
                cfg.segment_bytes
            );
        }
        let segments_dir = cfg.path.join("segments");
        let index = cfg.path.join("index");
        private_dir(&segments_dir)?;
        private_dir(&index)?;
        let (db, rebuild) = open_index(&index)?;
        let mut files = BTreeMap::new();
        let mut used = 0;
        for entry in fs::read_dir(&segments_dir)? {
            let path = entry?.path();
            let Some(id) = segment_id(&path) else {
                continue;
            };
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            used += file.metadata()?.len();
            files.insert(id, Arc::new(file));
        }
        let shared = Arc::new(Shared {
            segments_dir,
            db,
            max_segments: (cfg.capacity / cfg.segment_bytes) as usize,
            cfg,
            files: Mutex::new(files),
            pending: Mutex::default(),
            counters: Counters::default(),
        });
        shared.counters.used_bytes.store(used, Relaxed);
        if rebuild {
            shared.rebuild()?;
        }
        let blocks = shared.reconcile()?;
        let next = shared
            .files
            .lock()
            .keys()
            .next_back()
            .map_or(0, |id| id + 1);
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("kvcache-disk".into())
            .spawn(move || Writer::new(writer_shared, next).run(rx))?;
        tracing::info!(
            path = %shared.cfg.path.display(),
            blocks,
            used = %kvcache_core::ByteSize(used),
            capacity = %kvcache_core::ByteSize(shared.cfg.capacity),
            "disk tier open"
        );
        Ok(Arc::new(Self {
            shared,
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        }))
    }
}

impl LowerTier for DiskTier {
    fn demote(&self, key: BlockKey, bytes: &[u8]) {
        if HEADER + bytes.len() as u64 > self.shared.cfg.segment_bytes {
            self.shared.counters.skipped_blocks.fetch_add(1, Relaxed);
            return;
        }
        let queue = self.queue.lock().clone();
        if let Some(tx) = queue {
            if self.shared.pending.lock().contains_key(&key) {
                return;
            }
            let bytes = Arc::new(bytes.to_vec());
            self.shared.pending.lock().insert(key, Arc::clone(&bytes));
            // Blocks while the writer is QUEUE blocks behind: back-pressure, not loss.
            let _ = tx.send((key, bytes));
        }
    }

    fn len_of(&self, key: BlockKey) -> Option<usize> {
        if let Some(p) = self.shared.pending.lock().get(&key) {
            return Some(p.len());
        }
        let loc = self.shared.lookup(key)?;
        self.shared
            .files
            .lock()
            .contains_key(&loc.segment)
            .then_some(loc.len as usize)
    }

    fn read_into(&self, key: BlockKey, dst: &mut [u8]) -> bool {
        let shared = &self.shared;
        if let Some(p) = shared.pending.lock().get(&key).cloned() {
            if p.len() != dst.len() {
                return false;
            }
            dst.copy_from_slice(&p);
            shared.counters.read_blocks.fetch_add(1, Relaxed);
            return true;
        }
        let Some(loc) = shared.lookup(key) else {
            return false;
        };
        // The segment may be dropped meanwhile; the open handle still reads its bytes.
        let Some(file) = shared.files.lock().get(&loc.segment).cloned() else {
            return false;
        };
        let ok = loc.len as usize == dst.len()
            && file.read_exact_at(dst, loc.offset).is_ok()
            && checksum(key, dst) == loc.checksum;
        if ok {
            shared.counters.read_blocks.fetch_add(1, Relaxed);
        } else {
            shared.counters.corrupt_blocks.fetch_add(1, Relaxed);
            tracing::warn!(%key, segment = loc.segment, "a block on disk failed verification; dropped, read as a miss");
            let _ = shared.db.delete(index_key(key));
        }
        ok
    }

    fn flush(&self) {
        drop(self.queue.lock().take());
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        if let Err(e) = self.shared.db.flush() {
            tracing::warn!(error = %e, "cannot flush the disk index");
        }
    }

    fn stats(&self) -> Vec<TierStats> {
        let c = &self.shared.counters;
        vec![TierStats {
            name: "disk",
            capacity_bytes: self.shared.cfg.capacity,
            used_bytes: c.used_bytes.load(Relaxed),
            blocks: c.blocks.load(Relaxed),
            demoted_blocks: c.demoted_blocks.load(Relaxed),
            demoted_bytes: c.demoted_bytes.load(Relaxed),
            skipped_blocks: c.skipped_blocks.load(Relaxed),
            read_blocks: c.read_blocks.load(Relaxed),
            corrupt_blocks: c.corrupt_blocks.load(Relaxed),
            dropped_segments: c.dropped_segments.load(Relaxed),
            errors: c.errors.load(Relaxed),
        }]
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests;
