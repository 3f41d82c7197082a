//! The raw sources of configuration: the flags (clap), the same keys from `KVCACHE_*`
//! environment variables and a TOML file (serde), merged in that order of precedence. Nothing
//! here is checked yet: [`crate::config`] holds what resolving turns them into.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Parser;
use kvcache_core::ByteSize;
use kvcache_store::eviction::PolicyKind;
use kvcache_transport::LockMode;
use serde::Deserialize;

/// Whether to lock the pool in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MlockArg {
    Off,
    BestEffort,
    Required,
}

impl From<MlockArg> for LockMode {
    fn from(m: MlockArg) -> Self {
        match m {
            MlockArg::Off => LockMode::Off,
            MlockArg::BestEffort => LockMode::BestEffort,
            MlockArg::Required => LockMode::Required,
        }
    }
}

/// kvcache-server: a node of the kvcache distributed KV-cache for LLM inference.
///
/// Stores attention KV blocks in a memory pool and serves them to vLLM instances over TCP, and
/// to clients on the same host through shared memory (a Unix socket hands out the pool).
/// Settings come from, in increasing precedence: defaults, the --config TOML file (keys are the
/// flag names with underscores, e.g. `metrics_listen = "0.0.0.0:7401"`), KVCACHE_* environment
/// variables, and flags.
#[derive(Parser, Debug, Default, Deserialize)]
#[command(
    name = "kvcache-server",
    version,
    about,
    long_about,
    max_term_width = 100
)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with settings (flags and environment override it).
    #[arg(long, env = "KVCACHE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Data-plane address to listen on [default: 127.0.0.1:7400].
    #[arg(long, env = "KVCACHE_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,

    /// Address for /metrics (Prometheus) and /health [default: 127.0.0.1:7401]; `off` disables.
    #[arg(long, env = "KVCACHE_METRICS_LISTEN", value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,

    /// Memory pool size, e.g. 512MiB, 4GiB [default: 1GiB].
    #[arg(long, env = "KVCACHE_MEMORY", value_name = "SIZE")]
    pub memory: Option<ByteSize>,

    /// Eviction policy [default: lru].
    #[arg(long, env = "KVCACHE_EVICTION", value_enum)]
    pub eviction: Option<PolicyKind>,

    /// Start evicting when this fraction of the pool is used [default: 0.95].
    #[arg(long, env = "KVCACHE_HIGH_WATERMARK", value_name = "FRACTION")]
    pub high_watermark: Option<f64>,

    /// Evict down to this fraction of the pool [default: 0.90].
    #[arg(long, env = "KVCACHE_LOW_WATERMARK", value_name = "FRACTION")]
    pub low_watermark: Option<f64>,

    /// Pool allocation granularity [default: 4KiB].
    #[arg(long, env = "KVCACHE_PAGE_SIZE", value_name = "SIZE")]
    pub page_size: Option<ByteSize>,

    /// Index shards (more shards, less lock contention) [default: 64].
    #[arg(long, env = "KVCACHE_SHARDS")]
    pub shards: Option<usize>,

    /// Lock the pool in RAM: off, best-effort (warn if not permitted), required [default: best-effort].
    #[arg(long, env = "KVCACHE_MLOCK", value_enum)]
    pub mlock: Option<MlockArg>,

    /// Largest payload accepted in one frame [default: 1GiB].
    #[arg(long, env = "KVCACHE_MAX_FRAME", value_name = "SIZE")]
    pub max_frame: Option<ByteSize>,

    /// Seconds a request may take once its header has arrived: receiving its body and sending
    /// the reply. A client that stalls longer is disconnected, and its allocation or leases are
    /// released [default: 30].
    #[arg(long, env = "KVCACHE_REQUEST_TIMEOUT", value_name = "SECONDS")]
    pub request_timeout: Option<f64>,

    /// Most data connections open at once; more are refused at once [default: 4096].
    #[arg(long, env = "KVCACHE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Seconds a data connection may wait between requests (or take to send a request's
    /// header) before the node closes it, so idle and half-open sockets cannot hold the
    /// connection slots. Clients reconnect on their next call [default: 60].
    #[arg(long, env = "KVCACHE_IDLE_TIMEOUT", value_name = "SECONDS")]
    pub idle_timeout: Option<f64>,

    /// Most keys one request may name; a request with more is refused before any lookup
    /// [default: 8192].
    #[arg(long, env = "KVCACHE_MAX_KEYS_PER_REQUEST", value_name = "N")]
    pub max_keys_per_request: Option<usize>,

    /// Most bytes of blocks one shared-memory or RDMA connection may hold leased; past it,
    /// further blocks are misses for that connection [default: a quarter of --memory, at least
    /// 256MiB].
    #[arg(long, env = "KVCACHE_MAX_LEASED_BYTES", value_name = "SIZE")]
    pub max_leased_bytes: Option<ByteSize>,

    /// Authenticate the data plane: a TOML file of tenants and their tokens (reloaded on
    /// SIGHUP). Every connection must then present a token, and each tenant has its own key
    /// space; see docs/SECURITY.md [default: off: anyone who reaches the ports may read and
    /// write every block].
    #[arg(long, env = "KVCACHE_AUTH", value_name = "FILE")]
    pub auth: Option<PathBuf>,

    /// Most connections the metrics port serves at once; more are closed at once
    /// [default: 64].
    #[arg(long, env = "KVCACHE_METRICS_MAX_CONNECTIONS", value_name = "N")]
    pub metrics_max_connections: Option<usize>,

    /// Seconds to let in-flight requests finish on SIGTERM/SIGINT [default: 10].
    #[arg(long, env = "KVCACHE_SHUTDOWN_GRACE", value_name = "SECONDS")]
    pub shutdown_grace: Option<f64>,

    /// Log filter, as RUST_LOG (e.g. `info`, `kvcache_server=debug`) [default: info].
    #[arg(long, env = "KVCACHE_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Worker threads [default: one per core].
    #[arg(long, env = "KVCACHE_THREADS")]
    pub threads: Option<usize>,

    /// Unix socket through which clients on this host map the pool (shared memory): a path,
    /// `auto` (`$XDG_RUNTIME_DIR/kvcache-PORT.sock`, else `/tmp/kvcache-UID/kvcache-PORT.sock`
    /// in a directory only this uid may write), or `off` [default: auto].
    #[arg(long, env = "KVCACHE_SHM_SOCKET", value_name = "PATH|auto|off")]
    pub shm_socket: Option<String>,

    /// File mode of the shared-memory socket, octal: who may connect and so read the pool
    /// (e.g. 660 to admit the socket's group) [default: 600].
    #[arg(long, env = "KVCACHE_SHM_MODE", value_name = "OCTAL")]
    pub shm_mode: Option<String>,

    /// Uids that may attach over shared memory, besides the node's own (comma-separated,
    /// e.g. 1000,1001): a peer whose kernel-reported uid (SO_PEERCRED) is not listed is
    /// refused with the reason, and its client uses TCP. [default: whoever the socket's mode
    /// admits].
    #[arg(
        long,
        env = "KVCACHE_SHM_ALLOW_UIDS",
        value_name = "UID,...",
        value_delimiter = ','
    )]
    pub shm_allow_uids: Option<Vec<u32>>,

    /// Seconds a shared-memory client may hold a lease before it is revoked (a client that
    /// outlives its lease reads a miss, never wrong bytes) [default: 30].
    #[arg(long, env = "KVCACHE_SHM_LEASE_TIMEOUT", value_name = "SECONDS")]
    pub shm_lease_timeout: Option<f64>,

    /// Largest staging window a shared-memory client may ask for (its puts go through it)
    /// [default: 256MiB].
    #[arg(long, env = "KVCACHE_SHM_MAX_STAGING", value_name = "SIZE")]
    pub shm_max_staging: Option<ByteSize>,

    /// Registers this node in etcd (`http://HOST:PORT`) under /kvcache/members/, with a lease it
    /// keeps alive, so clients of `etcd://HOST:PORT` find it and drop it when it dies [default:
    /// off: a single node, or a static list the clients are given].
    #[arg(long, env = "KVCACHE_ETCD", value_name = "URL")]
    pub etcd: Option<String>,

    /// This node's name in etcd [default: the advertised address].
    #[arg(long, env = "KVCACHE_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// The HOST:PORT clients and peers use to reach this node; its name on the ring [default:
    /// the data-plane address, which must then not be 0.0.0.0 or ::].
    #[arg(long, env = "KVCACHE_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// Seconds a node that stops renewing stays registered (its etcd lease's TTL); clients stop
    /// routing to a dead node within about this long [default: 3].
    #[arg(long, env = "KVCACHE_ETCD_TTL", value_name = "SECONDS")]
    pub etcd_ttl: Option<u64>,

    /// A static cluster instead of etcd: the members' HOST:PORT, comma-separated (this node may
    /// be among them). Give every node and client the same list [default: none].
    #[arg(
        long,
        env = "KVCACHE_PEERS",
        value_name = "HOST:PORT,...",
        value_delimiter = ','
    )]
    pub peers: Option<Vec<String>>,

    /// Owners per key on the ring (the replication factor). Clients decide placement; give them
    /// the same value. The node uses it to know which keys it owns when it warms [default: 1].
    #[arg(long, env = "KVCACHE_REPLICAS", value_name = "R")]
    pub replicas: Option<usize>,

    /// On joining a cluster (--etcd or --peers), copy the blocks this node now owns from the
    /// other members, up to the low watermark of the pool, so it starts hot [default: true].
    #[arg(long, env = "KVCACHE_WARM", value_name = "true|false")]
    pub warm: Option<bool>,

    /// A disk tier under the memory pool in this directory: evicted blocks are written there
    /// and read back on a hit, and a restart finds them again. Needs a build with the `disk`
    /// feature [default: off].
    #[arg(long, env = "KVCACHE_DISK", value_name = "PATH")]
    pub disk: Option<PathBuf>,

    /// Most bytes the disk tier may hold; the oldest blocks go first [default: 16GiB].
    #[arg(long, env = "KVCACHE_DISK_CAPACITY", value_name = "SIZE")]
    pub disk_capacity: Option<ByteSize>,

    /// A GPU tier of this much device memory under the memory pool (and above --disk):
    /// evicted blocks are copied to the GPU and copied back, checked, on a hit. Needs a build
    /// with the `cuda` feature and a CUDA driver [default: off].
    #[arg(long, env = "KVCACHE_GPU_TIER", value_name = "SIZE")]
    pub gpu_tier: Option<ByteSize>,

    /// Which GPU holds the GPU tier [default: 0].
    #[arg(long, env = "KVCACHE_GPU_DEVICE", value_name = "N")]
    pub gpu_device: Option<usize>,

    /// One-sided RDMA for clients on other hosts: `auto` uses the first RDMA device with an
    /// active port and says at start why not when there is none; `off` never does. Needs a
    /// build with the `rdma` feature. RDMA connections use --shm-lease-timeout and
    /// --shm-max-staging too [default: auto].
    #[arg(long, env = "KVCACHE_RDMA", value_name = "auto|off")]
    pub rdma: Option<String>,

    /// Enables fault-injection endpoints (POST /debug/corrupt/KEY). Never in production.
    #[arg(long, hide = true)]
    #[serde(default)]
    pub enable_test_hooks: bool,
}

