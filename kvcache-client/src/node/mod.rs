//! A client of one kvcache node: it negotiates the byte path once (shared memory, RDMA or
//! TCP, saying why when it settles for a slower one), keeps a pool of connections on it, and
//! runs every operation on a pooled connection under one deadline, dispatching once over the
//! connection's [`Path`].

use std::sync::{Arc, Mutex};

use kvcache_core::BlockKey;
use kvcache_core::wire::{
    ExistsReply, ExistsRequest, ListKeysReply, ListKeysRequest, Op, PingReply, PingRequest,
    PrefixMatchReply, PrefixMatchRequest, PutStatus, decode_keys, encode_keys,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{ClientConfig, GetOutcome, PathKind, TransportChoice};
use crate::connection::Connection;
use crate::deadline;
use crate::error::{self, ClientError};
#[cfg(feature = "rdma")]
use crate::path::rdma;
use crate::path::{Channel, Path, shm};
use crate::write::PutBlocks;

/// Runs `$body` with `$c` bound to a pooled connection, under the client's timeout (or the
/// enclosing call's deadline, when that is earlier: [`deadline`]); keeps the connection only on
/// success.
///
/// If the connection fails (reset, closed mid-reply), the idle pool is emptied, since its
/// connections likely share the fate, and the body runs again on a fresh connection within
/// the same timeout, up to `$attempts` times in all. Every operation is idempotent (blocks are
/// immutable). The node closes a reply it cannot finish truthfully (a block that fails
/// verification mid-stream) after dropping that block, so each such retry makes progress and
/// a get of n keys needs at most n + 1 attempts to turn every corrupt block into a clean miss.
///
/// A macro rather than an async closure, so the body's borrows and `Send`-ness are inferred
/// as if written inline.
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
                    let $c = &mut checkout.channel;
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

mod gpu_direct;

/// A pooled, cloneable client of one kvcache node.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    /// Connections not in use. A plain mutex: it is never held across an await.
    idle: Mutex<Vec<Channel>>,
    permits: Arc<Semaphore>,
    max_payload: u32,
    /// The node's shared-memory socket, when this client uses shared memory.
    shm_path: Option<String>,
    /// The pool mapped by the latest shared-memory connection, reused by the next ones.
    shm_pool: Mutex<Option<Arc<shm::ShmPool>>>,
    /// Why `TransportChoice::Auto` settled for TCP.
    shm_fallback: Option<String>,
    /// Set when this client moves bytes over RDMA.
    #[cfg(feature = "rdma")]
    rdma: Option<Arc<rdma::Shared>>,
}

