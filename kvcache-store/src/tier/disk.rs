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

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::Context;
use kvcache_core::BlockKey;
use kvcache_core::disk_record::{
    BlockLocation, RECORD_HEADER_LEN, RecordHeader, decode_segment_key, index_key, segment_key,
    segment_prefix,
};
use parking_lot::Mutex;
use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch};

use crate::tier::{LowerTier, TierStats, tier_checksum as checksum};

/// A RocksDB key and value.
type IndexEntry = (Box<[u8]>, Box<[u8]>);

/// Record header: magic, key (16), length (4), checksum (8); its bytes are
/// [`RecordHeader`]'s.
const HEADER: u64 = RECORD_HEADER_LEN as u64;
/// Blocks waiting for the writer.
const QUEUE: usize = 64;

/// Where the tier lives and how much it may hold.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Bytes of segment files at most.
    pub capacity: u64,
    /// Size of one segment file; blocks larger than this are not demoted.
    pub segment_bytes: u64,
}

impl DiskConfig {
    /// Segments of 64 MiB, or a quarter of the capacity when that is smaller (at least 1 MiB).
    pub fn new(path: PathBuf, capacity: u64) -> Self {
        let segment_bytes = (capacity / 4).clamp(1 << 20, 64 << 20);
        Self {
            path,
            capacity,
            segment_bytes,
        }
    }
}

/// Counters, also reported through [`TierStats`].
#[derive(Default)]
struct Counters {
    used_bytes: AtomicU64,
    blocks: AtomicU64,
    demoted_blocks: AtomicU64,
    demoted_bytes: AtomicU64,
    skipped_blocks: AtomicU64,
    read_blocks: AtomicU64,
    corrupt_blocks: AtomicU64,
    dropped_segments: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    segments_dir: PathBuf,
    db: DB,
    cfg: DiskConfig,
    max_segments: usize,
    /// Live segments, oldest first, open for reading.
    files: Mutex<BTreeMap<u64, Arc<File>>>,
    /// Blocks queued for the writer: readable from here until they are indexed.
    pending: Mutex<std::collections::HashMap<BlockKey, Arc<Vec<u8>>>>,
    counters: Counters,
}

/// A block on its way to the writer thread.
type Queued = (BlockKey, Arc<Vec<u8>>);

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

/// Creates `dir` (and its parents) if needed and makes it mode 0700: the tier's files hold
/// tenants' KV.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
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
fn open_index(index: &Path) -> anyhow::Result<(DB, bool)> {
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
fn segment_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
}

impl Shared {
    fn segment_path(&self, id: u64) -> PathBuf {
        self.segments_dir.join(format!("{id:016x}.seg"))
    }

