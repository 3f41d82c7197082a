//! kvcache-client: the async Rust client of a kvcache node.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvcache_client::ClientError> {
//! use kvcache_client::{Client, ClientConfig};
//! use kvcache_core::BlockKey;
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7400")).await?;
//! client.put(BlockKey(1), b"kv bytes").await?;
//! assert_eq!(client.get(BlockKey(1)).await?.as_deref(), Some(&b"kv bytes"[..]));
//! # Ok(()) }
//! ```
//!
//! Every call takes a pooled connection, runs one request under the configured timeout, and
//! returns the connection to the pool only if the exchange completed cleanly; a connection
//! that timed out or saw an error is dropped, never reused in an unknown state.
//!
//! With a node on the same host, the client uses shared memory ([`Transport::Auto`], the
//! default): gets copy straight out of the node's pool into the caller's memory, checking every
//! chunk, and puts go through a staging window. Otherwise, or with [`Transport::Tcp`], bytes
//! travel inline over TCP.

mod cluster;
mod connection;
mod deadline;
mod error;
#[cfg(feature = "rdma")]
mod rdma;
mod shm;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvcache_core::BlockKey;
use kvcache_core::wire::{
    ExistsReply, ExistsRequest, GetRequest, ListKeysReply, ListKeysRequest, Op, PingReply,
    PingRequest, PrefixMatchReply, PrefixMatchRequest, PutReply, PutRequest, PutStatus,
    ShmPutRequest, decode_keys, encode_keys,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use cluster::{
    Cluster, ClusterConfig, ClusterStats, ETCD_MEMBERS_PREFIX, EtcdMembers, MemberSource,
    StaticMembers,
};
use connection::Connection;
pub use error::ClientError;

/// Runs `$body` with `$c` bound to a pooled connection, under the client's timeout (or the
/// enclosing call's deadline, when that is earlier: [`deadline`]); keeps the connection only on
/// success.
///
/// If the connection fails (reset, closed mid-reply), the idle pool is emptied, since its
/// connections likely share the fate, and the body runs again on a fresh connection within
/// the same timeout, up to `$attempts` times in all. Every operation is idempotent (blocks are
/// immutable). The node closes a reply it cannot finish truthfully (a block that fails
/// verification mid-stream) after dropping that block, so each such retry makes progress and
/// a get of n keys needs at most n + 1 attempts to turn every corrupt block into a clean miss. (A macro rather than an async closure so the
/// body's borrows and `Send`-ness are inferred as if written inline.)
macro_rules! with_conn {
    ($client:expr, $op:expr, |$c:ident| $body:expr) => {
        with_conn!($client, $op, 2, |$c| $body)
    };
    ($client:expr, $op:expr, $attempts:expr, |$c:ident| $body:expr) => {{
        let client: &Client = $client;
        let timeout = client.inner.cfg.timeout;
        let run = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut checkout = client.checkout().await?;
                let result: Result<_, ClientError> = {
                    let $c = &mut checkout.conn;
                    async { $body }.await
                };
                match result {
                    Ok(v) => return Ok((v, checkout)),
                    Err(ClientError::Io(e)) if attempt < $attempts => {
                        tracing::debug!(op = $op, attempt, error = %e, "connection failed; retrying on a fresh one");
                        client.inner.idle_conns().clear();
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout_at(deadline::until(timeout), run).await {
            Ok(Ok((v, checkout))) => {
                client.checkin(checkout);
                Ok(v)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout { op: $op, after: timeout }),
        }
    }};
}

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
    /// Limit for one call, connect included: a get split into chunks, or a cluster read that
    /// asks replicas after the owners, finishes within it in all.
    pub timeout: Duration,
    /// Most keys per get request; larger batches are split.
    pub max_get_keys: usize,
    /// How bytes move: shared memory when possible, or TCP.
    pub transport: Transport,
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
            transport: Transport::Auto,
            shm_staging_bytes: 64 << 20,
            token: None,
        }
    }
}

/// How a client moves block bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory when the node is on this host and lets us map its pool; else TCP, with a
    /// log line saying why.
    #[default]
    Auto,
    /// Shared memory or fail.
    Shm,
    /// One-sided RDMA or fail (a build with the `rdma` feature and a device at both ends).
    Rdma,
    /// TCP only.
    Tcp,
}

