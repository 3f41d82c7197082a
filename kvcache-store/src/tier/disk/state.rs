//! The tier's state that readers and the writer thread share: the RocksDB index, the open
//! segment files and the counters; and what opening, rebuilding, reconciling and dropping a
//! segment do to them.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::Context;
use kvcache_core::BlockKey;
use kvcache_core::disk_record::{
    BlockLocation, RECORD_HEADER_LEN, RecordHeader, decode_segment_key, index_key, segment_key,
    segment_prefix,
};
use parking_lot::Mutex;
use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch};

use crate::tier::disk::config::DiskConfig;
use crate::tier::tier_checksum as checksum;

/// A RocksDB key and value.
type IndexEntry = (Box<[u8]>, Box<[u8]>);

/// Record header: magic, key (16), length (4), checksum (8); its bytes are
/// [`RecordHeader`]'s.
pub(super) const HEADER: u64 = RECORD_HEADER_LEN as u64;

/// Counters, also reported through [`TierStats`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) used_bytes: AtomicU64,
    pub(super) blocks: AtomicU64,
    pub(super) demoted_blocks: AtomicU64,
    pub(super) demoted_bytes: AtomicU64,
    pub(super) skipped_blocks: AtomicU64,
    pub(super) read_blocks: AtomicU64,
    pub(super) corrupt_blocks: AtomicU64,
    pub(super) dropped_segments: AtomicU64,
    pub(super) errors: AtomicU64,
}

pub(super) struct Shared {
    pub(super) segments_dir: PathBuf,
    pub(super) db: DB,
    pub(super) cfg: DiskConfig,
    pub(super) max_segments: usize,
    /// Live segments, oldest first, open for reading.
    pub(super) files: Mutex<BTreeMap<u64, Arc<File>>>,
    /// Blocks queued for the writer: readable from here until they are indexed.
    pub(super) pending: Mutex<HashMap<BlockKey, Arc<Vec<u8>>>>,
    pub(super) counters: Counters,
}

/// Creates `dir` (and its parents) if needed and makes it mode 0700: the tier's files hold
/// tenants' KV.
pub(super) fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private (mode 0700)", dir.display()))
}

/// Opens the index, or, when RocksDB cannot open it, moves it aside and opens a fresh one; the
/// flag says the fresh index must be rebuilt from the segments.
pub(super) fn open_index(index: &Path) -> anyhow::Result<(DB, bool)> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    let error = match DB::open(&opts, index) {
        Ok(db) => return Ok((db, false)),
        Err(e) => e,
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = index.with_file_name(format!("index.broken-{secs}"));
    tracing::error!(
        index = %index.display(),
        moved_to = %aside.display(),
        %error,
        "cannot open the disk index; moving it aside and rebuilding it from the segments"
    );
    fs::rename(index, &aside).with_context(|| {
        format!(
            "cannot open the disk index at {} ({error}) nor move it aside",
            index.display()
        )
    })?;
    private_dir(index)?;
    let db = DB::open(&opts, index).with_context(|| {
        format!(
            "cannot create a fresh disk index at {} (the broken one is at {})",
            index.display(),
            aside.display()
        )
    })?;
    Ok((db, true))
}

/// `NNNN.seg` → NNNN.
pub(super) fn segment_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
}

impl Shared {
    pub(super) fn segment_path(&self, id: u64) -> PathBuf {
        self.segments_dir.join(format!("{id:016x}.seg"))
    }

