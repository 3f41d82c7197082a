//! The GPU tier (`--gpu-tier SIZE`, cargo feature `cuda`): spare device memory under the host
//! pool. Blocks evicted from memory are copied to the GPU; a read that misses memory copies them
//! back and checks them. With `--disk` as well, blocks the GPU tier evicts go on down to disk, so
//! the order is memory, GPU, disk.
//!
//! The device memory is one allocation used as a circular log: a block is appended after the
//! newest one, and the oldest blocks in the way are evicted (FIFO), which needs no free-space
//! management on the device. Every block carries an xxh3 checksum seeded with its key, taken from
//! the verified block when it left memory and checked again after every copy back: the GPU tier
//! returns the bytes it was given or a miss. Device memory does not survive a restart; on
//! shutdown the tier hands its blocks to the disk tier when there is one.
//!
//! The log's bookkeeping is generic over [`TierMemory`] so it is tested on host memory on machines
//! without a GPU; the device itself is reached only through [`DeviceMemory`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kvcache_core::BlockKey;
use kvcache_transport::cuda::{CudaError, DeviceBuffer, Gpu};
use parking_lot::Mutex;

use crate::tier::{LowerTier, TierStats, tier_checksum};

/// Memory the log lives in.
pub trait TierMemory: Send + 'static {
    /// Size in bytes.
    fn size(&self) -> usize;
    /// Copies `src` to `offset`; done when this returns.
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), CudaError>;
    /// Copies `dst.len()` bytes from `offset` into `dst`; done when this returns.
    fn read(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError>;
}

/// One allocation on a GPU.
pub struct DeviceMemory {
    gpu: Gpu,
    buf: DeviceBuffer,
}

impl DeviceMemory {
    /// Opens GPU `ordinal` and allocates `bytes` on it.
    pub fn open(ordinal: usize, bytes: usize) -> Result<Self, CudaError> {
        let gpu = Gpu::open(ordinal)?;
        let buf = gpu.alloc(bytes)?;
        Ok(Self { gpu, buf })
    }

    /// The GPU the memory is on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
}

impl TierMemory for DeviceMemory {
    fn size(&self) -> usize {
        self.buf.len()
    }

    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        self.gpu.upload_at(src, &mut self.buf, offset)?;
        self.gpu.synchronize()
    }

    fn read(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        self.gpu.download_at(&self.buf, offset, dst)?;
        self.gpu.synchronize()
    }
}

/// Where a block lies in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rec {
    offset: usize,
    len: usize,
    checksum: u64,
}

impl Rec {
    fn overlaps(&self, offset: usize, len: usize) -> bool {
        self.offset < offset + len && offset < self.offset + self.len
    }
}

/// The circular log: blocks in insertion order, oldest first.
struct Log<M> {
    mem: M,
    /// Where the next block goes.
    head: usize,
    order: VecDeque<(BlockKey, Rec)>,
    index: HashMap<BlockKey, Rec>,
    used: usize,
}

impl<M: TierMemory> Log<M> {
    /// Takes the blocks that must leave for `len` bytes to go at the head, oldest first, and
    /// returns where the new block goes.
    fn make_room(&mut self, len: usize, evicted: &mut Vec<(BlockKey, Rec)>) -> usize {
        let mut at = self.head;
        if at + len > self.mem.size() {
            // Wrap: what lies between the head and the end is the oldest; it goes first.
            while let Some(&(_, r)) = self.order.front() {
                if r.offset < self.head {
                    break;
                }
                evicted.push(self.pop_oldest());
            }
            at = 0;
        }
        while let Some(&(_, r)) = self.order.front() {
            if !r.overlaps(at, len) {
                break;
            }
            evicted.push(self.pop_oldest());
        }
        at
    }

    fn pop_oldest(&mut self) -> (BlockKey, Rec) {
        self.remove_at(0).expect("a block to evict")
    }

    /// Forgets the block at position `pos` of the insertion order.
    fn remove_at(&mut self, pos: usize) -> Option<(BlockKey, Rec)> {
        let (key, rec) = self.order.remove(pos)?;
        self.index.remove(&key);
        self.used -= rec.len;
        Some((key, rec))
    }
}

/// Counters, reported through [`TierStats`].
#[derive(Default)]
struct Counters {
    demoted_blocks: AtomicU64,
    demoted_bytes: AtomicU64,
    skipped_blocks: AtomicU64,
    read_blocks: AtomicU64,
    corrupt_blocks: AtomicU64,
    errors: AtomicU64,
}

/// The GPU tier. Attach it under a store with [`Store::attach_lower`](crate::store::Store).
pub struct GpuTier<M: TierMemory = DeviceMemory> {
    log: Mutex<Log<M>>,
    /// Where evicted blocks go next (the disk tier), if anywhere.
    below: Option<Arc<dyn LowerTier>>,
    counters: Counters,
}

