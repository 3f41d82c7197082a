//! The block store: a memory pool carved into pages, a sharded index of committed blocks, and
//! eviction. It implements the data plane's three steps independently of any transport:
//!
//! - put: [`Store::allocate`] -> write the bytes into [`Allocation::bytes_mut`] -> [`Allocation::commit`];
//! - get: [`Store::lease`] -> read through [`Lease::verified_chunk`] -> drop the lease (release).
//!
//! An allocation is invisible until committed and is freed if dropped uncommitted (a client
//! that dies mid-put leaves nothing behind). A leased block is never evicted or reused. Every
//! block is checksummed at commit, and its bytes can only be read through verification
//! ([`Lease::verified_chunk`], [`Lease::verified_bytes`]): a corrupt block is dropped and
//! reported, never returned.
//!
//! The store names no network: the server's data plane and its tests drive it.
//!
//! Files: `store.rs` (the store, eviction between watermarks), `allocation.rs` (the write side),
//! `lease.rs` (the read side), `config.rs` (settings, errors, stats), `allocator.rs` (pages),
//! `index.rs` (a shard of the key index), `eviction/` (policies), `tier/` (the GPU and disk
//! tiers under the pool). The per-chunk checksum layout is `kvcache_core::checksum`.

pub mod allocation;
pub mod allocator;
pub mod config;
pub mod eviction;
pub mod index;
pub mod lease;
pub mod store;
pub mod tier;

pub use allocation::Allocation;
pub use config::{AllocError, CommitOutcome, StoreConfig, StoreError, StoreStats};
pub use lease::{Corrupt, Lease};
pub use store::Store;
pub use tier::{LowerTier, TierStats, tier_checksum};

#[cfg(test)]
mod tests;