impl std::str::FromStr for Transport {
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

/// Blocks of one slice each, viewed as the segment lists the `*_segments` calls take.
pub(crate) struct OneSegment<'a> {
    keys: Vec<BlockKey>,
    values: Vec<[&'a [u8]; 1]>,
}

impl<'a> OneSegment<'a> {
    pub(crate) fn new(blocks: &[(BlockKey, &'a [u8])]) -> Self {
        Self {
            keys: blocks.iter().map(|b| b.0).collect(),
            values: blocks.iter().map(|b| [b.1]).collect(),
        }
    }

    pub(crate) fn segments(&self) -> Vec<&[&'a [u8]]> {
        self.values.iter().map(|v| &v[..]).collect()
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

/// A pooled, cloneable client of one kvcache node.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    /// Connections not in use. A plain mutex: it is never held across an await.
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    max_payload: u32,
    /// The node's shared-memory socket, when this client uses shared memory.
    shm_path: Option<String>,
    /// The pool mapped by the latest shared-memory connection, reused by the next ones.
    shm_pool: Mutex<Option<Arc<shm::ShmPool>>>,
    /// Why `Transport::Auto` settled for TCP.
    shm_fallback: Option<String>,
    /// Set when this client moves bytes over RDMA.
    #[cfg(feature = "rdma")]
    rdma: Option<Arc<rdma::Shared>>,
}

impl Inner {
    fn idle_conns(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<shm::ShmPool>>> {
        self.shm_pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection checked out of the pool, holding its slot.
struct Checkout {
    conn: Connection,
    _permit: OwnedSemaphorePermit,
}

impl Client {
    /// Connects and checks that the node speaks our protocol.
    pub async fn connect(cfg: ClientConfig) -> Result<Self, ClientError> {
        if cfg.max_connections == 0 || cfg.max_get_keys == 0 {
            return Err(ClientError::InvalidArgument(
                "max_connections and max_get_keys must be positive".into(),
            ));
        }
        let token = cfg.token.as_deref();
        let mut conn = tokio::time::timeout_at(
            deadline::until(cfg.timeout),
            Connection::open(&cfg.addr, token),
        )
        .await
        .map_err(|_| ClientError::Timeout {
            op: "connect",
            after: cfg.timeout,
        })??;
        let ping: PingReply = tokio::time::timeout_at(
            deadline::until(cfg.timeout),
            conn.call_simple(Op::Ping, &PingRequest {}),
        )
        .await
        .map_err(|_| ClientError::Timeout {
            op: "ping",
            after: cfg.timeout,
        })??;
        let mut shm_path = None;
        let mut shm_pool = None;
        let mut shm_fallback = None;
        #[cfg(feature = "rdma")]
        let mut rdma_shared = None;
        if matches!(cfg.transport, Transport::Auto | Transport::Shm) {
            match Self::try_shm(&cfg, &ping).await {
                Ok(shm_conn) => {
                    shm_pool = shm_conn.shm.as_ref().map(|a| Arc::clone(&a.pool));
                    shm_path = Some(ping.shm_socket.clone());
                    conn = shm_conn;
                    tracing::debug!(node = %cfg.addr, socket = %ping.shm_socket, "kvcache: using shared memory");
                }
                Err(e) if cfg.transport == Transport::Shm => return Err(e),
                Err(e) => shm_fallback = Some(e.to_string()),
            }
        }
        if shm_path.is_none() && matches!(cfg.transport, Transport::Auto | Transport::Rdma) {
            match Self::try_rdma(&cfg, &ping, &mut conn).await {
                #[cfg(feature = "rdma")]
                Ok(shared) => {
                    tracing::debug!(node = %cfg.addr, device = shared.device_name(), "kvcache: using RDMA");
                    rdma_shared = Some(shared);
                    shm_fallback = None;
                }
                Err(e) if cfg.transport == Transport::Rdma => return Err(e),
                Err(e) => {
                    let why = match shm_fallback.take() {
                        Some(shm) => format!("{shm}; {e}"),
                        None => e.to_string(),
                    };
                    // The one line that says why bytes go over TCP.
                    tracing::info!(node = %cfg.addr, reason = %why, "kvcache: using TCP");
                    shm_fallback = Some(why);
                }
            }
        }
        let inner = Inner {
            permits: Arc::new(Semaphore::new(cfg.max_connections)),
            idle: Mutex::new(vec![conn]),
            max_payload: ping.max_payload,
            shm_path,
            shm_pool: Mutex::new(shm_pool),
            shm_fallback,
            #[cfg(feature = "rdma")]
            rdma: rdma_shared,
            cfg,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Opens the first shared-memory connection, or says why it cannot.
    async fn try_shm(cfg: &ClientConfig, ping: &PingReply) -> Result<Connection, ClientError> {
        if let Some(why) = shm::unavailable_reason(ping) {
            return Err(ClientError::ShmUnavailable(why));
        }
        let open = Connection::open_shm(
            &ping.shm_socket,
            cfg.shm_staging_bytes,
            None,
            cfg.token.as_deref(),
        );
        match tokio::time::timeout_at(deadline::until(cfg.timeout), open).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(ClientError::ShmUnavailable(format!(
                "cannot attach to {}: {e}",
                ping.shm_socket
            ))),
            Err(_) => Err(ClientError::ShmUnavailable(format!(
                "attaching to {} timed out",
                ping.shm_socket
            ))),
        }
    }

    /// Sets up RDMA on `conn` (a fresh TCP connection), or says why not.
    #[cfg(feature = "rdma")]
    async fn try_rdma(
        cfg: &ClientConfig,
        ping: &PingReply,
        conn: &mut Connection,
    ) -> Result<Arc<rdma::Shared>, ClientError> {
        if ping.rdma_device.is_empty() {
            return Err(ClientError::RdmaUnavailable(
                "the node serves no RDMA (its log says why)".into(),
            ));
        }
        let here = rdma::Shared::open().map_err(|why| {
            ClientError::RdmaUnavailable(format!("this host has no RDMA device ({why})"))
        })?;
        let attach = rdma::attach(conn, &here, cfg.shm_staging_bytes, cfg.timeout);
        let attached = tokio::time::timeout_at(deadline::until(cfg.timeout), attach)
            .await
            .map_err(|_| ClientError::RdmaUnavailable("connecting queue pairs timed out".into()))?
            .map_err(|e| match e {
                ClientError::RdmaUnavailable(_) => e,
                other => ClientError::RdmaUnavailable(other.to_string()),
            })?;
        conn.rdma = Some(attached);
        Ok(here)
    }

    /// Without the `rdma` feature, says so when RDMA could have been used.
    #[cfg(not(feature = "rdma"))]
    async fn try_rdma(
        _cfg: &ClientConfig,
        ping: &PingReply,
        _conn: &mut Connection,
    ) -> Result<std::convert::Infallible, ClientError> {
        Err(ClientError::RdmaUnavailable(
            if ping.rdma_device.is_empty() {
                "the node serves no RDMA".into()
            } else {
                format!(
                    "the node offers RDMA ({}) but this client was built without the `rdma` feature",
                    ping.rdma_device
                )
            },
        ))
    }

    /// Registers `len` bytes at `addr` (e.g. a KV cache tensor) with this client's RDMA
    /// device, once: gets then land straight in that memory and puts read straight from it.
    /// Does nothing (and succeeds) when the client does not use RDMA.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Client::unregister_memory`] or the client is dropped.
    pub unsafe fn register_memory(&self, addr: usize, len: usize) -> Result<(), ClientError> {
        #[cfg(feature = "rdma")]
        if let Some(shared) = &self.inner.rdma {
            // SAFETY: upheld by the caller.
            return unsafe { shared.register(addr, len) };
        }
        let _ = (addr, len);
        Ok(())
    }

    /// Registers `len` bytes of `gpu`'s memory at device address `addr` (e.g. a KV cache
    /// tensor) for GPU-direct RDMA, once: [`Client::get_many_into_gpu`] then READs blocks
    /// straight into it and [`Client::put_many_from_gpu`] WRITEs them straight from it.
    /// Returns how it was registered (dmabuf, else NVIDIA's peer-memory module). Fails, saying
    /// why, when this client does not use RDMA or the stack cannot register GPU memory: then
    /// stage through pinned host memory.
    ///
    /// # Safety
    /// The memory must stay allocated until [`Client::unregister_memory`] or the client is
    /// dropped.
    #[cfg(all(feature = "rdma", feature = "cuda"))]
    pub unsafe fn register_gpu_memory(
        &self,
        gpu: &kvcache_transport::cuda::Gpu,
        addr: u64,
        len: usize,
    ) -> Result<kvcache_transport::rdma::gpudirect::Method, ClientError> {
        let Some(shared) = &self.inner.rdma else {
            return Err(self.no_gpu_direct());
        };
        // SAFETY: upheld by the caller.
        unsafe { shared.register_gpu(gpu, addr, len) }
    }

    /// Fetches blocks straight into GPU memory registered with
    /// [`Client::register_gpu_memory`] (GPU-direct RDMA): `dst[i]` lists key i's destination
    /// spans (device address, length), filled in order. The node checks each block as it leases
    /// it, since this process cannot read GPU memory to check it. Without an RDMA connection
    /// this is an error that says to stage through pinned host memory.
    pub async fn get_many_into_gpu(
        &self,
        keys: &[BlockKey],
        dst: &[Vec<DeviceSpan>],
    ) -> Result<Vec<GetOutcome>, ClientError> {
        error::same_len(keys.len(), dst.len(), "destinations")?;
        #[cfg(feature = "rdma")]
        if self.inner.rdma.is_some() {
            return deadline::within(self.inner.cfg.timeout, async {
                let mut out = Vec::with_capacity(keys.len());
                let max_keys = self.inner.cfg.max_get_keys;
                for (chunk, dst) in keys.chunks(max_keys).zip(dst.chunks(max_keys)) {
                    let got = with_conn!(self, "get", |c| rdma::get_into_gpu(c, chunk, dst).await)?;
                    out.extend(got);
                }
                Ok(out)
            })
            .await;
        }
        Err(self.no_gpu_direct())
    }

    /// Stores blocks straight from GPU memory registered with [`Client::register_gpu_memory`]
    /// (GPU-direct RDMA): `src[i]` lists key i's spans (device address, length), gathered in
    /// order. Without an RDMA connection this is an error that says to stage through pinned
    /// host memory.
    pub async fn put_many_from_gpu(
        &self,
        keys: &[BlockKey],
        src: &[Vec<DeviceSpan>],
    ) -> Result<Vec<PutStatus>, ClientError> {
        error::same_len(keys.len(), src.len(), "sources")?;
        let lens: Vec<u64> = src.iter().map(|s| s.iter().map(|s| s.1).sum()).collect();
        self.check_lens(&lens)?;
        #[cfg(feature = "rdma")]
        if self.inner.rdma.is_some() {
            return with_conn!(self, "put", |c| rdma::put_from_gpu(c, keys, src, &lens)
                .await);
        }
        Err(self.no_gpu_direct())
    }

    /// Refuses empty blocks and blocks over the node's frame limit, naming the first.
    fn check_lens(&self, lens: &[u64]) -> Result<(), ClientError> {
        let max = self.inner.max_payload as u64;
        match lens.iter().position(|&l| l == 0 || l > max) {
            Some(i) => Err(ClientError::InvalidArgument(format!(
                "block {i} has {} bytes; blocks must be 1 byte to {max} bytes",
                lens[i]
            ))),
            None => Ok(()),
        }
    }

    fn no_gpu_direct(&self) -> ClientError {
        ClientError::InvalidArgument(format!(
            "GPU-direct needs an RDMA connection to the node, and this client uses {}; \
             stage GPU memory through pinned host memory",
            self.transport()
        ))
    }

    /// Drops the registration made at `addr`; false if there was none.
    pub fn unregister_memory(&self, addr: usize) -> bool {
        #[cfg(feature = "rdma")]
        if let Some(shared) = &self.inner.rdma {
            return shared.unregister(addr);
        }
        let _ = addr;
        false
    }

    /// Why this client uses TCP although shared memory or RDMA was allowed
    /// (`Transport::Auto`): one reason per transport.
    pub fn shm_fallback_reason(&self) -> Option<&str> {
        self.inner.shm_fallback.as_deref()
    }

    /// `"shm"`, `"rdma"` or `"tcp"`: how this client moves bytes.
    pub fn transport(&self) -> &'static str {
        #[cfg(feature = "rdma")]
        if self.inner.rdma.is_some() {
            return "rdma";
        }
        if self.inner.shm_path.is_some() {
            "shm"
        } else {
            "tcp"
        }
    }

    /// The node address.
    pub fn addr(&self) -> &str {
        &self.inner.cfg.addr
    }

    async fn checkout(&self) -> Result<Checkout, ClientError> {
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let idle = self.inner.idle_conns().pop();
        if let Some(conn) = idle {
            return Ok(Checkout {
                conn,
                _permit: permit,
            });
        }
        let conn = match &self.inner.shm_path {
            Some(path) => {
                let known = self.inner.pool_slot().clone();
                let cfg = &self.inner.cfg;
                let conn =
                    Connection::open_shm(path, cfg.shm_staging_bytes, known, cfg.token.as_deref())
                        .await?;
                *self.inner.pool_slot() = conn.shm.as_ref().map(|a| Arc::clone(&a.pool));
                conn
            }
            None => self.open_tcp().await?,
        };
        Ok(Checkout {
            conn,
            _permit: permit,
        })
    }

    /// A fresh TCP connection, with RDMA set up on it when this client uses RDMA.
    async fn open_tcp(&self) -> Result<Connection, ClientError> {
        let cfg = &self.inner.cfg;
        #[allow(unused_mut)]
        let mut conn = Connection::open(&cfg.addr, cfg.token.as_deref()).await?;
        #[cfg(feature = "rdma")]
        if let Some(shared) = &self.inner.rdma {
            let attached = rdma::attach(&mut conn, shared, cfg.shm_staging_bytes, cfg.timeout);
            conn.rdma = Some(attached.await?);
        }
        Ok(conn)
    }

    fn checkin(&self, c: Checkout) {
        self.inner.idle_conns().push(c.conn);
    }

    /// Checks the node is alive; returns what it reports about itself.
    pub async fn ping(&self) -> Result<PingReply, ClientError> {
        with_conn!(self, "ping", |c| {
            c.call_simple(Op::Ping, &PingRequest {}).await
        })
    }

    /// Stores one block.
    pub async fn put(&self, key: BlockKey, value: &[u8]) -> Result<PutStatus, ClientError> {
        Ok(self.put_many(&[(key, value)]).await?[0])
    }

    /// Stores blocks; one status per block, in order.
    pub async fn put_many(
        &self,
        blocks: &[(BlockKey, &[u8])],
    ) -> Result<Vec<PutStatus>, ClientError> {
        let blocks = OneSegment::new(blocks);
        self.put_many_segments(&blocks.keys, &blocks.segments())
            .await
    }

    /// Stores blocks whose bytes are gathered from several segments each (e.g. one block's
    /// slices in many per-layer KV tensors). `values[i]` is key i's list of segments.
    pub async fn put_many_segments(
        &self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
    ) -> Result<Vec<PutStatus>, ClientError> {
        deadline::within(self.inner.cfg.timeout, self.put_chunks(keys, values)).await
    }

    /// [`put_many_segments`](Self::put_many_segments) under the call's deadline.
    async fn put_chunks(
        &self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
    ) -> Result<Vec<PutStatus>, ClientError> {
        error::same_len(keys.len(), values.len(), "values")?;
        let lens: Vec<u64> = values
            .iter()
            .map(|segs| segs.iter().map(|s| s.len() as u64).sum())
            .collect();
        self.check_lens(&lens)?;
        if self.inner.shm_path.is_some() {
            return with_conn!(self, "put", |c| put_shm(c, keys, values, &lens).await);
        }
        #[cfg(feature = "rdma")]
        if self.inner.rdma.is_some() {
            return with_conn!(self, "put", |c| rdma::put(c, keys, values, &lens).await);
        }
        let mut statuses = Vec::with_capacity(keys.len());
        let mut start = 0;
        while start < keys.len() {
            // Greedy chunks that fit the node's frame limit.
            let (mut end, mut bytes) = (start, 0u64);
            while end < keys.len() && bytes + lens[end] <= self.inner.max_payload as u64 {
                bytes += lens[end];
                end += 1;
            }
            let req = PutRequest {
                keys: encode_keys(&keys[start..end]),
                lens: lens[start..end].iter().map(|&l| l as u32).collect(),
            };
            let payload: Vec<&[u8]> = values[start..end]
                .iter()
                .flat_map(|segs| segs.iter().copied())
                .collect();
            let reply: PutReply = with_conn!(self, "put", |c| {
                let (h, control) = c.call(Op::Put, &req, &payload).await?;
                c.expect_no_payload(&h)?;
                connection::decode_reply(&control)
            })?;
            statuses.extend(put_statuses(reply, end - start)?);
            start = end;
        }
        Ok(statuses)
    }

    /// Fetches one block.
    pub async fn get(&self, key: BlockKey) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.get_many(&[key]).await?.pop().flatten())
    }

    /// Fetches blocks into fresh buffers; `None` for a miss.
    pub async fn get_many(&self, keys: &[BlockKey]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        deadline::within(self.inner.cfg.timeout, self.get_chunks(keys)).await
    }

    /// [`get_many`](Self::get_many) under the call's deadline.
    async fn get_chunks(&self, keys: &[BlockKey]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.inner.cfg.max_get_keys) {
            let req = GetRequest {
                keys: encode_keys(chunk),
            };
            let got = with_conn!(self, "get", chunk.len() + 1, |c| {
                if c.shm.is_some() {
                    return get_shm_vecs(c, chunk).await;
                }
                #[cfg(feature = "rdma")]
                if c.rdma.is_some() {
                    return rdma::get_vecs(c, chunk).await;
                }
                let lens = c.call_get(&req, chunk.len()).await?;
                let mut values = Vec::with_capacity(lens.len());
                for len in lens {
                    values.push(match len {
                        0 => None,
                        n => Some(c.read_payload_vec(n as usize).await?),
                    });
                }
                Ok(values)
            })?;
            out.extend(got);
        }
        Ok(out)
    }

    /// Fetches blocks straight into caller memory: `dst[i]` lists key i's destination segments,
    /// filled in order. A block lands only if its stored length equals the segments' total.
    pub async fn get_many_into(
        &self,
        keys: &[BlockKey],
        dst: &mut [Vec<&mut [u8]>],
    ) -> Result<Vec<GetOutcome>, ClientError> {
        deadline::within(self.inner.cfg.timeout, self.get_chunks_into(keys, dst)).await
    }

    /// [`get_many_into`](Self::get_many_into) under the call's deadline.
    async fn get_chunks_into(
        &self,
        keys: &[BlockKey],
        dst: &mut [Vec<&mut [u8]>],
    ) -> Result<Vec<GetOutcome>, ClientError> {
        error::same_len(keys.len(), dst.len(), "destinations")?;
        let mut out = Vec::with_capacity(keys.len());
        let max_keys = self.inner.cfg.max_get_keys;
        for (chunk, dst) in keys.chunks(max_keys).zip(dst.chunks_mut(max_keys)) {
            let req = GetRequest {
                keys: encode_keys(chunk),
            };
            let got = with_conn!(self, "get", chunk.len() + 1, |c| {
                if c.shm.is_some() {
                    return get_shm_into(c, chunk, dst).await;
                }
                #[cfg(feature = "rdma")]
                if c.rdma.is_some() {
                    return rdma::get_into(c, chunk, dst).await;
                }
                let lens = c.call_get(&req, chunk.len()).await?;
                let mut outcomes = Vec::with_capacity(lens.len());
                for (len, segs) in lens.into_iter().zip(dst.iter_mut()) {
                    let expected: usize = segs.iter().map(|s| s.len()).sum();
                    outcomes.push(match len as usize {
                        0 => GetOutcome::Miss,
                        n if n == expected => {
                            for s in segs.iter_mut() {
                                c.read_payload_into(s).await?;
                            }
                            GetOutcome::Hit
                        }
                        n => {
                            c.skip_payload(n).await?;
                            GetOutcome::WrongSize {
                                stored: n,
                                expected,
                            }
                        }
                    });
                }
                Ok(outcomes)
            })?;
            out.extend(got);
        }
        Ok(out)
    }

    /// Which keys are stored.
    pub async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>, ClientError> {
        let req = ExistsRequest {
            keys: encode_keys(keys),
        };
        let reply: ExistsReply =
            with_conn!(self, "exists", |c| c.call_simple(Op::Exists, &req).await)?;
        if reply.present.len() != keys.len() {
            return Err(ClientError::Protocol(format!(
                "{} flags for {} keys",
                reply.present.len(),
                keys.len()
            )));
        }
        Ok(reply.present)
    }

    /// How many leading keys of a chain are stored: the cached prefix length in blocks.
    pub async fn prefix_match(&self, keys: &[BlockKey]) -> Result<usize, ClientError> {
        let req = PrefixMatchRequest {
            keys: encode_keys(keys),
        };
        let reply: PrefixMatchReply = with_conn!(self, "prefix_match", |c| {
            c.call_simple(Op::PrefixMatch, &req).await
        })?;
        if reply.matched as usize > keys.len() {
            return Err(ClientError::Protocol(format!(
                "matched {} of {} keys",
                reply.matched,
                keys.len()
            )));
        }
        Ok(reply.matched as usize)
    }

    /// Up to `limit` stored keys greater than `after` (all keys when `None`), ascending, and
    /// whether more remain: page through a node with `after` = the last key of the page before.
    /// The node may return fewer than `limit` keys per page (its control-message limit).
    pub async fn list_keys(
        &self,
        after: Option<BlockKey>,
        limit: u32,
    ) -> Result<(Vec<BlockKey>, bool), ClientError> {
        let req = ListKeysRequest {
            after: after.map(|k| k.to_bytes().to_vec()).unwrap_or_default(),
            limit,
        };
        let reply: ListKeysReply = with_conn!(self, "list_keys", |c| {
            c.call_simple(Op::ListKeys, &req).await
        })?;
        let keys = decode_keys(&reply.keys).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if keys.len() > limit as usize
            || keys.windows(2).any(|w| w[0] >= w[1])
            || after.is_some_and(|a| keys.first().is_some_and(|k| *k <= a))
        {
            return Err(ClientError::Protocol(format!(
                "list_keys returned {} keys, not ascending after the cursor",
                keys.len()
            )));
        }
        Ok((keys, reply.more))
    }
}

/// Checks a put reply's statuses: one known status per block.
fn put_statuses(reply: PutReply, blocks: usize) -> Result<Vec<PutStatus>, ClientError> {
    if reply.statuses.len() != blocks {
        return Err(ClientError::Protocol(format!(
            "{} statuses for {blocks} blocks",
            reply.statuses.len()
        )));
    }
    reply
        .statuses
        .into_iter()
        .map(|s| {
            PutStatus::try_from(s)
                .map_err(|_| ClientError::Protocol(format!("unknown put status {s}")))
        })
        .collect()
}

/// A put over shared memory: blocks go into the connection's staging window, as many at a time
/// as fit, and the node copies them into its pool.
async fn put_shm(
    c: &mut Connection,
    keys: &[BlockKey],
    values: &[&[&[u8]]],
    lens: &[u64],
) -> Result<Vec<PutStatus>, ClientError> {
    let mut statuses = Vec::with_capacity(keys.len());
    let mut start = 0;
    while start < keys.len() {
        let staging = &mut c.shm.as_mut().expect("shared-memory connection").staging;
        let end = start + staged_batch(lens, start, staging.len(), "shared-memory")?;
        let staged = staging.stage(&values[start..end], &lens[start..end]);
        statuses
            .extend(commit_staged(c, &keys[start..end], &lens[start..end], staged.offsets).await?);
        start = end;
    }
    Ok(statuses)
}

/// How many blocks from `start` fit a staging window of `window` bytes; an error naming the
/// block if not even that one does.
pub(crate) fn staged_batch(
    lens: &[u64],
    start: usize,
    window: usize,
    what: &str,
) -> Result<usize, ClientError> {
    match shm::fits(&lens[start..], window) {
        0 => Err(ClientError::InvalidArgument(format!(
            "block {start} has {} bytes, more than the {window}-byte {what} staging window; raise shm_staging_bytes",
            lens[start]
        ))),
        n => Ok(n),
    }
}

/// `ShmPut`: stores the blocks the client placed at `offsets` in its staging window (shared
/// memory or, over RDMA, the node's window it wrote).
pub(crate) async fn commit_staged(
    c: &mut Connection,
    keys: &[BlockKey],
    lens: &[u64],
    offsets: Vec<u64>,
) -> Result<Vec<PutStatus>, ClientError> {
    let req = ShmPutRequest {
        keys: encode_keys(keys),
        lens: lens.iter().map(|&l| l as u32).collect(),
        offsets,
    };
    let reply: PutReply = c.call_simple(Op::ShmPut, &req).await?;
    put_statuses(reply, keys.len())
}

/// A get over shared memory into caller segments: lease, copy with verification, release.
async fn get_shm_into(
    c: &mut Connection,
    keys: &[BlockKey],
    dst: &mut [Vec<&mut [u8]>],
) -> Result<Vec<GetOutcome>, ClientError> {
    let mut leased = ShmLeased::take(c, keys).await?;
    let mut outcomes = Vec::with_capacity(keys.len());
    for (i, segs) in dst.iter_mut().enumerate() {
        let expected: usize = segs.iter().map(|s| s.len()).sum();
        outcomes.push(match leased.len(i) {
            0 => GetOutcome::Miss,
            n if n == expected => {
                if leased.copy(i, segs)? {
                    GetOutcome::Hit
                } else {
                    GetOutcome::Miss
                }
            }
            n => GetOutcome::WrongSize {
                stored: n,
                expected,
            },
        });
    }
    leased.release(c).await?;
    Ok(outcomes)
}

/// A get over shared memory into fresh buffers.
async fn get_shm_vecs(
    c: &mut Connection,
    keys: &[BlockKey],
) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
    let mut leased = ShmLeased::take(c, keys).await?;
    let mut values = Vec::with_capacity(keys.len());
    for i in 0..keys.len() {
        values.push(match leased.len(i) {
            0 => None,
            n => {
                let mut v = vec![0u8; n];
                leased.copy(i, &mut [&mut v[..]])?.then_some(v)
            }
        });
    }
    leased.release(c).await?;
    Ok(values)
}

/// Blocks leased by one `ShmGet`, copied out one by one, then released together.
struct ShmLeased<'k> {
    keys: &'k [BlockKey],
    reply: kvcache_core::wire::ShmGetReply,
    pool: Arc<shm::ShmPool>,
    /// Keys whose copy failed its check, reported on release.
    suspect: Vec<BlockKey>,
}

impl<'k> ShmLeased<'k> {
    async fn take(c: &mut Connection, keys: &'k [BlockKey]) -> Result<Self, ClientError> {
        let reply = c.shm_lease(keys, false).await?;
        let pool = Arc::clone(&c.shm.as_ref().expect("shared-memory connection").pool);
        Ok(Self {
            keys,
            reply,
            pool,
            suspect: Vec::new(),
        })
    }

    /// Stored length of key `i`; 0 for a miss.
    fn len(&self, i: usize) -> usize {
        self.reply.lens[i] as usize
    }

    /// Copies key `i`'s block into `dst` (exactly its length); false, and the key is suspect,
    /// if the bytes failed their check.
    fn copy(&mut self, i: usize, dst: &mut [&mut [u8]]) -> Result<bool, ClientError> {
        let (off, sum) = (self.reply.offsets[i], self.reply.trailer_checksums[i]);
        let ok = self.pool.copy_verified(off, self.len(i), sum, dst)?;
        if !ok {
            self.suspect.push(self.keys[i]);
        }
        Ok(ok)
    }

    async fn release(self, c: &mut Connection) -> Result<(), ClientError> {
        c.shm_release(self.reply.lease_id, &self.suspect).await?;
        if !self.suspect.is_empty() {
            tracing::warn!(
                blocks = self.suspect.len(),
                "kvcache: blocks failed verification; reported as misses"
            );
        }
        Ok(())
    }
}
