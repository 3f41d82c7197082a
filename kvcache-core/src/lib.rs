//! kvcache-core: the deterministic heart of kvcache.
//!
//! Everything here is pure logic with no sockets, files or clocks, so it is unit-testable and
//! fuzzable on its own (the shape of `quinn-proto`):
//! - [`chunk_hash`]: the chunk checksum, which can copy what it hashes in the same pass;
//! - [`checksum`]: the per-chunk checksum layout of a stored block, shared by node and client;
//! - [`disk_record`]: the disk tier's segment record header and index entries, as bytes;
//! - [`key`]: 128-bit block keys and the token-prefix chain that derives them;
//! - [`namespace`]: what makes KV bytes differ (model, dtype, layout, TP rank, LoRA, salt);
//! - [`ring`]: the consistent-hash ring with virtual nodes that places keys on nodes;
//! - [`wire`]: control messages (prost) and the binary frame header;
//! - [`size`]: human byte sizes (`512MiB`) for configuration;
//! - [`tenant`]: the fold that gives every tenant of an authenticating node its own key space.

pub mod checksum;
pub mod chunk_hash;
pub mod disk_record;
pub mod key;
pub mod metric_names;
pub mod namespace;
pub mod ring;
pub mod sample;
pub mod size;
pub mod tenant;
pub mod wire;

pub use key::{BlockKey, KEY_SCHEME_VERSION, chain_keys};
pub use namespace::{Namespace, NamespaceId, TpPlacement};
pub use ring::HashRing;
pub use size::ByteSize;
