//! A client of a cluster of kvcache nodes, with members from a static list or from etcd.
//!
//! Keys are placed on the consistent-hash ring of `kvcache-core` with `replicas` owners each.
//! A batch is split by owner, the parts go to their nodes in parallel, and the answers are merged
//! in key order. A put writes every owner. A read asks the first owner that is not known to be
//! down, then the next owner for keys it missed or could not serve, so a lost node costs
//! misses (R = 1) or nothing (R >= 2), never an error. A node that fails is skipped for
//! `down_for` before it is tried again.
//!
//! Members come from a [`MemberSource`] (crate `kvcache-membership`): a fixed list or etcd,
//! which the cluster asks again every `refresh` and rebuilds its ring from
//! when the answer changes. If the source fails (etcd down), the last known members stay in use.
//!
//! `view.rs` holds the membership view and the routing; this file the calls and the watch.

mod view;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kvcache_core::BlockKey;
use kvcache_membership::MemberSource;

use crate::cluster::view::{Counters, Routing, View, join_all};
use crate::config::{ClusterConfig, GetOutcome};
use crate::error::ClientError;
use crate::node::Client;
use crate::write::PutBlocks;

/// What a cluster client sees and did (for stats and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStats {
    /// Members on the ring now.
    pub members: Vec<String>,
    /// Bumped every time the member set changes (1 for the first).
    pub ring_version: u64,
    /// Keys answered by a replica rather than their primary.
    pub replica_reads: u64,
    /// Nodes marked down after a failed call (their keys went to the next owner).
    pub failovers: u64,
}

/// A client of a cluster of kvcache nodes.
pub struct Cluster {
    view: Arc<RwLock<Arc<View>>>,
    counters: Arc<Counters>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// The nodes' timeout, which also bounds each round of a cluster call in all (the owners,
    /// then each rank of replicas).
    timeout: Duration,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(w) = &self.watcher {
            w.abort();
        }
    }
}

impl Cluster {
    /// A client of a static member list; nodes are connected lazily, so members may be down
    /// at start.
    pub fn new(cfg: ClusterConfig) -> Result<Self, ClientError> {
        if cfg.members.is_empty() || cfg.replicas == 0 {
            return Err(ClientError::InvalidArgument(
                "a cluster needs at least one member and one replica".into(),
            ));
        }
        let view = View::build(&cfg.members, &cfg, None);
        Ok(Self {
            view: Arc::new(RwLock::new(Arc::new(view))),
            counters: Arc::default(),
            watcher: None,
            timeout: cfg.node.timeout,
        })
    }

    /// A client whose members come from `source`: read once now (an error if that fails), then
    /// again every `source.refresh()` on the current tokio runtime. When the answer changes the
    /// ring is rebuilt (about 1/N of keys move per member joining or leaving); when the source
    /// fails, the last known members stay in use and a line is logged.
    pub async fn with_source(
        source: Arc<dyn MemberSource>,
        cfg: ClusterConfig,
    ) -> Result<Self, ClientError> {
        if cfg.replicas == 0 {
            return Err(ClientError::InvalidArgument(
                "replicas must be at least 1".into(),
            ));
        }
        let members = source.members().await?;
        if members.is_empty() {
            tracing::warn!(
                source = source.describe(),
                "no kvcache members registered yet"
            );
        }
        let view = Arc::new(RwLock::new(Arc::new(View::build(&members, &cfg, None))));
        let timeout = cfg.node.timeout;
        let watcher = source.refresh().map(|every| {
            let view = Arc::clone(&view);
            tokio::spawn(watch_members(source, cfg, view, every))
        });
        Ok(Self {
            view,
            counters: Arc::default(),
            watcher,
            timeout,
        })
    }

    fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The owners of `key`, primary first.
    pub fn owners(&self, key: BlockKey) -> Vec<String> {
        self.view()
            .owners(key)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Members, ring version and counters.
    pub fn stats(&self) -> ClusterStats {
        let view = self.view();
        ClusterStats {
            members: view.ring.members().to_vec(),
            ring_version: view.version,
            replica_reads: self.counters.replica_reads.load(Relaxed),
            failovers: self.counters.failovers.load(Relaxed),
        }
    }

    /// Runs `call` on each member's share of `indices` in parallel. A member that fails
    /// with an unavailability error is marked down and its share comes back as `None`.
    async fn fan_out<'a, T, Fut>(
        &self,
        view: &'a View,
        shares: BTreeMap<&'a str, Vec<usize>>,
        call: impl Fn(&'a str, Client, Vec<usize>) -> Fut,
    ) -> Result<Vec<(Vec<usize>, Option<T>)>, ClientError>
    where
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let futures = shares.into_iter().map(|(member, idx)| {
            let call = &call;
            async move {
                let result = match view.node(member).await {
                    Ok(client) => call(member, client, idx.clone()).await,
                    Err(e) => Err(e),
                };
                (member, idx, result)
            }
        });
        // One deadline per round: its nodes are asked in parallel, so the round ends within
        // one timeout; a call of R rounds (owners, then replicas) ends within R timeouts.
        let answers = crate::deadline::within(self.timeout, join_all(futures.collect())).await;
        let mut out = Vec::new();
        for (member, idx, result) in answers {
            match result {
                Ok(v) => out.push((idx, Some(v))),
                Err(e) if e.is_unavailable() => {
                    view.mark_down(member, &e);
                    self.counters.failovers.fetch_add(1, Relaxed);
                    out.push((idx, None));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// [`put_many_segments`](Self::put_many_segments) with a locality hint: each block is also
    /// stored on `prefer` (the node next to the engine that will read it, e.g. a decode
    /// instance's), besides its ring owners. The rule: the ring owners always hold the block, so
    /// any client finds it; a reader that names the same node with
    /// [`get_many_into_near`](Self::get_many_into_near) reads the nearby copy first. A `prefer`
    /// that is not a live member is ignored.
    pub async fn put_many_segments_near(
        &self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
        prefer: Option<&str>,
    ) -> Result<Vec<bool>, ClientError> {
        crate::error::same_len(keys.len(), values.len(), "values")?;
        let view = self.view();
        let prefer = view.member(prefer);
        let mut shares: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            let mut owners = view.owners(*key);
            if let Some(p) = prefer
                && !owners.contains(&p)
            {
                owners.push(p);
            }
            for owner in owners {
                if !view.is_down(owner) {
                    shares.entry(owner).or_default().push(i);
                }
            }
        }
        let results = self
            .fan_out(&view, shares, |_, client, idx| async move {
                let part_keys: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
                let part_values: Vec<&[&[u8]]> = idx.iter().map(|&i| values[i]).collect();
                client.put_many_segments(&part_keys, &part_values).await
            })
            .await?;
        let mut stored = vec![false; keys.len()];
        for (idx, statuses) in results {
            for (i, s) in idx.into_iter().zip(statuses.unwrap_or_default()) {
                stored[i] |= s.is_stored();
            }
        }
        Ok(stored)
    }

    /// Asks each key's owners in turn (primary first) until `call`'s answer for it satisfies
    /// `found`; returns the last answer per key (None if no owner could be asked). Each round
    /// has one deadline.
    async fn read<T, Fut>(
        &self,
        keys: &[BlockKey],
        found: impl Fn(&T) -> bool,
        call: impl Fn(Client, Vec<BlockKey>) -> Fut,
    ) -> Result<Vec<Option<T>>, ClientError>
    where
        Fut: Future<Output = Result<Vec<T>, ClientError>>,
    {
        let view = self.view();
        let mut answers: Vec<Option<T>> = keys.iter().map(|_| None).collect();
        let mut routing = Routing::new(keys.len());
        while let Some(shares) = routing.next_round(&view, keys) {
            let results = self
                .fan_out(&view, shares, |_, client, idx| {
                    call(client, idx.iter().map(|&i| keys[i]).collect())
                })
                .await?;
            for (idx, got) in results {
                match got {
                    Some(got) => {
                        for (i, answer) in idx.into_iter().zip(got) {
                            if !found(&answer) {
                                routing.retry(i);
                            } else {
                                routing.found(i, &self.counters);
                            }
                            answers[i] = Some(answer);
                        }
                    }
                    None => idx.into_iter().for_each(|i| routing.retry(i)),
                }
            }
        }
        Ok(answers)
    }

    /// Fetches blocks into fresh buffers (`None` for a miss), from the primary first and
    /// replicas for what it missed.
    pub async fn get_many(&self, keys: &[BlockKey]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let got = self
            .read(keys, Option::is_some, |client, part| async move {
                client.get_many(&part).await
            })
            .await?;
        Ok(got.into_iter().map(Option::flatten).collect())
    }

    /// Which keys are stored on some owner: the primary first, then replicas for keys it
    /// does not have or cannot answer for.
    pub async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>, ClientError> {
        let got = self
            .read(
                keys,
                |p| *p,
                |client, part| async move { client.exists(&part).await },
            )
            .await?;
        Ok(got.into_iter().map(|p| p == Some(true)).collect())
    }

    /// How many leading blocks of a chain are stored: one round trip per owning node (and one
    /// more per replica rank only for keys the first asked did not have).
    pub async fn prefix_match(&self, keys: &[BlockKey]) -> Result<usize, ClientError> {
        Ok(self.exists(keys).await?.iter().take_while(|p| **p).count())
    }

    /// Fetches blocks into caller memory (see [`Client::get_many_into`]), asking the primary
    /// first and replicas for what it missed. A dead node costs misses, never an error.
    pub async fn get_many_into(
        &self,
        keys: &[BlockKey],
        dst: &mut [Vec<&mut [u8]>],
    ) -> Result<Vec<GetOutcome>, ClientError> {
        self.get_many_into_near(keys, dst, None).await
    }

    /// [`get_many_into`](Self::get_many_into) that asks `prefer` first (see
    /// [`put_many_segments_near`](Self::put_many_segments_near)), then the ring owners.
    pub async fn get_many_into_near(
        &self,
        keys: &[BlockKey],
        dst: &mut [Vec<&mut [u8]>],
        prefer: Option<&str>,
    ) -> Result<Vec<GetOutcome>, ClientError> {
        crate::error::same_len(keys.len(), dst.len(), "destinations")?;
        let view = self.view();
        let mut outcomes = vec![GetOutcome::Miss; keys.len()];
        let mut routing = Routing::new(keys.len());
        routing.prefer = view.member(prefer);
        // Each key's destination moves into the request for its node and comes back afterwards,
        // whether the node answered or not.
        let mut slots: Vec<Option<Vec<&mut [u8]>>> =
            dst.iter_mut().map(|d| Some(std::mem::take(d))).collect();
        while let Some(shares) = routing.next_round(&view, keys) {
            let mut parts: BTreeMap<&str, Vec<Vec<&mut [u8]>>> = BTreeMap::new();
            for (member, idx) in &shares {
                parts.insert(
                    member,
                    idx.iter()
                        .map(|&i| slots[i].take().expect("destination present"))
                        .collect(),
                );
            }
            let parts = Mutex::new(parts);
            let take_part = |member: &str| {
                parts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(member)
            };
            let results = self
                .fan_out(&view, shares.clone(), |member, client, idx| {
                    let mut segs = take_part(member).expect("one part per member");
                    let parts = &parts;
                    async move {
                        let part: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
                        match client.get_many_into(&part, &mut segs).await {
                            Ok(got) => Ok((got, segs)),
                            Err(e) => {
                                parts
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(member, segs);
                                Err(e)
                            }
                        }
                    }
                })
                .await;
            // Destinations of nodes that failed (or were never reached) come back first, so
            // none is lost even if an error is returned below.
            for (member, idx) in &shares {
                if let Some(segs) = take_part(member) {
                    for (&i, s) in idx.iter().zip(segs) {
                        slots[i] = Some(s);
                    }
                }
            }
            for (idx, result) in results? {
                match result {
                    Some((got, segs)) => {
                        for ((i, o), s) in idx.into_iter().zip(got).zip(segs) {
                            slots[i] = Some(s);
                            outcomes[i] = o;
                            if o == GetOutcome::Miss {
                                routing.retry(i);
                            } else {
                                routing.found(i, &self.counters);
                            }
                        }
                    }
                    None => idx.into_iter().for_each(|i| routing.retry(i)),
                }
            }
        }
        for (d, s) in dst.iter_mut().zip(slots) {
            *d = s.expect("every destination came back");
        }
        Ok(outcomes)
    }
}

/// A cluster's put stores each block on every owner (owners that are down are skipped: the
/// cache is best effort, a lost copy is a later miss) and reports, per block, whether at least
/// one owner stored it.
impl PutBlocks for Cluster {
    type Stored = bool;

    async fn put_many_segments(
        &self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
    ) -> Result<Vec<bool>, ClientError> {
        self.put_many_segments_near(keys, values, None).await
    }
}

/// Re-reads the members every `every`; swaps in a new view when they change.
async fn watch_members(
    source: Arc<dyn MemberSource>,
    cfg: ClusterConfig,
    view: Arc<RwLock<Arc<View>>>,
    every: Duration,
) {
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        match source.members().await {
            Ok(members) => {
                if failing {
                    tracing::info!(
                        source = source.describe(),
                        "membership source answers again"
                    );
                    failing = false;
                }
                let current = Arc::clone(&view.read().unwrap_or_else(|e| e.into_inner()));
                if current.ring.members() != members.as_slice() {
                    let next = View::build(&members, &cfg, Some(&current));
                    tracing::info!(
                        members = ?members,
                        ring_version = next.version,
                        "kvcache cluster membership changed"
                    );
                    *view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
                }
            }
            Err(e) if !failing => {
                tracing::warn!(source = source.describe(), error = %e, "cannot read the membership; keeping the last known members");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
