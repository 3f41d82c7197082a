//! The writer thread: appends demoted blocks to the current segment, indexes them, and rolls
//! to a new segment (dropping the oldest beyond the capacity) when one is full.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use anyhow::Context;
use kvcache_core::BlockKey;
use kvcache_core::disk_record::{BlockLocation, RecordHeader, index_key, segment_key};
use rocksdb::WriteBatch;

use crate::tier::disk::state::{HEADER, Shared};
use crate::tier::tier_checksum as checksum;

/// A block on its way to the writer thread.
pub(super) type Queued = (BlockKey, Arc<Vec<u8>>);

/// The writer thread's state: the segment being appended to.
pub(super) struct Writer {
    shared: Arc<Shared>,
    id: u64,
    file: Option<Arc<File>>,
    offset: u64,
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>, id: u64) -> Self {
        Self {
            shared,
            id,
            file: None,
            offset: 0,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Queued>) {
        for (key, bytes) in rx {
            if let Err(e) = self.append(key, &bytes) {
                self.shared.counters.errors.fetch_add(1, Relaxed);
                tracing::warn!(%key, error = %e, "cannot write a block to the disk tier; dropped");
                self.file = None; // start a fresh segment next time
            }
            let mut pending = self.shared.pending.lock();
            if pending.get(&key).is_some_and(|p| Arc::ptr_eq(p, &bytes)) {
                pending.remove(&key);
            }
        }
    }

    fn append(&mut self, key: BlockKey, bytes: &[u8]) -> anyhow::Result<()> {
        if self.shared.lookup(key).is_some() {
            return Ok(()); // still on disk from an earlier demotion
        }
        let record = HEADER + bytes.len() as u64;
        if self.file.is_none() || self.offset + record > self.shared.cfg.segment_bytes {
            self.roll()?;
        }
        let file = self.file.as_ref().expect("rolled");
        let sum = checksum(key, bytes);
        let header = RecordHeader {
            key,
            len: bytes.len() as u32,
            checksum: sum,
        };
        file.write_all_at(&header.encode(), self.offset)?;
        file.write_all_at(bytes, self.offset + HEADER)?;
        let loc = BlockLocation {
            segment: self.id,
            offset: self.offset + HEADER,
            len: bytes.len() as u32,
            checksum: sum,
        };
        let mut batch = WriteBatch::default();
        batch.put(index_key(key), loc.encode());
        batch.put(segment_key(self.id, key), []);
        self.shared.db.write(batch)?;
        self.offset += record;
        let c = &self.shared.counters;
        c.used_bytes.fetch_add(record, Relaxed);
        c.blocks.fetch_add(1, Relaxed);
        c.demoted_blocks.fetch_add(1, Relaxed);
        c.demoted_bytes.fetch_add(bytes.len() as u64, Relaxed);
        Ok(())
    }

    /// Starts a new segment, dropping the oldest ones beyond the capacity.
    fn roll(&mut self) -> anyhow::Result<()> {
        // Never reopen a segment that holds indexed blocks (after a write error the file is
        // dropped, but its id stays taken).
        if self.file.is_some() || self.shared.files.lock().contains_key(&self.id) {
            self.id += 1;
        }
        while self.shared.files.lock().len() >= self.shared.max_segments {
            self.shared.drop_oldest()?;
        }
        let path = self.shared.segment_path(self.id);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let file = Arc::new(file);
        self.shared.files.lock().insert(self.id, Arc::clone(&file));
        (self.file, self.offset) = (Some(file), 0);
        Ok(())
    }
}
