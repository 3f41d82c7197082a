//! kvcache-server: the cache node.
//!
//! - [`store`]: the memory pool, index, eviction and leases (transport-independent);
//! - [`dataplane`]: the kvcache frame protocol over TCP and the Unix socket: the request loop,
//!   its handlers, shared-memory attach and the RDMA upgrade (feature `rdma`; refused clearly
//!   without it);
//! - `disk` and `gpu`: the tiers under the pool (features `disk` and `cuda`);
//! - [`metrics`] and [`http`]: Prometheus text and health on a separate listener;
//! - [`config`]: command line, environment and TOML configuration;
//! - [`server`]: wires it together, runs until shutdown;
//! - [`cli`]: the `kvcache-server` command itself.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dataplane;
#[cfg(feature = "disk")]
pub mod disk;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;
