//! Where the disk tier lives and how much it may hold.

use std::path::PathBuf;

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