    pub(super) fn lookup(&self, key: BlockKey) -> Option<BlockLocation> {
        match self.db.get_pinned(index_key(key)) {
            Ok(v) => BlockLocation::decode(&v?).ok(),
            Err(e) => {
                self.counters.errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "disk index read failed");
                None
            }
        }
    }

    /// The index entries whose keys start with `prefix`, in key order; an error ends the scan.
    pub(super) fn scan<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<IndexEntry, rocksdb::Error>> + 'a {
        self.db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
            .take_while(move |item| !matches!(item, Ok((k, _)) if !k.starts_with(prefix)))
    }

    /// Indexes every intact record of every segment, oldest segment first so a key demoted
    /// again later points at its newest copy. A record whose header or checksum fails ends its
    /// segment's scan (a write torn by a crash); its bytes are never indexed.
    pub(super) fn rebuild(&self) -> anyhow::Result<()> {
        let files: Vec<(u64, Arc<File>)> = self
            .files
            .lock()
            .iter()
            .map(|(id, f)| (*id, Arc::clone(f)))
            .collect();
        let (mut records, mut torn) = (0u64, 0u64);
        for (id, file) in files {
            let len = file.metadata()?.len();
            let mut batch = WriteBatch::default();
            let mut offset = 0;
            let mut header = [0u8; RECORD_HEADER_LEN];
            let mut bytes = Vec::new();
            while offset + HEADER <= len {
                let Some(h) = file
                    .read_exact_at(&mut header, offset)
                    .ok()
                    .and_then(|()| RecordHeader::decode(&header).ok())
                else {
                    break;
                };
                let at = offset + HEADER;
                if at + u64::from(h.len) > len {
                    break;
                }
                bytes.resize(h.len as usize, 0);
                if file.read_exact_at(&mut bytes, at).is_err()
                    || checksum(h.key, &bytes) != h.checksum
                {
                    break;
                }
                let loc = BlockLocation {
                    segment: id,
                    offset: at,
                    len: h.len,
                    checksum: h.checksum,
                };
                batch.put(index_key(h.key), loc.encode());
                batch.put(segment_key(id, h.key), []);
                records += 1;
                offset = at + u64::from(h.len);
            }
            if offset < len {
                torn += 1;
                tracing::warn!(
                    segment = id,
                    at = offset,
                    bytes = len,
                    "a segment ends in a torn or corrupt record; the rest of it is not indexed"
                );
            }
            self.db.write(batch)?;
        }
        tracing::info!(
            records,
            torn_segments = torn,
            "rebuilt the disk index from the segments"
        );
        Ok(())
    }

    /// Drops index entries whose segment is gone (a crash between deleting a segment and its
    /// entries); returns the blocks indexed.
    pub(super) fn reconcile(&self) -> anyhow::Result<u64> {
        let live: Vec<u64> = self.files.lock().keys().copied().collect();
        let mut stale = WriteBatch::default();
        let mut blocks = 0;
        for item in self.scan(b"k") {
            let (k, v) = item?;
            match BlockLocation::decode(&v) {
                Ok(loc) if live.binary_search(&loc.segment).is_ok() => blocks += 1,
                _ => stale.delete(&k),
            }
        }
        for item in self.scan(b"s") {
            let (k, _) = item?;
            match decode_segment_key(&k) {
                Ok((id, _)) if live.binary_search(&id).is_ok() => {}
                _ => stale.delete(&k),
            }
        }
        if !stale.is_empty() {
            tracing::info!(
                entries = stale.len(),
                "dropping disk index entries of missing segments"
            );
            self.db.write(stale)?;
        }
        self.counters.blocks.store(blocks, Relaxed);
        Ok(blocks)
    }

    /// Deletes the oldest segment and its index entries.
    pub(super) fn drop_oldest(&self) -> anyhow::Result<()> {
        let Some((id, file)) = self.files.lock().pop_first() else {
            return Ok(());
        };
        let size = file.metadata().map_or(0, |m| m.len());
        let prefix = segment_prefix(id);
        let mut batch = WriteBatch::default();
        let mut gone = 0;
        for item in self.scan(&prefix) {
            let (k, _) = item?;
            let (_, key) = decode_segment_key(&k).context("bad segment entry")?;
            // A key demoted again later lives in a newer segment: keep that entry.
            if self.lookup(key).is_some_and(|loc| loc.segment == id) {
                batch.delete(index_key(key));
                gone += 1;
            }
        }
        batch.delete_range(prefix, segment_prefix(id + 1));
        self.db.write(batch)?;
        fs::remove_file(self.segment_path(id))?;
        self.counters.used_bytes.fetch_sub(size, Relaxed);
        self.counters.blocks.fetch_sub(gone, Relaxed);
        self.counters.dropped_segments.fetch_add(1, Relaxed);
        tracing::debug!(
            segment = id,
            blocks = gone,
            "disk full: dropped the oldest segment"
        );
        Ok(())
    }
}