    fn lookup(&self, key: BlockKey) -> Option<BlockLocation> {
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
    fn scan<'a>(
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
    fn rebuild(&self) -> anyhow::Result<()> {
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
    fn reconcile(&self) -> anyhow::Result<u64> {
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
    fn drop_oldest(&self) -> anyhow::Result<()> {
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

/// The writer thread's state: the segment being appended to.
struct Writer {
    shared: Arc<Shared>,
    id: u64,
    file: Option<Arc<File>>,
    offset: u64,
}

impl Writer {
    fn new(shared: Arc<Shared>, id: u64) -> Self {
        Self {
            shared,
            id,
            file: None,
            offset: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Queued>) {
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
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvcache-disk-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn bytes(key: BlockKey, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (key.low64() as usize + i * 7) as u8)
            .collect()
    }

    fn read(t: &DiskTier, key: BlockKey) -> Option<Vec<u8>> {
        let mut buf = vec![0; t.len_of(key)?];
        t.read_into(key, &mut buf).then_some(buf)
    }

    #[test]
    fn blocks_survive_a_reopen_and_a_corrupt_one_is_a_miss() {
        let d = dir("reopen");
        let cfg = DiskConfig::new(d.clone(), 16 << 20);
        let keys: Vec<BlockKey> = (1..=50).map(|i| BlockKey(i * 1_000_003)).collect();
        {
            let t = DiskTier::open(cfg.clone()).unwrap();
            for &k in &keys {
                t.demote(k, &bytes(k, 10_000));
            }
            t.flush();
            assert_eq!(t.stats()[0].blocks, 50);
        }
        let t = DiskTier::open(cfg).unwrap();
        for &k in &keys {
            assert_eq!(read(&t, k), Some(bytes(k, 10_000)), "{k} after reopening");
        }
        assert_eq!(read(&t, BlockKey(7)), None);
        // Flip a byte of one block on disk: its read fails verification and it is forgotten.
        let loc = t.shared.lookup(keys[3]).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(t.shared.segment_path(loc.segment))
            .unwrap();
        f.write_all_at(&[0xff ^ bytes(keys[3], 1)[0]], loc.offset)
            .unwrap();
        assert_eq!(read(&t, keys[3]), None);
        assert_eq!(t.len_of(keys[3]), None);
        assert_eq!(t.stats()[0].corrupt_blocks, 1);
        drop(t);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_broken_index_and_a_torn_segment_leave_the_intact_blocks_readable() {
        let d = dir("broken");
        // Segments of 1 MiB: 60 blocks of 100 KB fill six of them.
        let cfg = DiskConfig {
            segment_bytes: 1 << 20,
            ..DiskConfig::new(d.clone(), 16 << 20)
        };
        let keys: Vec<BlockKey> = (1..=60).map(|i| BlockKey(i * 104_729)).collect();
        let last_segment;
        {
            let t = DiskTier::open(cfg.clone()).unwrap();
            for &k in &keys {
                t.demote(k, &bytes(k, 100_000));
            }
            t.demote(keys[0], &bytes(keys[0], 100_000)); // already on disk: not written twice
            t.flush();
            last_segment = *t.shared.files.lock().keys().next_back().unwrap();
            assert!(last_segment >= 5);
        }
        // What a crash mid-demotion and a damaged index leave: the newest segment ends halfway
        // through a record, and RocksDB's CURRENT names no manifest.
        let seg = d.join("segments").join(format!("{last_segment:016x}.seg"));
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 50_000)
            .unwrap();
        fs::write(d.join("index").join("CURRENT"), b"MANIFEST-999999\n").unwrap();

        let cfg_again = cfg.clone();
        let t = DiskTier::open(cfg).unwrap();
        let held: Vec<bool> = keys.iter().map(|&k| read(&t, k).is_some()).collect();
        let last = keys.len() - 1;
        assert!(!held[last], "the torn record is not served");
        assert!(
            held[..last].iter().all(|h| *h),
            "every intact block: {held:?}"
        );
        for &k in &keys[..last] {
            assert_eq!(read(&t, k), Some(bytes(k, 100_000)));
        }
        assert_eq!(t.stats()[0].blocks as usize, last);
        assert_eq!(t.stats()[0].corrupt_blocks, 0);
        let aside: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("index.broken-"))
            .collect();
        assert_eq!(
            aside.len(),
            1,
            "the broken index is kept aside for inspection"
        );
        // New demotions go on into a fresh segment, and survive a normal reopen.
        t.demote(BlockKey(5), &bytes(BlockKey(5), 1000));
        t.flush();
        drop(t);
        let t = DiskTier::open(cfg_again).unwrap();
        assert_eq!(read(&t, BlockKey(5)), Some(bytes(BlockKey(5), 1000)));
        assert_eq!(read(&t, keys[1]), Some(bytes(keys[1], 100_000)));
        drop(t);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_tiers_files_are_private_to_the_node() {
        let d = dir("modes");
        fs::create_dir_all(d.join("segments")).unwrap();
        fs::set_permissions(d.join("segments"), fs::Permissions::from_mode(0o755)).unwrap();
        let t = DiskTier::open(DiskConfig::new(d.clone(), 4 << 20)).unwrap();
        t.demote(BlockKey(9), &bytes(BlockKey(9), 1000));
        t.flush();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&d.join("segments")),
            0o700,
            "an existing directory is made private"
        );
        assert_eq!(mode(&d.join("index")), 0o700);
        for e in fs::read_dir(d.join("segments")).unwrap() {
            assert_eq!(mode(&e.unwrap().path()), 0o600);
        }
        drop(t);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_full_disk_drops_whole_segments_oldest_first() {
        let d = dir("full");
        // 4 segments of 1 MiB; 300 blocks of 40 KiB is about 12 MiB.
        let t = DiskTier::open(DiskConfig::new(d.clone(), 4 << 20)).unwrap();
        let keys: Vec<BlockKey> = (1..=300).map(|i| BlockKey(i * 7919)).collect();
        for &k in &keys {
            t.demote(k, &bytes(k, 40 << 10));
        }
        t.flush();
        let s = t.stats().remove(0);
        assert!(s.used_bytes <= 4 << 20, "{s:?}");
        assert!(s.dropped_segments >= 8, "{s:?}");
        let held: Vec<bool> = keys.iter().map(|&k| read(&t, k).is_some()).collect();
        let first_held = held.iter().position(|h| *h).unwrap();
        assert!(
            held[first_held..].iter().all(|h| *h),
            "the newest blocks stay, in one run"
        );
        assert_eq!(s.blocks as usize, keys.len() - first_held);
        for &k in &keys[first_held..] {
            assert_eq!(read(&t, k), Some(bytes(k, 40 << 10)));
        }
        // A block bigger than a segment is not written at all.
        t.demote(BlockKey(1), &[0; 2 << 20]);
        assert_eq!(t.stats()[0].skipped_blocks, 1);
        drop(t);
        fs::remove_dir_all(d).unwrap();
    }
}
