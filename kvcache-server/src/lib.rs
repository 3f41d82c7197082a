//! kvcache-server: the cache node.
//!
//! - [`store`]: the memory pool, index, eviction and leases (transport-independent);
//! - [`service`]: the data plane speaking the kvcache frame protocol (TCP and Unix socket);
//! - `disk` and `gpu`: the tiers under the pool (features `disk` and `cuda`);
//! - [`shm`]: the shared-memory transport for clients on the same host;
//! - [`rdma`]: one-sided RDMA for clients on other hosts (feature `rdma`; refused clearly
//!   without it);
//! - [`metrics`] and [`http`]: Prometheus text and health on a separate listener;
//! - [`config`]: command line, environment and TOML configuration;
//! - [`server`]: wires it together, runs until shutdown;
//! - [`cli`]: the `kvcache-server` command itself.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
#[cfg(feature = "disk")]
pub mod disk;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod http;
pub mod metrics;
pub mod rdma;
pub mod server;
pub mod service;
pub mod shm;
pub mod store;