impl<M: TierMemory> GpuTier<M> {
    /// A tier over `mem`, handing what it evicts to `below`.
    pub fn new(mem: M, below: Option<Arc<dyn LowerTier>>) -> Arc<Self> {
        Arc::new(Self {
            log: Mutex::new(Log {
                mem,
                head: 0,
                order: VecDeque::new(),
                index: HashMap::new(),
                used: 0,
            }),
            below,
            counters: Counters::default(),
        })
    }

    /// Blocks larger than this go straight past the GPU tier: one block may not flush a large
    /// part of the log.
    fn max_block(log: &Log<M>) -> usize {
        log.mem.size() / 4
    }

    /// Reads a block out of the log and checks it; `None` (and the block forgotten) if the copy
    /// failed or the bytes are not what went in.
    fn read_checked(&self, log: &mut Log<M>, key: BlockKey, rec: Rec, dst: &mut [u8]) -> bool {
        let ok = match log.mem.read(rec.offset, dst) {
            Ok(()) => tier_checksum(key, dst) == rec.checksum,
            Err(e) => {
                self.counters.errors.fetch_add(1, Relaxed);
                tracing::warn!(%key, error = %e, "GPU tier read failed");
                false
            }
        };
        if !ok {
            self.counters.corrupt_blocks.fetch_add(1, Relaxed);
            tracing::warn!(%key, "a block in the GPU tier failed verification; dropped, read as a miss");
            // Absent when the block was read on its way out (already evicted).
            if let Some(pos) = log.order.iter().position(|(k, _)| *k == key) {
                log.remove_at(pos);
            }
        }
        ok
    }

    /// Hands evicted blocks to the tier below, each checked on its way out.
    fn pass_down(&self, log: &mut Log<M>, evicted: Vec<(BlockKey, Rec)>) {
        let Some(below) = &self.below else {
            return;
        };
        for (key, rec) in evicted {
            let mut bytes = vec![0u8; rec.len];
            if self.read_checked(log, key, rec, &mut bytes) {
                below.demote(key, &bytes);
            }
        }
    }
}

impl<M: TierMemory> LowerTier for GpuTier<M> {
    fn demote(&self, key: BlockKey, bytes: &[u8]) {
        let mut log = self.log.lock();
        if log.index.contains_key(&key) {
            return;
        }
        if bytes.len() > Self::max_block(&log) {
            self.counters.skipped_blocks.fetch_add(1, Relaxed);
            drop(log);
            if let Some(below) = &self.below {
                below.demote(key, bytes);
            }
            return;
        }
        let mut evicted = Vec::new();
        let at = log.make_room(bytes.len(), &mut evicted);
        // The evicted blocks are read out before the new one overwrites them.
        self.pass_down(&mut log, evicted);
        if let Err(e) = log.mem.write(at, bytes) {
            self.counters.errors.fetch_add(1, Relaxed);
            tracing::warn!(%key, error = %e, "GPU tier write failed; block dropped");
            return;
        }
        let rec = Rec {
            offset: at,
            len: bytes.len(),
            checksum: tier_checksum(key, bytes),
        };
        log.head = at + bytes.len();
        log.order.push_back((key, rec));
        log.index.insert(key, rec);
        log.used += rec.len;
        self.counters.demoted_blocks.fetch_add(1, Relaxed);
        self.counters
            .demoted_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
    }

    fn len_of(&self, key: BlockKey) -> Option<usize> {
        if let Some(rec) = self.log.lock().index.get(&key) {
            return Some(rec.len);
        }
        self.below.as_ref()?.len_of(key)
    }

    fn read_into(&self, key: BlockKey, dst: &mut [u8]) -> bool {
        {
            let mut log = self.log.lock();
            if let Some(rec) = log.index.get(&key).copied() {
                if rec.len != dst.len() {
                    return false;
                }
                let ok = self.read_checked(&mut log, key, rec, dst);
                if ok {
                    self.counters.read_blocks.fetch_add(1, Relaxed);
                }
                return ok;
            }
        }
        self.below.as_ref().is_some_and(|b| b.read_into(key, dst))
    }

    fn flush(&self) {
        if let Some(below) = &self.below {
            // Device memory is gone after exit: what the disk can keep goes down first.
            let mut log = self.log.lock();
            let all: Vec<_> = log.order.iter().copied().collect();
            let blocks = all.len();
            self.pass_down(&mut log, all);
            drop(log);
            tracing::info!(blocks, "GPU tier written down to the disk tier");
            below.flush();
        }
    }

