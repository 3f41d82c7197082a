//! kvcache-transport: where block bytes live and how they move.
//!
//! - [`region`]: memory regions that hold block pages (host DRAM, shared memory; pinned and GPU
//!   memory later), each registered once with the transports;
//! - [`tcp`]: the framed TCP data plane: header, prost control message, raw payload inline;
//! - [`shm`]: same-node shared memory: descriptor passing and same-host detection;
//! - [`etcd`]: a small etcd v3 client (JSON gateway) for cluster membership;
//! - [`rdma`]: negotiation, the queue-pair handshake messages, scatter plans and completion
//!   outcomes (device-free, always built), and the device probe (feature `rdma`);
//! - `cuda` (feature `cuda`): GPU memory, pinned staging and stream copies through the driver.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod etcd;
pub mod rdma;
pub mod region;
pub mod shm;
pub mod tcp;

pub use region::{HostRegion, LockMode, MemoryRegion, RegionError, ShmRegion, ShmView};
