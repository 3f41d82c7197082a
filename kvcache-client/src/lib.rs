//! kvcache-client: the async Rust client of a kvcache node.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvcache_client::ClientError> {
//! use kvcache_client::{Client, ClientConfig};
//! use kvcache_core::BlockKey;
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7400")).await?;
//! client.put(BlockKey(1), b"kv bytes").await?;
//! assert_eq!(client.get(BlockKey(1)).await?.as_deref(), Some(&b"kv bytes"[..]));
//! # Ok(()) }
//! ```
//!
//! Every call takes a pooled connection, runs one request under the configured timeout, and
//! returns the connection to the pool only if the exchange completed cleanly; a connection
//! that timed out or saw an error is dropped, never reused in an unknown state.
//!
//! With a node on the same host, the client uses shared memory ([`TransportChoice::Auto`], the
//! default): gets copy straight out of the node's pool into the caller's memory, checking every
//! chunk, and puts go through a staging window. Otherwise RDMA when both ends have a device
//! (feature `rdma`), else, or with [`TransportChoice::Tcp`], bytes travel inline over TCP.
//!
//! The rooms: `any` ([`Kvcache`]: one front for a node or a cluster, `connect("h:p" | list |
//! "etcd://...")`), `node` (one node's [`Client`]), `cluster` (many nodes on a ring), `config`
//! (settings and outcomes), `connection` (the control channel), `path` (the byte paths: TCP,
//! shared memory, RDMA), `verify` (the checked copy every reading path uses), `deadline` (one
//! deadline per call), `write` ([`PutBlocks`]: the one put every front provides) and `error`.

mod any;
mod cluster;
mod config;
mod connection;
mod deadline;
mod error;
mod node;
mod path;
mod verify;
mod write;

pub use any::{ETCD_REFRESH, Kvcache, Target};
pub use cluster::{Cluster, ClusterStats};
pub use config::{ClientConfig, ClusterConfig, DeviceSpan, GetOutcome, PathKind, TransportChoice};
pub use error::ClientError;
pub use kvcache_membership::{
    EtcdMembers, MEMBERS_PREFIX as ETCD_MEMBERS_PREFIX, MemberSource, StaticMembers,
};
pub use node::Client;
pub use write::PutBlocks;
