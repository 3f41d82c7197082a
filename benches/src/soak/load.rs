//! The soak's clients: each its own `Cluster` (R=2, members from etcd) over TCP or shared
//! memory, putting and reading values whose every byte follows from the key, so each read is
//! compared in full. A key enters the ledger only once a put reported it stored; every ledger
//! key must read back (a miss is one R=2 should have prevented: the chaos loop loses at most one
//! node at a time and lets it warm before the next).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvcache_client::{Cluster, ClusterConfig, EtcdMembers, GetOutcome, PutBlocks, TransportChoice};
use kvcache_core::BlockKey;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

/// Calls per client, whatever the clock says: every load loop is bounded.
const MAX_CALLS_PER_CLIENT: u64 = 50_000_000;

/// The value of `key`: a xorshift stream seeded by the key, so a reader can recompute it.
pub fn fill(key: u64, out: &mut [u8]) {
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// What the clients did, summed.
#[derive(Default)]
pub struct Counters {
    pub puts: AtomicU64,
    pub puts_new: AtomicU64,
    pub puts_refused: AtomicU64,
    pub gets: AtomicU64,
    pub values_read: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub wrong_bytes: AtomicU64,
    pub wrong_size: AtomicU64,
    pub errors: AtomicU64,
}

/// [`Counters`] at the end of the run (the JSON's `totals`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub puts: u64,
    pub puts_new: u64,
    pub puts_refused: u64,
    pub gets: u64,
    pub values_read: u64,
    pub hits: u64,
    /// Misses of keys whose put was reported stored: each one R=2 should have prevented.
    pub misses: u64,
    pub wrong_bytes: u64,
    pub wrong_size: u64,
    pub errors: u64,
}

