//! Configuration: built-in defaults, then a TOML file, then environment variables, then flags
//! (each later source wins). Every setting has a flag, an environment variable and a file key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kvcache_core::ByteSize;
use kvcache_core::wire::FrameLimits;
use kvcache_transport::LockMode;
use serde::Deserialize;

use kvcache_store::StoreConfig;
use kvcache_store::eviction::PolicyKind;

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

/// Where the shared-memory socket goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShmSocket {
    /// Derived from the data port once bound (see `kvcache_transport::shm::default_socket_path`).
    Auto,
    Path(PathBuf),
}

/// Shared-memory transport settings.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    pub socket: ShmSocket,
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Uids admitted besides the node's own; `None` admits whoever the mode lets connect.
    pub allow_uids: Option<Vec<u32>>,
    pub lease_timeout: Duration,
    pub max_staging: u64,
}

/// Leases and staging windows of RDMA connections (the shared-memory flags set both).
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    pub lease_timeout: Duration,
    pub max_staging: u64,
}

/// Cluster registration in etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// The endpoint, checked while resolving (each call bounded by 2 s).
    pub endpoint: kvcache_membership::Etcd,
    /// `None`: the advertised address.
    pub node_id: Option<String>,
    pub ttl: u64,
}

/// Where the members of the cluster come from.
#[derive(Clone, Debug)]
pub enum Membership {
    /// Registered in etcd (this node registers itself too).
    Etcd(EtcdConfig),
    /// A fixed list (`--peers`); this node is added if missing.
    Peers(Vec<String>),
}

/// Membership in a cluster of nodes.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub membership: Membership,
    /// `None`: the bound data-plane address.
    pub advertise: Option<String>,
    /// Owners per key.
    pub replicas: usize,
    /// Copy owned blocks from the other members on joining.
    pub warm: bool,
}

