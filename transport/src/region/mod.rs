//! Memory regions: large, long-lived spans of memory that the store carves into block pages.
//! `host.rs` is anonymous mmap'd DRAM, locked when permitted.

mod host;

pub use host::{HostRegion, LockMode};

/// Why a region could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cannot map {len} bytes: {source}")]
    Map { len: usize, source: std::io::Error },
    #[error(
        "cannot lock {len} bytes in RAM (mlock): {source}; raise `ulimit -l`, grant CAP_IPC_LOCK, or use lock mode `off`/`best-effort`"
    )]
    Lock { len: usize, source: std::io::Error },
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
