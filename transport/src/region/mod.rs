//! Memory regions: large, long-lived spans of memory that the store carves into block pages.
//! `host.rs` is anonymous mmap'd DRAM, `shm.rs` a sealed memfd that same-node clients map;
//! both are locked when permitted (`mapping.rs` holds the steps they share).

mod host;
mod mapping;
mod shm;

pub use host::HostRegion;
pub use shm::{ShmRegion, ShmView};

/// Whether to pin the region's pages in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Never lock.
    Off,
    /// Try to lock; on failure log a warning and continue unlocked.
    #[default]
    BestEffort,
    /// Lock or fail.
    Required,
}

/// Why a region could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cannot map {len} bytes: {source}")]
    Map { len: usize, source: std::io::Error },
    #[error(
        "cannot lock {len} bytes in RAM (mlock): {source}; raise `ulimit -l`, grant CAP_IPC_LOCK, or use lock mode `off`/`best-effort`"
    )]
    Lock { len: usize, source: std::io::Error },
    #[error("cannot create a shared memory file (memfd) of {len} bytes: {source}")]
    SharedFile { len: usize, source: std::io::Error },
    #[error("a region must not be empty")]
    Empty,
}

/// A span of memory the store places blocks in.
///
/// Implementations guarantee `base()..base()+len()` stays valid and fixed for the region's life.
pub trait MemoryRegion: Send + Sync {
    /// First byte of the region.
    fn base(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the pages are pinned in RAM.
    fn is_locked(&self) -> bool;
    /// Whether the region is empty (never, for a constructed region).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
