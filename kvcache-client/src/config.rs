//! What a caller chooses and gets back: client settings, the byte path asked for and the one
//! taken, and the outcome of a get into caller memory.

use std::time::Duration;

use crate::error::ClientError;

/// A span of GPU memory: a device address (as `cuMemAlloc` or `torch.Tensor.data_ptr()` give
/// it) and a length in bytes.
pub type DeviceSpan = (u64, u64);

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of the node's data plane.
    pub addr: String,
    /// Most connections open at once (and so requests in flight).
    pub max_connections: usize,
    /// Limit for one call, connect included: a get split into chunks finishes within it in
    /// all; a cluster call gives each round (owners, then each rank of replicas) one.
    pub timeout: Duration,
    /// Most keys per get request; larger batches are split.
    pub max_get_keys: usize,
    /// How bytes should move: shared memory or RDMA when possible, or TCP.
    pub transport: TransportChoice,
    /// Staging window asked for per shared-memory connection; puts larger than it are split,
    /// and a single block must fit in it.
    pub shm_staging_bytes: u64,
    /// A tenant's token for a node started with `--auth`, presented first on every
    /// connection. `None` sends none (a node without `--auth` needs none).
    pub token: Option<String>,
}

impl ClientConfig {
    /// Defaults for `addr`: 16 connections, 5 s timeout, 64 keys per get, automatic transport,
    /// 64 MiB staging windows.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            max_connections: 16,
            timeout: Duration::from_secs(5),
            max_get_keys: 64,
            transport: TransportChoice::Auto,
            shm_staging_bytes: 64 << 20,
            token: None,
        }
    }
}

/// How a client should move block bytes (the caller's choice; [`PathKind`] says what it got).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// Shared memory when the node is on this host and lets us map its pool, else RDMA when
    /// both ends have a device, else TCP, with a log line saying why.
    #[default]
    Auto,
    /// Shared memory or fail.
    Shm,
    /// One-sided RDMA or fail (a build with the `rdma` feature and a device at both ends).
    Rdma,
    /// TCP only.
    Tcp,
}

impl std::str::FromStr for TransportChoice {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, ClientError> {
        match s {
            "auto" => Ok(Self::Auto),
            "shm" => Ok(Self::Shm),
            "rdma" => Ok(Self::Rdma),
            "tcp" => Ok(Self::Tcp),
            other => Err(ClientError::InvalidArgument(format!(
                "transport must be \"auto\", \"shm\", \"rdma\" or \"tcp\", not {other:?}"
            ))),
        }
    }
}

/// The byte path a client settled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Payload inline in the frames.
    Tcp,
    /// Copies through the node's pool mapped into this process.
    Shm,
    /// One-sided READs and WRITEs.
    Rdma,
}

impl PathKind {
    /// `"tcp"`, `"shm"` or `"rdma"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Tcp => "tcp",
            PathKind::Shm => "shm",
            PathKind::Rdma => "rdma",
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `host:port` of every member.
    pub members: Vec<String>,
    /// Owners per key (the replication factor), at least 1.
    pub replicas: usize,
    /// Settings for each node's client; `addr` is replaced by the member's.
    pub node: ClientConfig,
    /// How long a node that failed is skipped before it is tried again.
    pub down_for: Duration,
}

impl ClusterConfig {
    /// Defaults: one replica, the default client settings, nodes skipped for 1 s after a failure.
    pub fn new<S: Into<String>>(members: impl IntoIterator<Item = S>) -> Self {
        Self {
            members: members.into_iter().map(Into::into).collect(),
            replicas: 1,
            node: ClientConfig::new(""),
            down_for: Duration::from_secs(1),
        }
    }
}

/// Result of a scatter get for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetOutcome {
    /// The block's bytes are in the destination segments.
    Hit,
    /// Not stored (or failed verification on the server).
    Miss,
    /// Stored with a different length than the destination; the destination is untouched.
    WrongSize { stored: usize, expected: usize },
}
