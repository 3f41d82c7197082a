//! `kvcache.Client`: one node or a cluster, through `kvcache_client::Kvcache`. Zero-copy calls
//! take `(address, length)` segments ([`crate::segments`]); GPU-direct calls need a client of
//! one node over RDMA.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use kvcache_client::{
    Client as RustClient, ClientConfig, GetOutcome, Kvcache, Target, TransportChoice,
};
use kvcache_core::BlockKey;
use kvcache_core::wire::PutStatus;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::error::{KvcacheError, to_py};
use crate::keys::{key_of, keys_of};
use crate::runtime::block;
use crate::segments::Segments;

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    put_bytes: AtomicU64,
    gets: AtomicU64,
    get_hits: AtomicU64,
    get_bytes: AtomicU64,
    lookups: AtomicU64,
}

/// A client of one kvcache node or of a static cluster.
#[pyclass(module = "kvcache._native", frozen)]
pub(crate) struct Client {
    inner: Mutex<Option<Kvcache>>,
    members: Vec<String>,
    replicas: usize,
    transport: String,
    timeout_s: f64,
    counters: Counters,
}

impl Client {
    /// The checked keys and segments of a zero-copy call, and the client to run it on.
    fn prepare(
        &self,
        keys: Vec<Vec<u8>>,
        segments: Vec<Vec<(usize, usize)>>,
    ) -> PyResult<(Vec<BlockKey>, Segments, Kvcache)> {
        let keys = keys_of(keys)?;
        let segs = Segments::new(segments, keys.len())?;
        Ok((keys, segs, self.client()?))
    }

    /// Counts a zero-copy get's outcomes (`bytes(i)`: key i's length) and turns them into
    /// hits; a block of the wrong size is a ValueError.
    fn hits(&self, outcomes: Vec<GetOutcome>, bytes: impl Fn(usize) -> u64) -> PyResult<Vec<bool>> {
        self.counters.gets.fetch_add(outcomes.len() as u64, Relaxed);
        let mut hits = Vec::with_capacity(outcomes.len());
        for (i, o) in outcomes.into_iter().enumerate() {
            match o {
                GetOutcome::Hit => {
                    self.counters.get_hits.fetch_add(1, Relaxed);
                    self.counters.get_bytes.fetch_add(bytes(i), Relaxed);
                    hits.push(true);
                }
                GetOutcome::Miss => hits.push(false),
                GetOutcome::WrongSize { stored, expected } => {
                    return Err(PyValueError::new_err(format!(
                        "keys[{i}] is stored with {stored} bytes but its segments hold {expected}"
                    )));
                }
            }
        }
        Ok(hits)
    }

    /// The single-node client GPU-direct runs on.
    fn gpu_node(&self) -> PyResult<RustClient> {
        self.client()?.node().cloned().ok_or_else(|| {
            KvcacheError::new_err(
                "GPU-direct needs a client of one node, not a cluster; stage GPU memory through \
                 pinned host memory",
            )
        })
    }

    fn client(&self) -> PyResult<Kvcache> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .clone()
            .ok_or_else(|| KvcacheError::new_err("the client is closed"))
    }
}

#[cfg(all(feature = "rdma", feature = "cuda"))]
fn register_gpu(node: &RustClient, device: usize, addr: u64, length: usize) -> PyResult<String> {
    let stage = |why: String| {
        KvcacheError::new_err(format!(
            "no GPU-direct: {why}; stage GPU memory through pinned host memory"
        ))
    };
    if node.path() != kvcache_client::PathKind::Rdma {
        return Err(stage(format!("this client uses {}, not RDMA", node.path())));
    }
    let gpu = kvcache_transport::cuda::Gpu::open(device).map_err(|e| stage(e.to_string()))?;
    // SAFETY: the caller promises the memory stays allocated while the client lives
    // (documented; the connector registers the engine's KV tensors, which do).
    let method = unsafe { node.register_gpu_memory(&gpu, addr, length) }
        .map_err(|e| KvcacheError::new_err(e.to_string()))?;
    Ok(method.to_string())
}