impl Counters {
    pub fn totals(&self) -> Totals {
        Totals {
            puts: self.puts.load(Relaxed),
            puts_new: self.puts_new.load(Relaxed),
            puts_refused: self.puts_refused.load(Relaxed),
            gets: self.gets.load(Relaxed),
            values_read: self.values_read.load(Relaxed),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            wrong_bytes: self.wrong_bytes.load(Relaxed),
            wrong_size: self.wrong_size.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// What every client shares: the keys stored so far, the next new key, the counters, and the
/// first few failures (for the report).
pub struct Shared {
    pub stored: RwLock<Vec<u64>>,
    pub next_key: AtomicU64,
    /// New keys stop here, so the data never reaches a node's eviction watermark.
    pub key_budget: u64,
    pub counters: Counters,
    pub failures: Mutex<Vec<String>>,
    /// Failed reads and writes per second of the run (the second since `begin`).
    pub failures_by_second: Mutex<BTreeMap<u64, u64>>,
    pub begin: Instant,
    pub stop: AtomicBool,
}

impl Shared {
    pub fn new(key_budget: u64, begin: Instant) -> Self {
        Shared {
            failures_by_second: Mutex::new(BTreeMap::new()),
            begin,
            stored: RwLock::new(Vec::new()),
            next_key: AtomicU64::new(1),
            key_budget,
            counters: Counters::default(),
            failures: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }
    }

    fn fail(&self, what: String) {
        let t = self.begin.elapsed().as_secs_f64();
        *self.failures_by_second.lock().entry(t as u64).or_default() += 1;
        let mut f = self.failures.lock();
        if f.len() < 20 {
            f.push(format!("{t:.1} s: {what}"));
        }
    }
}

/// One client's settings.
pub struct ClientPlan {
    pub id: usize,
    pub etcd: String,
    pub transport: TransportChoice,
    pub value_bytes: usize,
    pub batch: usize,
    /// Fraction of calls that are puts.
    pub put_fraction: f64,
    pub deadline: Instant,
}

/// A cluster client of the soak's etcd, R=2.
pub async fn connect(etcd: &str, transport: TransportChoice) -> anyhow::Result<Arc<Cluster>> {
    let source = EtcdMembers::new(etcd, Duration::from_millis(200), Duration::from_secs(1))?;
    let mut cfg = ClusterConfig::new(Vec::<String>::new());
    cfg.replicas = 2;
    cfg.node.transport = transport;
    cfg.node.timeout = Duration::from_secs(2);
    cfg.down_for = Duration::from_millis(500);
    Ok(Arc::new(Cluster::with_source(Arc::new(source), cfg).await?))
}

/// Runs one client until the deadline or the stop flag.
pub async fn client(plan: ClientPlan, shared: Arc<Shared>) -> anyhow::Result<()> {
    let c = connect(&plan.etcd, plan.transport).await?;
    let n = plan.value_bytes;
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (plan.id as u64 + 1);
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut value = vec![0u8; n];
    let mut want = vec![0u8; n];
    let mut bufs = vec![vec![0u8; n]; plan.batch];
    let ctr = &shared.counters;
    for _ in 0..MAX_CALLS_PER_CLIENT {
        if Instant::now() >= plan.deadline || shared.stop.load(Relaxed) {
            break;
        }
        let stored_len = shared.stored.read().len();
        let put = stored_len == 0 || (rand() % 1000) as f64 / 1000.0 < plan.put_fraction;
        if put {
            // A new key while the budget lasts; then a stored one again (the server takes the
            // bytes and answers AlreadyPresent), so puts keep crossing the data path.
            let fresh = shared.next_key.fetch_add(1, Relaxed);
            let (key, new) = if fresh <= shared.key_budget || stored_len == 0 {
                (fresh, true)
            } else {
                (shared.stored.read()[rand() as usize % stored_len], false)
            };
            fill(key, &mut value);
            ctr.puts.fetch_add(1, Relaxed);
            match c.put_many(&[(BlockKey(key as u128), &value[..])]).await {
                Ok(done) if done.first() == Some(&true) => {
                    if new {
                        ctr.puts_new.fetch_add(1, Relaxed);
                        shared.stored.write().push(key);
                    }
                }
                Ok(_) => {
                    ctr.puts_refused.fetch_add(1, Relaxed);
                    shared.fail(format!("put of key {key} was stored by no owner"));
                }
                Err(e) => {
                    ctr.errors.fetch_add(1, Relaxed);
                    shared.fail(format!("put of key {key}: {e}"));
                }
            }
            continue;
        }
        let keys: Vec<u64> = {
            let stored = shared.stored.read();
            (0..plan.batch)
                .map(|_| stored[rand() as usize % stored.len()])
                .collect()
        };
        let block_keys: Vec<BlockKey> = keys.iter().map(|&k| BlockKey(k as u128)).collect();
        for b in bufs.iter_mut() {
            b.fill(0xA5);
        }
        let mut dst: Vec<Vec<&mut [u8]>> = bufs.iter_mut().map(|b| vec![&mut b[..]]).collect();
        ctr.gets.fetch_add(1, Relaxed);
        let outcomes = match c.get_many_into(&block_keys, &mut dst).await {
            Ok(o) => o,
            Err(e) => {
                ctr.errors.fetch_add(1, Relaxed);
                shared.fail(format!("get of {} keys: {e}", keys.len()));
                continue;
            }
        };
        drop(dst);
        for ((&key, outcome), got) in keys.iter().zip(outcomes).zip(&bufs) {
            ctr.values_read.fetch_add(1, Relaxed);
            match outcome {
                GetOutcome::Hit => {
                    fill(key, &mut want);
                    let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                    if wrong == 0 {
                        ctr.hits.fetch_add(1, Relaxed);
                    } else {
                        ctr.wrong_bytes.fetch_add(wrong as u64, Relaxed);
                        shared.fail(format!("key {key}: {wrong} wrong bytes"));
                    }
                }
                GetOutcome::Miss => {
                    ctr.misses.fetch_add(1, Relaxed);
                    shared.fail(format!("key {key}: a miss, though its put was stored"));
                }
                GetOutcome::WrongSize { stored, expected } => {
                    ctr.wrong_size.fetch_add(1, Relaxed);
                    shared.fail(format!(
                        "key {key}: stored {stored} bytes, expected {expected}"
                    ));
                }
            }
        }
    }
    Ok(())
}