/// Fully resolved server configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `None` when shared memory is off.
    pub shm: Option<ShmConfig>,
    /// `None` for a single node.
    pub cluster: Option<ClusterConfig>,
    /// The disk tier: its directory and capacity in bytes.
    pub disk: Option<(PathBuf, u64)>,
    /// The GPU tier: its device and size in bytes.
    pub gpu_tier: Option<(usize, u64)>,
    /// `None` with `--rdma off`; else RDMA is served when this build and host can.
    pub rdma: Option<RdmaConfig>,
    pub listen: String,
    pub metrics_listen: Option<String>,
    pub store: StoreConfig,
    pub limits: FrameLimits,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// Longest a data connection may sit between requests.
    pub idle_timeout: Duration,
    /// Most keys per request.
    pub max_keys: usize,
    /// Most leased bytes per shared-memory or RDMA connection.
    pub max_leased_bytes: u64,
    /// The auth file; `None` leaves the data plane open.
    pub auth: Option<PathBuf>,
    /// Most concurrent connections on the metrics port.
    pub metrics_max_connections: usize,
    pub shutdown_grace: Duration,
    pub test_hooks: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Settings::default().resolve().expect("defaults are valid")
    }
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

    /// Applies defaults and checks the values.
    pub fn resolve(&self) -> anyhow::Result<ServerConfig> {
        let d = StoreConfig::default();
        let max_frame = self.max_frame.unwrap_or(ByteSize(1 << 30)).0;
        if max_frame == 0 || max_frame > u32::MAX as u64 {
            bail!("--max-frame must be between 1 byte and 4GiB, got {max_frame}");
        }
        let grace = self.shutdown_grace.unwrap_or(10.0);
        if !(0.0..=3600.0).contains(&grace) {
            bail!("--shutdown-grace must be between 0 and 3600 seconds");
        }
        let request_timeout = self.request_timeout.unwrap_or(30.0);
        if !(0.001..=86_400.0).contains(&request_timeout) {
            bail!("--request-timeout must be between 0.001 and 86400 seconds");
        }
        let max_connections = self.max_connections.unwrap_or(4096);
        // A connection holds at most one lease on a block, and a block's lease count is 16
        // bits: the limit keeps every count below saturation.
        if !(1..=60_000).contains(&max_connections) {
            bail!("--max-connections must be between 1 and 60000");
        }
        let idle_timeout = self.idle_timeout.unwrap_or(60.0);
        if !(0.01..=86_400.0).contains(&idle_timeout) {
            bail!("--idle-timeout must be between 0.01 and 86400 seconds");
        }
        let max_keys = self.max_keys_per_request.unwrap_or(8192);
        if max_keys == 0 {
            bail!("--max-keys-per-request must be at least 1");
        }
        let metrics_max_connections = self.metrics_max_connections.unwrap_or(64);
        if metrics_max_connections == 0 {
            bail!("--metrics-max-connections must be at least 1");
        }
        let metrics_listen = match self.metrics_listen.as_deref() {
            Some("off") => None,
            Some(a) => Some(a.to_string()),
            None => Some("127.0.0.1:7401".to_string()),
        };
        let shm = self.resolve_shm()?;
        let cluster = self.resolve_cluster()?;
        let disk = match (&self.disk, self.disk_capacity) {
            (None, Some(_)) => bail!("--disk-capacity only applies with --disk PATH"),
            (None, None) => None,
            (Some(_), _) if !cfg!(feature = "disk") => bail!(
                "this kvcache-server was built without the disk tier: rebuild it with \
                 `cargo build --release -p kvcache-server --features disk`"
            ),
            (Some(path), capacity) => {
                let capacity = capacity.map_or(16 << 30, |c| c.0);
                if capacity < 8 << 20 {
                    bail!("--disk-capacity must be at least 8MiB");
                }
                Some((path.clone(), capacity))
            }
        };
        let gpu_tier = match (self.gpu_tier, self.gpu_device) {
            (None, Some(_)) => bail!("--gpu-device only applies with --gpu-tier SIZE"),
            (None, None) => None,
            (Some(_), _) if !cfg!(feature = "cuda") => bail!(
                "this kvcache-server was built without the GPU tier: rebuild it with \
                 `cargo build --release -p kvcache-server --features cuda`"
            ),
            (Some(size), device) => {
                if size.0 < 8 << 20 {
                    bail!("--gpu-tier must be at least 8MiB");
                }
                Some((device.unwrap_or(0), size.0))
            }
        };
        let rdma = match self.rdma.as_deref() {
            None | Some("auto") => {
                let (lease_timeout, max_staging) = self.lease_and_staging()?;
                Some(RdmaConfig {
                    lease_timeout,
                    max_staging,
                })
            }
            Some("off") => None,
            Some(other) => bail!("--rdma must be `auto` or `off`, got {other:?}"),
        };
        let capacity = self.memory.map_or(d.capacity, |m| m.0);
        let max_leased_bytes = self
            .max_leased_bytes
            .map_or((capacity / 4).max(256 << 20), |b| b.0);
        if max_leased_bytes == 0 {
            bail!("--max-leased-bytes must be at least 1 byte");
        }
        Ok(ServerConfig {
            cluster,
            auth: self.auth.clone(),
            idle_timeout: Duration::from_secs_f64(idle_timeout),
            max_keys,
            max_leased_bytes,
            metrics_max_connections,
            disk,
            gpu_tier,
            rdma,
            listen: self
                .listen
                .clone()
                .unwrap_or_else(|| "127.0.0.1:7400".into()),
            metrics_listen,
            store: StoreConfig {
                capacity,
                page_size: self.page_size.map_or(d.page_size, |p| p.0),
                shards: self.shards.unwrap_or(d.shards),
                policy: self.eviction.unwrap_or_default(),
                high_watermark: self.high_watermark.unwrap_or(d.high_watermark),
                low_watermark: self.low_watermark.unwrap_or(d.low_watermark),
                lock: self.mlock.map_or(d.lock, LockMode::from),
                shared: shm.is_some(),
            },
            shm,
            limits: FrameLimits {
                max_payload: max_frame as u32,
                ..FrameLimits::default()
            },
            request_timeout: Duration::from_secs_f64(request_timeout),
            max_connections,
            shutdown_grace: Duration::from_secs_f64(grace),
            test_hooks: self.enable_test_hooks,
        })
    }
}

