//! Configuration in three stages: raw sources ([`settings`]: built-in defaults, then a TOML
//! file, then `KVCACHE_*` environment variables, then flags, each later source winning; every
//! setting has a flag, an environment variable and a file key), resolution (`resolve.rs`:
//! defaults, checks, contradictions), and the resolved sections below, which the server runs
//! on.

mod resolve;
pub mod settings;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use kvcache_core::wire::FrameLimits;
use kvcache_store::StoreConfig;

use crate::config::settings::Settings;

/// Where the shared-memory socket goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShmSocket {
    /// Derived from the data port once bound (see `kvcache_transport::shm::default_socket_path`).
    Auto,
    Path(PathBuf),
}

/// Shared-memory transport settings.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    pub socket: ShmSocket,
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Uids admitted besides the node's own; `None` admits whoever the mode lets connect.
    pub allow_uids: Option<Vec<u32>>,
    pub lease_timeout: Duration,
    pub max_staging: u64,
}

/// Leases and staging windows of RDMA connections (the shared-memory flags set both).
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    pub lease_timeout: Duration,
    pub max_staging: u64,
}

/// Cluster registration in etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// The endpoint, checked while resolving (each call bounded by 2 s).
    pub endpoint: kvcache_membership::Etcd,
    /// `None`: the advertised address.
    pub node_id: Option<String>,
    pub ttl: u64,
}

/// Where the members of the cluster come from.
#[derive(Clone, Debug)]
pub enum Membership {
    /// Registered in etcd (this node registers itself too).
    Etcd(EtcdConfig),
    /// A fixed list (`--peers`); this node is added if missing.
    Peers(Vec<String>),
}

/// Membership in a cluster of nodes.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub membership: Membership,
    /// `None`: the bound data-plane address.
    pub advertise: Option<String>,
    /// Owners per key.
    pub replicas: usize,
    /// Copy owned blocks from the other members on joining.
    pub warm: bool,
}

/// Fully resolved server configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `None` when shared memory is off.
    pub shm: Option<ShmConfig>,
    /// `None` for a single node.
    pub cluster: Option<ClusterSettings>,
    /// The disk tier: its directory and capacity in bytes.
    pub disk: Option<(PathBuf, u64)>,
    /// The GPU tier: its device and size in bytes.
    pub gpu_tier: Option<(usize, u64)>,
    /// `None` with `--rdma off`; else RDMA is served when this build and host can.
    pub rdma: Option<RdmaConfig>,
    pub listen: String,
    pub metrics_listen: Option<String>,
    pub store: StoreConfig,
    pub limits: FrameLimits,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// Longest a data connection may sit between requests.
    pub idle_timeout: Duration,
    /// Most keys per request.
    pub max_keys: usize,
    /// Most leased bytes per shared-memory or RDMA connection.
    pub max_leased_bytes: u64,
    /// The auth file; `None` leaves the data plane open.
    pub auth: Option<PathBuf>,
    /// Most concurrent connections on the metrics port.
    pub metrics_max_connections: usize,
    pub shutdown_grace: Duration,
    pub test_hooks: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Settings::default().resolve().expect("defaults are valid")
    }
}