impl Settings {
    /// Fills settings not given on the command line or environment from the config file.
    pub fn merge_file(mut self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = load_file(&path)?;
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            listen,
            metrics_listen,
            memory,
            eviction,
            high_watermark,
            low_watermark,
            page_size,
            shards,
            mlock,
            max_frame,
            request_timeout,
            max_connections,
            idle_timeout,
            max_keys_per_request,
            max_leased_bytes,
            auth,
            metrics_max_connections,
            shutdown_grace,
            log,
            threads,
            shm_socket,
            shm_mode,
            shm_allow_uids,
            shm_lease_timeout,
            shm_max_staging,
            etcd,
            node_id,
            advertise,
            etcd_ttl,
            peers,
            replicas,
            warm,
            disk,
            disk_capacity,
            gpu_tier,
            gpu_device,
            rdma
        );
        if file.enable_test_hooks {
            // Fault injection lets anyone who reaches the metrics port corrupt blocks: a
            // release build takes it only from the (hidden) flag, never from a file a
            // deployment may have copied.
            if !cfg!(debug_assertions) {
                bail!(
                    "{}: enable_test_hooks cannot be set from a config file in a release build",
                    path.display()
                );
            }
            self.enable_test_hooks = true;
        }
        Ok(self)
    }
}

pub(crate) fn load_file(path: &Path) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}
