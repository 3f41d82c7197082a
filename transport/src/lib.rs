//! kvcache-transport: where block bytes live and how they move.
//!
//! - [`region`]: memory regions that hold block pages (host DRAM today; shared memory, pinned
//!   and GPU memory later), each registered once with the transports;
//! - [`tcp`]: the framed TCP data plane: header, prost control message, raw payload inline.

pub mod region;
pub mod tcp;

pub use region::{HostRegion, LockMode, MemoryRegion, RegionError};
