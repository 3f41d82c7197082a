//! The cluster client's view of one membership: the ring and a node per member with its
//! down-state, the order in which a key's owners are asked, and the routing of a batch round
//! by round. No I/O: the nodes' clients connect lazily when first asked.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use kvcache_core::{BlockKey, HashRing};

use crate::config::{ClientConfig, ClusterConfig};
use crate::error::ClientError;
use crate::node::Client;

pub(crate) struct Node {
    client: Mutex<Option<Client>>,
    down_until: Mutex<Option<Instant>>,
    cfg: ClientConfig,
}

/// One membership: the ring and the nodes on it.
pub(crate) struct View {
    pub(crate) ring: HashRing,
    nodes: BTreeMap<String, Arc<Node>>,
    replicas: usize,
    down_for: Duration,
    pub(crate) version: u64,
}

/// Counters of what the cluster client did.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) replica_reads: AtomicU64,
    pub(crate) failovers: AtomicU64,
}

/// Polls futures concurrently on the current task and returns their outputs in order.
pub(crate) async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future completed"))
        .collect()
}

impl View {
    pub(crate) fn build(members: &[String], cfg: &ClusterConfig, old: Option<&View>) -> Self {
        let nodes = members
            .iter()
            .map(|m| {
                let node = old
                    .and_then(|v| v.nodes.get(m).cloned())
                    .unwrap_or_else(|| {
                        Arc::new(Node {
                            client: Mutex::new(None),
                            down_until: Mutex::new(None),
                            cfg: ClientConfig {
                                addr: m.clone(),
                                ..cfg.node.clone()
                            },
                        })
                    });
                (m.clone(), node)
            })
            .collect::<BTreeMap<_, _>>();
        Self {
            ring: HashRing::with_members(members.iter().cloned()),
            replicas: cfg.replicas.min(nodes.len()).max(1),
            nodes,
            down_for: cfg.down_for,
            version: old.map_or(1, |v| v.version + 1),
        }
    }

    pub(crate) fn owners(&self, key: BlockKey) -> Vec<&str> {
        self.ring.owners(key, self.replicas)
    }

    /// `name` as a member of this view (borrowed from it), if it is one.
    pub(crate) fn member(&self, name: Option<&str>) -> Option<&str> {
        self.nodes.get_key_value(name?).map(|(k, _)| k.as_str())
    }

    /// Where to read `key` from, in order: the preferred node, then the ring owners.
    pub(crate) fn read_order<'a>(&'a self, key: BlockKey, prefer: Option<&'a str>) -> Vec<&'a str> {
        let mut order: Vec<&str> = prefer.into_iter().collect();
        order.extend(self.owners(key).into_iter().filter(|o| Some(*o) != prefer));
        order
    }

    pub(crate) fn is_down(&self, member: &str) -> bool {
        let until = *self.nodes[member]
            .down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    pub(crate) fn mark_down(&self, member: &str, err: &ClientError) {
        tracing::warn!(node = member, error = %err, down_for = ?self.down_for, "kvcache node unavailable; routing around it");
        let node = &self.nodes[member];
        *node.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + self.down_for);
        node.client.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// A connected client of `member`, or the reason it cannot be had.
    pub(crate) async fn node(&self, member: &str) -> Result<Client, ClientError> {
        let node = &self.nodes[member];
        if let Some(c) = node
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let c = Client::connect(node.cfg.clone()).await?;
        *node.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }
}

/// Which owner each key is sent to next: the primary first, then each replica in ring order,
/// skipping owners known to be down. A key is sent again only after `retry`.
pub(crate) struct Routing<'a> {
    next_owner: Vec<usize>,
    todo: Vec<usize>,
    /// A member asked before the ring owners.
    pub(crate) prefer: Option<&'a str>,
}

impl<'a> Routing<'a> {
    pub(crate) fn new(keys: usize) -> Self {
        Self {
            next_owner: vec![0; keys],
            todo: (0..keys).collect(),
            prefer: None,
        }
    }

    /// Key `i` was missed or its node failed: try its next owner in the next round.
    pub(crate) fn retry(&mut self, i: usize) {
        self.todo.push(i);
    }

    /// Key `i` was answered; counts it as a replica read if a later owner answered.
    pub(crate) fn found(&self, i: usize, counters: &Counters) {
        if self.next_owner[i] > 1 + self.prefer.is_some() as usize {
            counters.replica_reads.fetch_add(1, Relaxed);
        }
    }

    /// The keys to send this round, grouped by owner; None when nothing is left to try.
    pub(crate) fn next_round(
        &mut self,
        view: &'a View,
        keys: &[BlockKey],
    ) -> Option<BTreeMap<&'a str, Vec<usize>>> {
        let mut shares: BTreeMap<&'a str, Vec<usize>> = BTreeMap::new();
        for i in std::mem::take(&mut self.todo) {
            let owners = view.read_order(keys[i], self.prefer);
            while let Some(&owner) = owners.get(self.next_owner[i]) {
                self.next_owner[i] += 1;
                if !view.is_down(owner) {
                    shares.entry(owner).or_default().push(i);
                    break;
                }
            }
        }
        (!shares.is_empty()).then_some(shares)
    }
}