impl Settings {
    fn resolve_cluster(&self) -> anyhow::Result<Option<ClusterConfig>> {
        let membership = match (&self.etcd, &self.peers) {
            (Some(_), Some(_)) => bail!("--etcd and --peers are two sources of members: give one"),
            (None, None) => {
                if self.node_id.is_some()
                    || self.advertise.is_some()
                    || self.etcd_ttl.is_some()
                    || self.replicas.is_some()
                    || self.warm.is_some()
                {
                    bail!(
                        "--node-id, --advertise, --etcd-ttl, --replicas and --warm only apply \
                         to a cluster: add --etcd URL or --peers HOST:PORT,..."
                    );
                }
                return Ok(None);
            }
            (Some(url), None) => {
                let endpoint = kvcache_membership::Etcd::new(url, Duration::from_secs(2))?;
                let ttl = self.etcd_ttl.unwrap_or(3);
                if !(1..=3600).contains(&ttl) {
                    bail!("--etcd-ttl must be between 1 and 3600 seconds");
                }
                Membership::Etcd(EtcdConfig {
                    endpoint,
                    node_id: self.node_id.clone(),
                    ttl,
                })
            }
            (None, Some(peers)) => {
                if self.node_id.is_some() || self.etcd_ttl.is_some() {
                    bail!("--node-id and --etcd-ttl only apply with --etcd URL");
                }
                let peers: Vec<String> = peers
                    .iter()
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect();
                if let Some(bad) = peers.iter().find(|p| !is_host_port(p)) {
                    bail!("--peers takes HOST:PORT entries, got {bad:?}");
                }
                Membership::Peers(peers)
            }
        };
        if let Some(a) = &self.advertise
            && !is_host_port(a)
        {
            bail!("--advertise must be HOST:PORT, got {a:?}");
        }
        let replicas = self.replicas.unwrap_or(1);
        if !(1..=16).contains(&replicas) {
            bail!("--replicas must be between 1 and 16, got {replicas}");
        }
        Ok(Some(ClusterConfig {
            membership,
            advertise: self.advertise.clone(),
            replicas,
            warm: self.warm.unwrap_or(true),
        }))
    }

    fn resolve_shm(&self) -> anyhow::Result<Option<ShmConfig>> {
        let socket = match self.shm_socket.as_deref() {
            Some("off") => return Ok(None),
            None | Some("auto") => ShmSocket::Auto,
            Some("") => bail!("--shm-socket must be a path, `auto` or `off`"),
            Some(p) => ShmSocket::Path(PathBuf::from(p)),
        };
        let mode_text = self.shm_mode.as_deref().unwrap_or("600");
        let mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| {
                format!(
                    "--shm-mode must be octal permission bits like 600 or 660, got {mode_text:?}"
                )
            })?;
        let (lease_timeout, max_staging) = self.lease_and_staging()?;
        Ok(Some(ShmConfig {
            socket,
            mode,
            allow_uids: self.shm_allow_uids.clone(),
            lease_timeout,
            max_staging,
        }))
    }

    /// `--shm-lease-timeout` and `--shm-max-staging`, checked.
    fn lease_and_staging(&self) -> anyhow::Result<(Duration, u64)> {
        let lease = self.shm_lease_timeout.unwrap_or(30.0);
        if !(0.001..=86_400.0).contains(&lease) {
            bail!("--shm-lease-timeout must be between 0.001 and 86400 seconds");
        }
        let max_staging = self.shm_max_staging.map_or(256 << 20, |b| b.0);
        if max_staging < 4096 {
            bail!("--shm-max-staging must be at least 4KiB");
        }
        Ok((Duration::from_secs_f64(lease), max_staging))
    }
}

/// `host:port` with a numeric port (the host may be a name or an address, `[v6]` included).
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