    fn stats(&self) -> Vec<TierStats> {
        let log = self.log.lock();
        let c = &self.counters;
        let mut out = vec![TierStats {
            name: "gpu",
            capacity_bytes: log.mem.size() as u64,
            used_bytes: log.used as u64,
            blocks: log.order.len() as u64,
            demoted_blocks: c.demoted_blocks.load(Relaxed),
            demoted_bytes: c.demoted_bytes.load(Relaxed),
            skipped_blocks: c.skipped_blocks.load(Relaxed),
            read_blocks: c.read_blocks.load(Relaxed),
            corrupt_blocks: c.corrupt_blocks.load(Relaxed),
            dropped_segments: 0,
            errors: c.errors.load(Relaxed),
        }];
        drop(log);
        if let Some(below) = &self.below {
            out.extend(below.stats());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log on host memory, to test its bookkeeping without a GPU. `corrupt` flips a byte of
    /// whatever is read at that offset.
    struct HostMemory {
        bytes: Vec<u8>,
        corrupt: Option<usize>,
    }

    impl TierMemory for HostMemory {
        fn size(&self) -> usize {
            self.bytes.len()
        }
        fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
            self.bytes[offset..offset + src.len()].copy_from_slice(src);
            Ok(())
        }
        fn read(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
            dst.copy_from_slice(&self.bytes[offset..offset + dst.len()]);
            if self.corrupt == Some(offset) {
                dst[0] ^= 1;
            }
            Ok(())
        }
    }

    fn host(len: usize) -> HostMemory {
        HostMemory {
            bytes: vec![0; len],
            corrupt: None,
        }
    }

    fn block(key: u128, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (key as usize * 31 + i * 7) as u8)
            .collect()
    }

    fn read(tier: &dyn LowerTier, key: u128) -> Option<Vec<u8>> {
        let len = tier.len_of(BlockKey(key))?;
        let mut v = vec![0u8; len];
        tier.read_into(BlockKey(key), &mut v).then_some(v)
    }

    #[test]
    fn blocks_come_back_intact_and_the_oldest_leave_first() {
        let tier = GpuTier::new(host(1000), None);
        for k in 0..4 {
            tier.demote(BlockKey(k), &block(k, 240));
        }
        for k in 0..4 {
            assert_eq!(read(tier.as_ref(), k), Some(block(k, 240)), "block {k}");
        }
        // 960 bytes used: a fifth block does not fit before the end, so it wraps to the start
        // and evicts the oldest block, the one in its way.
        tier.demote(BlockKey(4), &block(4, 240));
        assert_eq!(read(tier.as_ref(), 0), None, "the oldest block left");
        for k in 1..5 {
            assert_eq!(read(tier.as_ref(), k), Some(block(k, 240)), "block {k}");
        }
        // The next one goes after block 4 and evicts block 1 only.
        tier.demote(BlockKey(5), &block(5, 200));
        assert_eq!(read(tier.as_ref(), 1), None);
        for k in 2..6 {
            assert!(read(tier.as_ref(), k).is_some(), "block {k}");
        }
        let s = &tier.stats()[0];
        assert_eq!((s.name, s.blocks, s.used_bytes), ("gpu", 4, 920));
        assert_eq!(s.demoted_blocks, 6);
    }

    #[test]
    fn a_block_that_comes_back_changed_is_a_miss_and_forgotten() {
        let tier = GpuTier::new(host(1000), None);
        tier.demote(BlockKey(1), &block(1, 100));
        tier.demote(BlockKey(2), &block(2, 100));
        tier.log.lock().mem.corrupt = Some(100); // where block 2 lies
        assert_eq!(read(tier.as_ref(), 2), None);
        assert_eq!(tier.len_of(BlockKey(2)), None, "forgotten");
        assert_eq!(read(tier.as_ref(), 1), Some(block(1, 100)));
        assert_eq!(tier.stats()[0].corrupt_blocks, 1);
        let mut wrong = vec![0u8; 99];
        assert!(!tier.read_into(BlockKey(1), &mut wrong), "wrong length");
    }

    #[test]
    fn evicted_and_oversized_blocks_go_down_and_flush_writes_everything_down() {
        let below = GpuTier::new(host(10_000), None);
        let tier = GpuTier::new(host(1200), Some(below.clone() as Arc<dyn LowerTier>));
        for k in 0..6 {
            tier.demote(BlockKey(k), &block(k, 300));
        }
        tier.demote(BlockKey(99), &block(99, 600)); // over a quarter of the log
        assert_eq!(tier.stats()[0].skipped_blocks, 1);
        // Every block is readable through the GPU tier, from it or from below.
        for k in (0..6).chain([99]) {
            let len = if k == 99 { 600 } else { 300 };
            assert_eq!(read(tier.as_ref(), k), Some(block(k, len)), "block {k}");
        }
        assert!(
            below.len_of(BlockKey(0)).is_some(),
            "evicted block went down"
        );
        tier.flush();
        for k in 0..6 {
            assert_eq!(read(below.as_ref(), k), Some(block(k, 300)), "block {k}");
        }
        let names: Vec<_> = tier.stats().iter().map(|s| s.name).collect();
        assert_eq!(names, ["gpu", "gpu"]);
    }

    #[test]
    fn without_a_driver_the_device_memory_is_a_clear_error() {
        if kvcache_transport::cuda::driver_present() {
            eprintln!("skipped: a CUDA driver is present (tests/gpu_tier.rs covers the device)");
            return;
        }
        let err = DeviceMemory::open(0, 1 << 20).err().expect("no driver");
        assert!(err.to_string().contains("no CUDA driver"), "{err}");
    }
}