#[cfg(not(all(feature = "rdma", feature = "cuda")))]
fn register_gpu(node: &RustClient, _device: usize, _addr: u64, _length: usize) -> PyResult<String> {
    Err(KvcacheError::new_err(format!(
        "this kvcache module was built without GPU-direct (the `rdma` and `cuda` features; \
         this client uses {}); stage GPU memory through pinned host memory",
        node.path()
    )))
}

/// Logs through Python's `logging` (logger `kvcache`), where Python users look.
fn log_info(py: Python<'_>, message: &str) -> PyResult<()> {
    py.import("logging")?
        .call_method1("getLogger", ("kvcache",))?
        .call_method1("info", (message,))?;
    Ok(())
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (addr, *, transport = "auto", timeout_s = 5.0, max_connections = 16, replicas = 1, token = None))]
    fn new(
        py: Python<'_>,
        addr: &Bound<'_, PyAny>,
        transport: &str,
        timeout_s: f64,
        max_connections: usize,
        replicas: usize,
        token: Option<String>,
    ) -> PyResult<Self> {
        let wanted: TransportChoice = transport.parse().map_err(to_py)?;
        if !(timeout_s > 0.0 && timeout_s.is_finite()) {
            return Err(PyValueError::new_err(
                "timeout_s must be a positive number of seconds",
            ));
        }
        if max_connections == 0 || replicas == 0 {
            return Err(PyValueError::new_err(
                "max_connections and replicas must be at least 1",
            ));
        }
        let target = match addr.extract::<String>() {
            Ok(a) if a.starts_with("etcd://") => Target::Etcd(a),
            Ok(a) => Target::Node(a),
            Err(_) => Target::Members(addr.extract::<Vec<String>>().map_err(|_| {
                PyValueError::new_err("addr must be \"host:port\" or a list of them")
            })?),
        };
        let members = target.members();
        if members.is_empty() {
            return Err(PyValueError::new_err("a cluster needs at least one member"));
        }
        if matches!(target, Target::Node(_)) && replicas > 1 {
            return Err(PyValueError::new_err(
                "replicas > 1 needs a list of members",
            ));
        }
        let mut cfg = ClientConfig::new(members[0].clone());
        cfg.timeout = Duration::from_secs_f64(timeout_s);
        cfg.max_connections = max_connections;
        cfg.transport = wanted;
        cfg.token = token
            .or_else(|| std::env::var("KVCACHE_TOKEN").ok())
            .filter(|t| !t.is_empty());
        // The membership watch a cluster of etcd:// spawns runs on the I/O runtime's threads.
        let backend = block(py, Kvcache::connect(target, cfg, replicas)).map_err(to_py)?;
        let mut transport = transport.to_string();
        if let Some(client) = backend.node() {
            if let Some(why) = client.shm_fallback_reason() {
                log_info(
                    py,
                    &format!(
                        "kvcache: shared memory unavailable for {} ({why}); using TCP",
                        members[0]
                    ),
                )?;
            }
            transport = client.path().to_string();
        }
        Ok(Self {
            inner: Mutex::new(Some(backend)),
            members,
            replicas,
            transport,
            timeout_s,
            counters: Counters::default(),
        })
    }

    /// Stores one block; True if it is stored (now or already), False if the node refused it.
    fn put(&self, py: Python<'_>, key: Vec<u8>, value: PyBuffer<u8>) -> PyResult<bool> {
        let key = key_of(&key, "key")?;
        if !value.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "value must be a contiguous bytes-like object",
            ));
        }
        let len = value.len_bytes();
        // SAFETY: a contiguous buffer of `len` bytes, kept alive (and exported, so not resized)
        // by `value` for the whole call.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(value.buf_ptr() as *const u8, len) };
        let client = self.client()?;
        let stored =
            block(py, client.put_many_segments(&[key], &[&[bytes]], None)).map_err(to_py)?;
        self.counters.puts.fetch_add(1, Relaxed);
        self.counters.put_bytes.fetch_add(len as u64, Relaxed);
        Ok(stored[0])
    }

    /// Fetches one block, or None.
    fn get<'py>(&self, py: Python<'py>, key: Vec<u8>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let key = key_of(&key, "key")?;
        let client = self.client()?;
        let value = block(py, client.get_many(&[key]))
            .map_err(to_py)?
            .pop()
            .flatten();
        self.counters.gets.fetch_add(1, Relaxed);
        Ok(value.map(|v| {
            self.counters.get_hits.fetch_add(1, Relaxed);
            self.counters.get_bytes.fetch_add(v.len() as u64, Relaxed);
            PyBytes::new(py, &v)
        }))
    }

    /// Which keys are stored.
    fn exists(&self, py: Python<'_>, keys: Vec<Vec<u8>>) -> PyResult<Vec<bool>> {
        let keys = keys_of(keys)?;
        let client = self.client()?;
        self.counters.lookups.fetch_add(1, Relaxed);
        block(py, client.exists(&keys)).map_err(to_py)
    }

    /// How many leading keys of a chain are stored.
    fn prefix_match(&self, py: Python<'_>, keys: Vec<Vec<u8>>) -> PyResult<usize> {
        let keys = keys_of(keys)?;
        let client = self.client()?;
        self.counters.lookups.fetch_add(1, Relaxed);
        block(py, client.prefix_match(&keys)).map_err(to_py)
    }

    /// Stores blocks gathered from caller memory: `segments[i]` lists key i's
    /// `(address, length)` pieces in order. Returns, per key, whether it is stored. In a
    /// cluster, `prefer` names a member that also keeps a copy (a locality hint).
    #[pyo3(signature = (keys, segments, *, prefer = None))]
    fn put_many(
        &self,
        py: Python<'_>,
        keys: Vec<Vec<u8>>,
        segments: Vec<Vec<(usize, usize)>>,
        prefer: Option<String>,
    ) -> PyResult<Vec<bool>> {
        let (keys, segs, client) = self.prepare(keys, segments)?;
        // SAFETY: the caller promises the segments are readable for the call (documented).
        let views = unsafe { segs.read() };
        let values: Vec<&[&[u8]]> = views.iter().map(|v| v.as_slice()).collect();
        let stored = block(
            py,
            client.put_many_segments(&keys, &values, prefer.as_deref()),
        )
        .map_err(to_py)?;
        self.counters.puts.fetch_add(keys.len() as u64, Relaxed);
        let bytes: usize = (0..keys.len()).map(|i| segs.len(i)).sum();
        self.counters.put_bytes.fetch_add(bytes as u64, Relaxed);
        Ok(stored)
    }

    /// Fetches blocks straight into caller memory: `segments[i]` lists key i's
    /// `(address, length)` destinations, filled in order. Returns, per key, True for a hit and
    /// False for a miss. A stored block whose length differs from its segments' total raises
    /// ValueError (the destination is left untouched). In a cluster, `prefer` is asked first.
    #[pyo3(signature = (keys, segments, *, prefer = None))]
    fn get_many_into(
        &self,
        py: Python<'_>,
        keys: Vec<Vec<u8>>,
        segments: Vec<Vec<(usize, usize)>>,
        prefer: Option<String>,
    ) -> PyResult<Vec<bool>> {
        let (keys, segs, client) = self.prepare(keys, segments)?;
        // SAFETY: the caller promises the segments are writable for the call (documented);
        // `Segments::new` checked they do not overlap.
        let mut views = unsafe { segs.write() };
        let outcomes = block(
            py,
            client.get_many_into(&keys, &mut views, prefer.as_deref()),
        )
        .map_err(to_py)?;
        self.hits(outcomes, |i| segs.len(i) as u64)
    }

    /// Registers `length` bytes of GPU memory at device address `addr` on CUDA device
    /// `device` (a KV tensor: `tensor.data_ptr()`, `tensor.nbytes`) for GPU-direct RDMA, once.
    /// Returns how it was registered (`"dmabuf"` or peer memory). Raises KvcacheError saying
    /// why when it cannot be: this module was built without the `rdma` and `cuda` features,
    /// the client talks to a cluster or does not use RDMA, or the stack cannot register GPU
    /// memory. Then stage through pinned host memory.
    fn register_gpu_memory(&self, device: usize, addr: u64, length: usize) -> PyResult<String> {
        let node = self.gpu_node()?;
        register_gpu(&node, device, addr, length)
    }

    /// Fetches blocks straight into GPU memory registered with `register_gpu_memory`:
    /// `segments[i]` lists key i's `(device address, length)` destinations. The node checks
    /// every block as it leases it. Returns, per key, True for a hit and False for a miss.
    fn get_many_into_gpu(
        &self,
        py: Python<'_>,
        keys: Vec<Vec<u8>>,
        segments: Vec<Vec<(u64, u64)>>,
    ) -> PyResult<Vec<bool>> {
        let keys = keys_of(keys)?;
        let node = self.gpu_node()?;
        let outcomes = block(py, node.get_many_into_gpu(&keys, &segments)).map_err(to_py)?;
        self.hits(outcomes, |i| segments[i].iter().map(|s| s.1).sum())
    }

    /// Stores blocks straight from GPU memory registered with `register_gpu_memory`:
    /// `segments[i]` lists key i's `(device address, length)` pieces in order. Returns, per
    /// key, whether it is stored.
    fn put_many_from_gpu(
        &self,
        py: Python<'_>,
        keys: Vec<Vec<u8>>,
        segments: Vec<Vec<(u64, u64)>>,
    ) -> PyResult<Vec<bool>> {
        let keys = keys_of(keys)?;
        let node = self.gpu_node()?;
        let statuses = block(py, node.put_many_from_gpu(&keys, &segments)).map_err(to_py)?;
        let bytes: u64 = segments.iter().flatten().map(|s| s.1).sum();
        self.counters.puts.fetch_add(keys.len() as u64, Relaxed);
        self.counters.put_bytes.fetch_add(bytes, Relaxed);
        Ok(statuses.into_iter().map(PutStatus::is_stored).collect())
    }

    /// What this client did, and what the node says about itself.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("members", self.members.clone())?;
        d.set_item("replicas", self.replicas)?;
        d.set_item("transport", &self.transport)?;
        d.set_item("timeout_s", self.timeout_s)?;
        match self.client()? {
            Kvcache::Node(client) => {
                let ping = block(py, client.ping()).map_err(to_py)?;
                d.set_item("server_version", ping.server_version)?;
                d.set_item("protocol_version", ping.protocol_version)?;
                d.set_item("max_payload", ping.max_payload)?;
            }
            Kvcache::Cluster(cluster) => {
                let c = cluster.stats();
                d.set_item("members", c.members)?;
                d.set_item("ring_version", c.ring_version)?;
                d.set_item("replica_reads", c.replica_reads)?;
                d.set_item("failovers", c.failovers)?;
            }
        }
        let c = &self.counters;
        for (name, v) in [
            ("puts", &c.puts),
            ("put_bytes", &c.put_bytes),
            ("gets", &c.gets),
            ("get_hits", &c.get_hits),
            ("get_bytes", &c.get_bytes),
            ("lookups", &c.lookups),
        ] {
            d.set_item(name, v.load(Relaxed))?;
        }
        Ok(d)
    }

    /// Closes the client's connections; later calls raise KvcacheError.
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _t: Option<Bound<'_, PyAny>>,
        _v: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) {
        self.close();
    }

    fn __repr__(&self) -> String {
        match self.members.as_slice() {
            [one] if self.replicas == 1 => {
                format!("kvcache.Client({one:?}, transport={:?})", self.transport)
            }
            many => format!(
                "kvcache.Client({many:?}, replicas={}, transport={:?})",
                self.replicas, self.transport
            ),
        }
    }
}
