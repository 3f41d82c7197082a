//! Cluster membership from the node's side: registration in etcd, the node's own view of the
//! ring (for metrics), and warming: a node that joins copies the blocks it now owns from the
//! other members.
//!
//! The node writes `/kvcache/members/<node id>` = `{"addr": "<advertised host:port>"}` under a
//! lease of `--etcd-ttl` seconds and renews the lease three times per TTL. Clients of
//! `etcd://...` read that prefix; a node that dies stops renewing, etcd drops its key when the
//! lease expires, and clients route around it. A node that loses etcd keeps serving (the data
//! plane never waits for etcd) and keeps retrying; if its lease expired meanwhile, it registers
//! again. Shutdown revokes the lease so clients learn at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcache_client::{Client, ClientConfig, ClientError, Cluster, TransportChoice};
use kvcache_core::BlockKey;
use kvcache_membership::{
    EtcdError, EtcdMembers, MEMBERS_PREFIX, MemberSource, Registration, RegistrationObserver,
    StaticMembers,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::Auth;
use crate::config::{ClusterSettings, Membership};
use crate::metrics::{Metrics, WarmState};
use kvcache_store::{CommitOutcome, Store};

/// How often the node re-reads the members (as clients of `etcd://` do).
const REFRESH: Duration = Duration::from_millis(500);
/// Keys per `list_keys` page while warming.
const WARM_PAGE: u32 = 8192;
/// Blocks per get while warming.
const WARM_BATCH: usize = 64;

/// Starts the cluster tasks of a node reachable at `advertise`: registration (with etcd), the
/// view of the ring that metrics report, and warming (with `warm`).
pub fn start(
    cfg: &ClusterSettings,
    advertise: String,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
    auth: &Arc<Auth>,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let source: Arc<dyn MemberSource> = match &cfg.membership {
        Membership::Etcd(etcd) => {
            let registration = Registration::member(
                etcd.endpoint.clone(),
                etcd.node_id.as_deref().unwrap_or(&advertise),
                &advertise,
                etcd.ttl,
            );
            // Renewal runs on a thread and runtime of its own: a node whose workers are busy
            // (a slow disk under eviction) must not miss its TTL and fall off the ring.
            let observer: Arc<dyn RegistrationObserver> = Arc::clone(metrics) as _;
            let shutdown = shutdown.clone();
            let renewal = tokio::task::spawn_blocking(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(registration.run(observer, shutdown)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the etcd renewal runtime; not registering")
                    }
                }
            });
            tasks.spawn(async move {
                let _ = renewal.await;
            });
            Arc::new(EtcdMembers::with_endpoint(etcd.endpoint.clone(), REFRESH))
        }
        Membership::Peers(peers) => {
            let mut members = peers.clone();
            members.push(advertise.clone());
            members.sort();
            members.dedup();
            Arc::new(StaticMembers(members))
        }
    };
    let view = NodeView {
        source,
        me: advertise,
        replicas: cfg.replicas,
        warm: cfg.warm,
        warm_until: store.low_watermark_bytes(),
        auth: Arc::clone(auth),
    };
    tasks.spawn(view.run(Arc::clone(store), Arc::clone(metrics), shutdown.clone()));
    Ok(())
}

/// Refuses to start a node whose `--node-id` another live node holds in etcd: registering
/// would silently replace that node's record and steer its clients here. The same id at the
/// same address (a restart before the old lease expired) is this node and is fine.
pub async fn check_node_id_free(cfg: &ClusterSettings, advertise: &str) -> anyhow::Result<()> {
    let Membership::Etcd(etcd) = &cfg.membership else {
        return Ok(());
    };
    let id = etcd
        .node_id
        .clone()
        .unwrap_or_else(|| advertise.to_string());
    let key = format!("{MEMBERS_PREFIX}{id}");
    let found = match etcd.endpoint.range_prefix(&key).await {
        Ok(found) => found,
        Err(e @ EtcdError::Denied { .. }) => anyhow::bail!("{e}"),
        Err(e) => {
            // etcd down at start: the node serves and registers once it is back.
            tracing::warn!(error = %e, "cannot check etcd for another node with this --node-id");
            return Ok(());
        }
    };
    for (k, value) in found {
        if k != key {
            continue;
        }
        let addr = serde_json::from_str::<serde_json::Value>(&value)
            .ok()
            .and_then(|v| v.get("addr").and_then(|a| a.as_str()).map(str::to_string))
            .unwrap_or_default();
        if addr != advertise {
            anyhow::bail!(
                "another node is registered in etcd as {id:?} at {addr}; give this node its own \
                 --node-id (or stop the other one and wait for its lease to expire)"
            );
        }
    }
    Ok(())
}