impl Inner {
    fn idle_conns(&self) -> std::sync::MutexGuard<'_, Vec<Channel>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<shm::ShmPool>>> {
        self.shm_pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection checked out of the pool, holding its slot.
struct Checkout {
    channel: Channel,
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
        let conn = tokio::time::timeout_at(
            deadline::until(cfg.timeout),
            Connection::open(&cfg.addr, token),
        )
        .await
        .map_err(|_| ClientError::Timeout {
            op: "connect",
            after: cfg.timeout,
        })??;
        let mut channel = Channel {
            control: conn,
            path: Path::Tcp,
        };
        let ping: PingReply = tokio::time::timeout_at(
            deadline::until(cfg.timeout),
            channel.control.call_simple(Op::Ping, &PingRequest {}),
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
        if matches!(cfg.transport, TransportChoice::Auto | TransportChoice::Shm) {
            match Self::try_shm(&cfg, &ping).await {
                Ok((control, attached)) => {
                    shm_pool = Some(Arc::clone(&attached.pool));
                    shm_path = Some(ping.shm_socket.clone());
                    channel = Channel {
                        control,
                        path: Path::Shm(attached),
                    };
                    tracing::debug!(node = %cfg.addr, socket = %ping.shm_socket, "kvcache: using shared memory");
                }
                Err(e) if cfg.transport == TransportChoice::Shm => return Err(e),
                Err(e) => shm_fallback = Some(e.to_string()),
            }
        }
        if shm_path.is_none()
            && matches!(cfg.transport, TransportChoice::Auto | TransportChoice::Rdma)
        {
            match Self::try_rdma(&cfg, &ping, &mut channel).await {
                #[cfg(feature = "rdma")]
                Ok(shared) => {
                    tracing::debug!(node = %cfg.addr, device = shared.device_name(), "kvcache: using RDMA");
                    rdma_shared = Some(shared);
                    shm_fallback = None;
                }
                Err(e) if cfg.transport == TransportChoice::Rdma => return Err(e),
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
            idle: Mutex::new(vec![channel]),
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
    async fn try_shm(
        cfg: &ClientConfig,
        ping: &PingReply,
    ) -> Result<(Connection, shm::Attached), ClientError> {
        if let Some(why) = shm::unavailable_reason(ping) {
            return Err(ClientError::ShmUnavailable(why));
        }
        let open = shm::open(
            &ping.shm_socket,
            cfg.shm_staging_bytes,
            None,
            cfg.token.as_deref(),
        );
        match tokio::time::timeout_at(deadline::until(cfg.timeout), open).await {
            Ok(Ok(opened)) => Ok(opened),
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

    /// Sets up RDMA on `channel` (a fresh TCP connection), or says why not.
    #[cfg(feature = "rdma")]
    async fn try_rdma(
        cfg: &ClientConfig,
        ping: &PingReply,
        channel: &mut Channel,
    ) -> Result<Arc<rdma::Shared>, ClientError> {
        if ping.rdma_device.is_empty() {
            return Err(ClientError::RdmaUnavailable(
                "the node serves no RDMA (its log says why)".into(),
            ));
        }
        let here = rdma::Shared::open().map_err(|why| {
            ClientError::RdmaUnavailable(format!("this host has no RDMA device ({why})"))
        })?;
        let attach = rdma::attach(
            &mut channel.control,
            &here,
            cfg.shm_staging_bytes,
            cfg.timeout,
        );
        let attached = tokio::time::timeout_at(deadline::until(cfg.timeout), attach)
            .await
            .map_err(|_| ClientError::RdmaUnavailable("connecting queue pairs timed out".into()))?
            .map_err(|e| match e {
                ClientError::RdmaUnavailable(_) => e,
                other => ClientError::RdmaUnavailable(other.to_string()),
            })?;
        channel.path = Path::Rdma(attached);
        Ok(here)
    }

    /// Without the `rdma` feature, says so when RDMA could have been used.
    #[cfg(not(feature = "rdma"))]
    async fn try_rdma(
        _cfg: &ClientConfig,
        ping: &PingReply,
        _channel: &mut Channel,
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

    /// Why this client uses TCP although shared memory or RDMA was allowed
    /// (`TransportChoice::Auto`): one reason per transport.
    pub fn shm_fallback_reason(&self) -> Option<&str> {
        self.inner.shm_fallback.as_deref()
    }

    /// How this client moves bytes.
    pub fn path(&self) -> PathKind {
        #[cfg(feature = "rdma")]
        if self.inner.rdma.is_some() {
            return PathKind::Rdma;
        }
        if self.inner.shm_path.is_some() {
            PathKind::Shm
        } else {
            PathKind::Tcp
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
        let channel = match idle {
            Some(channel) => channel,
            None => self.open_channel().await?,
        };
        Ok(Checkout {
            channel,
            _permit: permit,
        })
    }

    /// A fresh connection on this client's byte path.
    async fn open_channel(&self) -> Result<Channel, ClientError> {
        let cfg = &self.inner.cfg;
        if let Some(path) = &self.inner.shm_path {
            let known = self.inner.pool_slot().clone();
            let (control, attached) =
                shm::open(path, cfg.shm_staging_bytes, known, cfg.token.as_deref()).await?;
            *self.inner.pool_slot() = Some(Arc::clone(&attached.pool));
            return Ok(Channel {
                control,
                path: Path::Shm(attached),
            });
        }
        #[allow(unused_mut)]
        let mut control = Connection::open(&cfg.addr, cfg.token.as_deref()).await?;
        #[cfg(feature = "rdma")]
        if let Some(shared) = &self.inner.rdma {
            let attached = rdma::attach(&mut control, shared, cfg.shm_staging_bytes, cfg.timeout);
            let path = Path::Rdma(attached.await?);
            return Ok(Channel { control, path });
        }
        Ok(Channel {
            control,
            path: Path::Tcp,
        })
    }

    fn checkin(&self, c: Checkout) {
        self.inner.idle_conns().push(c.channel);
    }

    /// Checks the node is alive; returns what it reports about itself.
    pub async fn ping(&self) -> Result<PingReply, ClientError> {
        with_conn!(self, "ping", |c| {
            c.control.call_simple(Op::Ping, &PingRequest {}).await
        })
    }

    /// Stores one block.
    pub async fn put(&self, key: BlockKey, value: &[u8]) -> Result<PutStatus, ClientError> {
        Ok(self.put_many(&[(key, value)]).await?[0])
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
        let max_payload = self.inner.max_payload;
        with_conn!(self, "put", |c| c
            .put(keys, values, &lens, max_payload)
            .await)
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
            let got = with_conn!(self, "get", chunk.len() + 1, |c| c.get_vecs(chunk).await)?;
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
            let got = with_conn!(self, "get", chunk.len() + 1, |c| c
                .get_into(chunk, dst)
                .await)?;
            out.extend(got);
        }
        Ok(out)
    }

    /// Which keys are stored.
    pub async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>, ClientError> {
        let req = ExistsRequest {
            keys: encode_keys(keys),
        };
        let reply: ExistsReply = with_conn!(self, "exists", |c| c
            .control
            .call_simple(Op::Exists, &req)
            .await)?;
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
            c.control.call_simple(Op::PrefixMatch, &req).await
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
            c.control.call_simple(Op::ListKeys, &req).await
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

/// A node's put reports, per block, how it went ([`PutStatus`]).
impl PutBlocks for Client {
    type Stored = PutStatus;

    async fn put_many_segments(
        &self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
    ) -> Result<Vec<PutStatus>, ClientError> {
        deadline::within(self.inner.cfg.timeout, self.put_chunks(keys, values)).await
    }
}