fn load_file(path: &Path) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("kvcache-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.toml");
        std::fs::write(
            &path,
            "memory = \"64MiB\"\nlisten = \"127.0.0.1:9000\"\neviction = \"s3fifo\"\n",
        )
        .unwrap();
        let s = Settings::parse_from([
            "kvcache-server",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9100",
        ]);
        let cfg = s.merge_file().unwrap().resolve().unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9100", "flag wins over file");
        assert_eq!(cfg.store.capacity, 64 << 20, "file wins over default");
        assert_eq!(cfg.store.policy, PolicyKind::S3fifo);
        assert_eq!(
            cfg.metrics_listen.as_deref(),
            Some("127.0.0.1:7401"),
            "default"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_file_keys_and_bad_sizes_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("kvcache-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "memroy = \"1GiB\"\n").unwrap();
        let err = load_file(&path).unwrap_err();
        assert!(format!("{err:#}").contains("memroy"), "{err:#}");
        let e = Settings::try_parse_from(["kvcache-server", "--memory", "lots"]).unwrap_err();
        assert!(e.to_string().contains("invalid size"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn shared_memory_settings_resolve_and_bad_modes_are_refused() {
        let cfg = Settings::parse_from(["kvcache-server"]).resolve().unwrap();
        let shm = cfg.shm.expect("on by default");
        assert_eq!((shm.socket, shm.mode), (ShmSocket::Auto, 0o600));
        assert!(cfg.store.shared);
        let off = Settings::parse_from(["kvcache-server", "--shm-socket", "off"]);
        let off = off.resolve().unwrap();
        assert!(off.shm.is_none() && !off.store.shared);
        let bad = Settings::parse_from(["kvcache-server", "--shm-mode", "rw"]);
        assert!(format!("{:#}", bad.resolve().unwrap_err()).contains("octal"));
        let path = Settings::parse_from([
            "kvcache-server",
            "--shm-socket",
            "/run/kv.sock",
            "--shm-mode",
            "0o660",
        ]);
        let shm = path.resolve().unwrap().shm.unwrap();
        assert_eq!(
            (shm.socket, shm.mode),
            (ShmSocket::Path("/run/kv.sock".into()), 0o660)
        );
    }

    #[test]
    fn cluster_flags_resolve_and_contradictions_are_refused() {
        let err = |args: &[&str]| {
            let s =
                Settings::parse_from(std::iter::once("kvcache-server").chain(args.iter().copied()));
            format!("{:#}", s.resolve().unwrap_err())
        };
        let single = Settings::parse_from(["kvcache-server"]).resolve().unwrap();
        assert!(single.cluster.is_none());
        let cfg = Settings::parse_from([
            "kvcache-server",
            "--peers",
            "10.0.0.1:7400, 10.0.0.2:7400",
            "--replicas",
            "2",
            "--warm",
            "false",
        ])
        .resolve()
        .unwrap()
        .cluster
        .unwrap();
        assert!(
            matches!(&cfg.membership, Membership::Peers(p) if p == &["10.0.0.1:7400", "10.0.0.2:7400"])
        );
        assert_eq!((cfg.replicas, cfg.warm), (2, false));
        assert!(err(&["--replicas", "2"]).contains("only apply to a cluster"));
        assert!(err(&["--peers", "a:1", "--etcd", "http://127.0.0.1:2379"]).contains("give one"));
        assert!(err(&["--peers", "nohost"]).contains("HOST:PORT"));
        assert!(err(&["--peers", "a:1", "--replicas", "0"]).contains("between 1 and 16"));
        assert!(err(&["--peers", "a:1", "--node-id", "x"]).contains("only apply with --etcd"));
    }

    #[test]
    fn gpu_tier_flags_resolve_or_say_what_is_missing() {
        let s = Settings::parse_from(["kvcache-server", "--gpu-tier", "1GiB", "--gpu-device", "1"]);
        let resolved = s.resolve();
        if cfg!(feature = "cuda") {
            assert_eq!(resolved.unwrap().gpu_tier, Some((1, 1 << 30)));
        } else {
            let e = resolved.unwrap_err();
            assert!(format!("{e:#}").contains("--features cuda"), "{e:#}");
        }
        let alone = Settings::parse_from(["kvcache-server", "--gpu-device", "0"]);
        assert!(
            format!("{:#}", alone.resolve().unwrap_err()).contains("only applies with --gpu-tier")
        );
        if cfg!(feature = "cuda") {
            let small = Settings::parse_from(["kvcache-server", "--gpu-tier", "1MiB"]);
            assert!(format!("{:#}", small.resolve().unwrap_err()).contains("at least 8MiB"));
        }
    }

    #[test]
    fn disk_flags_resolve_or_say_what_is_missing() {
        let s = Settings::parse_from([
            "kvcache-server",
            "--disk",
            "/var/kv",
            "--disk-capacity",
            "2GiB",
        ]);
        let resolved = s.resolve();
        if cfg!(feature = "disk") {
            assert_eq!(resolved.unwrap().disk, Some(("/var/kv".into(), 2 << 30)));
        } else {
            let e = resolved.unwrap_err();
            assert!(format!("{e:#}").contains("--features disk"), "{e:#}");
        }
        let alone = Settings::parse_from(["kvcache-server", "--disk-capacity", "2GiB"]);
        assert!(format!("{:#}", alone.resolve().unwrap_err()).contains("only applies with --disk"));
    }

    #[test]
    fn metrics_listener_can_be_turned_off() {
        let s = Settings::parse_from(["kvcache-server", "--metrics-listen", "off"]);
        assert_eq!(s.resolve().unwrap().metrics_listen, None);
    }
}
