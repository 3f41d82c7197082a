//! kvcache-server: the cache node, around the block store of `kvcache-store` (the pool,
//! index, eviction, leases and the GPU and disk tiers under it).
//!
//! - [`dataplane`]: the kvcache frame protocol over TCP and the Unix socket: the request loop,
//!   its handlers, shared-memory attach and the RDMA upgrade (feature `rdma`; refused clearly
//!   without it);
//! - [`metrics`] and [`http`]: Prometheus text and health on a separate listener;
//! - [`config`]: command line, environment and TOML configuration;
//! - [`server`]: wires it together, runs until shutdown;
//! - [`cli`]: the `kvcache-server` command itself.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod http;
pub mod metrics;
pub mod server;
