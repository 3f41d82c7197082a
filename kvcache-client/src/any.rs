//! One front for one node or a cluster: [`Kvcache::connect`] takes `"host:port"`, a list of
//! members, or `"etcd://host:port"`, and every operation answers the same way for both (puts
//! say per key whether the block is stored; gets take an optional locality hint that only a
//! cluster uses). The Python module and the gateway use this, not the two fronts below it.

use std::sync::Arc;
use std::time::Duration;

use kvcache_core::BlockKey;
use kvcache_core::wire::PutStatus;
use kvcache_membership::EtcdMembers;

use crate::cluster::Cluster;
use crate::config::{ClientConfig, ClusterConfig, GetOutcome};
use crate::error::ClientError;
use crate::node::Client;
use crate::write::PutBlocks;

/// How often a client of `etcd://` re-reads the members.
pub const ETCD_REFRESH: Duration = Duration::from_millis(500);

/// Where a client's nodes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One node, `host:port`.
    Node(String),
    /// A fixed list of members, keys placed on their ring.
    Members(Vec<String>),
    /// Members registered in etcd (`etcd://host:port`), re-read every [`ETCD_REFRESH`].
    Etcd(String),
}

impl Target {
    /// `etcd://...` is etcd, `a,b,c` a member list, anything else one node.
    pub fn parse(addr: &str) -> Self {
        if addr.starts_with("etcd://") {
            Target::Etcd(addr.to_string())
        } else if addr.contains(',') {
            Target::Members(addr.split(',').map(|m| m.trim().to_string()).collect())
        } else {
            Target::Node(addr.to_string())
        }
    }

    /// The members named, for display (the etcd URL for etcd).
    pub fn members(&self) -> Vec<String> {
        match self {
            Target::Node(a) | Target::Etcd(a) => vec![a.clone()],
            Target::Members(m) => m.clone(),
        }
    }
}

/// A client of one node or of a cluster, with one API.
#[derive(Clone)]
pub enum Kvcache {
    Node(Client),
    Cluster(Arc<Cluster>),
}

impl Kvcache {
    /// Connects to `target` with `cfg` for each node (its `addr` is replaced by the
    /// member's), `replicas` owners per key (a cluster only). A single node is connected at
    /// once (an error if it cannot be); cluster members are connected lazily, since some may
    /// be down when the client starts.
    pub async fn connect(
        target: Target,
        mut cfg: ClientConfig,
        replicas: usize,
    ) -> Result<Self, ClientError> {
        if replicas == 0 {
            return Err(ClientError::InvalidArgument(
                "replicas must be at least 1".into(),
            ));
        }
        let timeout = cfg.timeout;
        let (members, etcd) = match target {
            Target::Node(_) if replicas > 1 => {
                return Err(ClientError::InvalidArgument(
                    "replicas > 1 needs a list of members or etcd://".into(),
                ));
            }
            Target::Node(addr) => {
                cfg.addr = addr;
                return Ok(Kvcache::Node(Client::connect(cfg).await?));
            }
            Target::Members(m) if m.is_empty() => {
                return Err(ClientError::InvalidArgument(
                    "a cluster needs at least one member".into(),
                ));
            }
            Target::Members(m) => (m, None),
            Target::Etcd(url) => (Vec::new(), Some(url)),
        };
        let mut cluster = ClusterConfig::new(members);
        cluster.replicas = replicas;
        cluster.node = cfg;
        let cluster = match etcd {
            None => Cluster::new(cluster)?,
            Some(url) => {
                let source = EtcdMembers::new(&url, ETCD_REFRESH, timeout)
                    .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
                Cluster::with_source(Arc::new(source), cluster).await?
            }
        };
        Ok(Kvcache::Cluster(Arc::new(cluster)))
    }

    /// The single node's client, if this is one.
    pub fn node(&self) -> Option<&Client> {
        match self {
            Kvcache::Node(c) => Some(c),
            Kvcache::Cluster(_) => None,
        }
    }

    /// The cluster client, if this is one.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        match self {
            Kvcache::Node(_) => None,
            Kvcache::Cluster(c) => Some(c),
        }
    }

    /// Stores blocks given as segment lists; per key, whether it is stored (now or already).
    /// `prefer` (a locality hint, a member's `host:port`) only means something to a cluster.
    pub async fn put_many_segments(
        &self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
        prefer: Option<&str>,
    ) -> Result<Vec<bool>, ClientError> {
        match self {
            Kvcache::Node(c) => Ok(c
                .put_many_segments(keys, values)
                .await?
                .into_iter()
                .map(PutStatus::is_stored)
                .collect()),
            Kvcache::Cluster(c) => c.put_many_segments_near(keys, values, prefer).await,
        }
    }

    /// Fetches blocks into fresh buffers; `None` for a miss.
    pub async fn get_many(&self, keys: &[BlockKey]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        match self {
            Kvcache::Node(c) => c.get_many(keys).await,
            Kvcache::Cluster(c) => c.get_many(keys).await,
        }
    }

    /// Fetches blocks into caller segments, asking `prefer` first in a cluster.
    pub async fn get_many_into(
        &self,
        keys: &[BlockKey],
        dst: &mut [Vec<&mut [u8]>],
        prefer: Option<&str>,
    ) -> Result<Vec<GetOutcome>, ClientError> {
        match self {
            Kvcache::Node(c) => c.get_many_into(keys, dst).await,
            Kvcache::Cluster(c) => c.get_many_into_near(keys, dst, prefer).await,
        }
    }

    /// Which keys are stored.
    pub async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>, ClientError> {
        match self {
            Kvcache::Node(c) => c.exists(keys).await,
            Kvcache::Cluster(c) => c.exists(keys).await,
        }
    }

    /// How many leading blocks of a chain are stored.
    pub async fn prefix_match(&self, keys: &[BlockKey]) -> Result<usize, ClientError> {
        match self {
            Kvcache::Node(c) => c.prefix_match(keys).await,
            Kvcache::Cluster(c) => c.prefix_match(keys).await,
        }
    }
}
