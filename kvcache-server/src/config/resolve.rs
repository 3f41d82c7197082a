//! Resolution: defaults applied to the merged [`Settings`], every value checked, and the
//! server's sections built ([`ServerConfig`] and the ones under it). A contradiction or a
//! value out of range is an error that names the flag.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use kvcache_core::ByteSize;
use kvcache_core::wire::FrameLimits;
use kvcache_store::StoreConfig;
use kvcache_transport::LockMode;

use crate::config::settings::Settings;
use crate::config::{
    ClusterSettings, EtcdConfig, Membership, RdmaConfig, ServerConfig, ShmConfig, ShmSocket,
};

impl Settings {
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
    fn resolve_cluster(&self) -> anyhow::Result<Option<ClusterSettings>> {
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
        Ok(Some(ClusterSettings {
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
