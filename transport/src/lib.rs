//! kvcache-transport: where block bytes live and how they move.
//!
//! - [`region`]: memory regions that hold block pages (host DRAM, shared memory; pinned and GPU
//!   memory later), each registered once with the transports;
//! - [`frame_io`]: framed I/O on any stream (TCP or Unix socket): header, prost control
//!   message, raw payload read into and written from the caller's memory;
//! - [`shm`]: same-node shared memory: descriptor passing and same-host detection;
//! - [`rdma`]: negotiation, the queue-pair handshake messages, scatter plans and completion
//!   outcomes (device-free, always built), and the device probe (feature `rdma`);
//! - `cuda` (feature `cuda`): GPU memory, pinned staging and stream copies through the driver.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod frame_io;
pub mod rdma;
pub mod region;
pub mod shm;

pub use region::{HostRegion, LockMode, MemoryRegion, RegionError, ShmRegion, ShmView};