/// The node's own client-side view of the ring.
struct NodeView {
    source: Arc<dyn MemberSource>,
    /// This node's name on the ring (its advertised address).
    me: String,
    replicas: usize,
    warm: bool,
    /// Warming stops when the pool holds this many bytes: it never evicts to make room.
    warm_until: u64,
    /// With `--auth`, warming lists and copies keys as the auth file's first admin tenant
    /// (peers share the file); without one it is skipped.
    auth: Arc<Auth>,
}

impl NodeView {
    async fn run(
        self,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let cfg = kvcache_client::ClusterConfig {
            replicas: self.replicas,
            ..kvcache_client::ClusterConfig::new(Vec::<String>::new())
        };
        let mut failing = false;
        let cluster = loop {
            match Cluster::with_source(Arc::clone(&self.source), cfg.clone()).await {
                Ok(c) => break c,
                Err(e) => {
                    if !failing {
                        tracing::warn!(source = self.source.describe(), error = %e, "cannot read the cluster members yet; serving, retrying");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        };
        let mut to_warm = self.warm;
        if !to_warm {
            metrics.warm_state(WarmState::Done);
        }
        loop {
            let stats = cluster.stats();
            metrics.cluster_view(stats.members.len(), stats.ring_version);
            // Warm once this node is on the ring (with etcd: once its registration shows).
            if to_warm && stats.members.contains(&self.me) {
                to_warm = false;
                metrics.warm_state(WarmState::Copying);
                tokio::select! {
                    _ = self.warm(&cluster, &stats.members, &store, &metrics) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                metrics.warm_state(WarmState::Done);
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Copies from every other member the blocks this node owns on the ring and lacks.
    async fn warm(
        &self,
        cluster: &Cluster,
        members: &[String],
        store: &Arc<Store>,
        metrics: &Metrics,
    ) {
        let token = self.auth.admin_token();
        if self.auth.required() && token.is_none() {
            tracing::warn!(
                "not warming: listing a peer's keys needs an admin tenant, and the auth file has none (add one with admin = true)"
            );
            return;
        }
        let started = Instant::now();
        let (mut blocks, mut bytes) = (0usize, 0u64);
        for peer in members.iter().filter(|m| **m != self.me) {
            let mut got = (0, 0);
            let result = self
                .warm_from(peer, token.clone(), cluster, store, metrics, &mut got)
                .await;
            (blocks, bytes) = (blocks + got.0, bytes + got.1);
            if let Err(e) = result {
                tracing::warn!(peer, error = %e, copied = got.0, "warming from a peer stopped; its other blocks are misses here until written again");
            }
        }
        tracing::info!(
            blocks,
            bytes = %kvcache_core::ByteSize(bytes),
            peers = members.len() - 1,
            took = ?started.elapsed(),
            "warmed: copied the blocks this node owns from its peers"
        );
    }

    async fn warm_from(
        &self,
        peer: &str,
        token: Option<String>,
        cluster: &Cluster,
        store: &Arc<Store>,
        metrics: &Metrics,
        got: &mut (usize, u64),
    ) -> Result<(), ClientError> {
        let client = Client::connect(ClientConfig {
            transport: TransportChoice::Tcp,
            timeout: Duration::from_secs(5),
            token,
            ..ClientConfig::new(peer)
        })
        .await?;
        let mut after = None;
        loop {
            let (keys, more) = client.list_keys(after, WARM_PAGE).await?;
            after = keys.last().copied();
            let mine: Vec<BlockKey> = keys
                .into_iter()
                .filter(|&k| !store.contains(k) && cluster.owners(k).contains(&self.me))
                .collect();
            for batch in mine.chunks(WARM_BATCH) {
                if store.used_bytes() >= self.warm_until {
                    tracing::info!(peer, "warming stopped at the pool's low watermark");
                    return Ok(());
                }
                for (&key, value) in batch.iter().zip(client.get_many(batch).await?) {
                    // None: evicted on the peer since it was listed.
                    let Some(value) = value else { continue };
                    let Ok(mut alloc) = store.allocate(key, value.len()) else {
                        continue;
                    };
                    alloc.bytes_mut().copy_from_slice(&value);
                    if alloc.commit() == CommitOutcome::Stored {
                        metrics.warmed(value.len());
                        *got = (got.0 + 1, got.1 + value.len() as u64);
                    }
                }
            }
            if !more {
                return Ok(());
            }
        }
    }
}

/// The registration's state in the node's metrics (`kvcache_etcd_registered`,
/// `kvcache_etcd_errors_total`).
impl RegistrationObserver for Metrics {
    fn registered(&self, yes: bool) {
        self.etcd_registered(yes);
    }
    fn failed(&self) {
        self.etcd_error();
    }
}
