//! The manager's settings: a TOML file (`--config`), then flags, in that order of precedence.
//! The file's `[[adapter]]` tables are read again whenever the file changes; the other
//! settings are read at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;

use crate::placement::Policy;
use crate::reconcile::Settings;
use crate::spec::AdapterSpec;

/// kvcache-lora: places LoRA adapters on vLLM instances and keeps them loaded.
///
/// Adapters are declared in the --config TOML file (`[[adapter]]` tables with name, base_model,
/// path and replicas; the file is watched) or through the HTTP API (GET/POST /v1/adapters,
/// GET/DELETE /v1/adapters/NAME). Each is placed on instances of its base model (least-loaded
/// or bin-pack, within each instance's max_loras), loaded through vLLM's runtime LoRA endpoints
/// and verified in /v1/models; an instance that restarts gets its adapters back; a load the
/// engine refuses is retried with backoff, then the adapter is Failed with the engine's error.
/// The engines run with `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True. The
/// kvcache gateway reads /v1/adapters (its `lora` setting) and sends an adapter's requests only
/// where it is Ready.
#[derive(Parser, Debug, Default)]
#[command(
    name = "kvcache-lora",
    version,
    about,
    long_about,
    max_term_width = 100
)]
pub struct Args {
    /// TOML file with settings and adapters (flags override its settings); watched for changes.
    #[arg(long, env = "KVCACHE_LORA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address of the HTTP API, /health and /metrics [default: 127.0.0.1:9300].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,

    /// A vLLM instance's base URL (http://host:port); repeat for several. Replaces the file's
    /// `instances`.
    #[arg(long = "instance", value_name = "URL")]
    pub instances: Vec<String>,

    /// Find instances in etcd (`etcd://host:port`): the engines the kvcache connector registers
    /// (with `advertise` set). Adds to the listed instances.
    #[arg(long, value_name = "ETCD_URL")]
    pub discover: Option<String>,

    /// Where new replicas go [default: least-loaded].
    #[arg(long, value_enum)]
    pub policy: Option<Policy>,

    /// Adapters an instance may hold [default: the engine's --max-loras as its metrics report
    /// it, else 4].
    #[arg(long, value_name = "N")]
    pub max_loras: Option<usize>,
}

/// The TOML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    #[serde(default)]
    instances: Vec<String>,
    discover: Option<String>,
    policy: Option<Policy>,
    max_loras: Option<usize>,
    /// The engines' `--api-key`, sent on every call to them.
    engine_api_key: Option<String>,
    /// Check each adapter directory on this machine before declaring it [default: true]; off
    /// when the engines see a filesystem this process does not.
    check_paths: Option<bool>,
    #[serde(default)]
    reconcile: ReconcileFile,
    #[serde(default)]
    adapter: Vec<AdapterSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconcileFile {
    /// How often instances are observed [default: 1000].
    interval_ms: Option<u64>,
    /// Refused loads before an adapter is Failed [default: 4].
    max_attempts: Option<u32>,
    /// First backoff after a refusal; doubles [default: 1000].
    backoff_ms: Option<u64>,
    /// Longest backoff [default: 30000].
    backoff_max_ms: Option<u64>,
    /// How long a leaving adapter stays loaded, unroutable, before it is unloaded [default: 3000].
    drain_grace_ms: Option<u64>,
    /// How long an instance may be down before its adapters move [default: 60].
    down_grace_s: Option<u64>,
    /// Longest wait for one load or unload [default: 60].
    load_timeout_s: Option<u64>,
}

/// The resolved settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub instances: Vec<String>,
    pub discover: Option<String>,
    /// Fixed capacity per instance, when set.
    pub max_loras: Option<usize>,
    pub engine_api_key: Option<String>,
    pub check_paths: bool,
    pub interval: Duration,
    pub load_timeout: Duration,
    pub settings: Settings,
    /// The file's adapters at start.
    pub adapters: Vec<AdapterSpec>,
}

/// Capacity when neither the settings nor the engine say.
pub const DEFAULT_MAX_LORAS: usize = 4;

fn read(path: &Path) -> anyhow::Result<File> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

/// The adapters declared in `path`, checked.
pub fn read_adapters(path: &Path) -> anyhow::Result<Vec<AdapterSpec>> {
    let adapters = read(path)?.adapter;
    check_adapters(&adapters).with_context(|| format!("in {}", path.display()))?;
    Ok(adapters)
}

fn check_adapters(adapters: &[AdapterSpec]) -> anyhow::Result<()> {
    for (i, a) in adapters.iter().enumerate() {
        a.check()?;
        if adapters[..i].iter().any(|b| b.name == a.name) {
            bail!("adapter `{}` is declared twice", a.name);
        }
    }
    Ok(())
}

fn check_url(url: &str) -> anyhow::Result<String> {
    let trimmed = url.trim_end_matches('/');
    if !(trimmed.starts_with("http://") || trimmed.starts_with("https://"))
        || trimmed.len() <= "http://".len()
    {
        bail!("instance {url:?} is not an http:// URL");
    }
    Ok(trimmed.to_string())
}

impl Config {
    /// Merges the file and the flags, and checks them.
    pub fn load(args: Args) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => read(p)?,
            None => File::default(),
        };
        check_adapters(&file.adapter)?;
        let instances = if args.instances.is_empty() {
            file.instances
        } else {
            args.instances
        };
        let instances = instances
            .iter()
            .map(|u| check_url(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let discover = args.discover.or(file.discover);
        if let Some(url) = &discover {
            kvcache_membership::Etcd::new(url, Duration::from_secs(2))
                .map_err(|e| anyhow::anyhow!("discover: {e} (expected etcd://host:port)"))?;
        }
        if instances.is_empty() && discover.is_none() {
            bail!(
                "no instances: list them (`instances` in the file, or --instance URL) or discover them (--discover etcd://host:port)"
            );
        }
        let r = file.reconcile;
        let defaults = Settings::default();
        let settings = Settings {
            policy: args.policy.or(file.policy).unwrap_or_default(),
            max_attempts: r.max_attempts.unwrap_or(defaults.max_attempts).max(1),
            backoff_ms: r.backoff_ms.unwrap_or(defaults.backoff_ms),
            backoff_max_ms: r.backoff_max_ms.unwrap_or(defaults.backoff_max_ms),
            drain_grace_ms: r.drain_grace_ms.unwrap_or(defaults.drain_grace_ms),
            down_grace_ms: r.down_grace_s.map_or(defaults.down_grace_ms, |s| s * 1000),
            verify_ms: defaults.verify_ms,
        };
        let max_loras = args.max_loras.or(file.max_loras);
        if max_loras == Some(0) {
            bail!("max_loras must be at least 1");
        }
        Ok(Self {
            file: args.config,
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:9300".parse().expect("a valid default")),
            instances,
            discover,
            max_loras,
            engine_api_key: file.engine_api_key,
            check_paths: file.check_paths.unwrap_or(true),
            interval: Duration::from_millis(r.interval_ms.unwrap_or(1000).max(50)),
            load_timeout: Duration::from_secs(r.load_timeout_s.unwrap_or(60).max(1)),
            settings,
            adapters: file.adapter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "kvcache-lora-config-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_documented_file_loads_and_flags_override_it() {
        let path = write(
            r#"
listen = "127.0.0.1:9300"
instances = ["http://127.0.0.1:8001/", "http://127.0.0.1:8002"]
[[adapter]]
name = "sql-lora"
base_model = "my-model"
path = "/models/sql-lora"
replicas = 1
[[adapter]]
name = "everywhere"
base_model = "my-model"
path = "/models/e"
replicas = "all"
"#,
        );
        let c = Config::load(Args {
            config: Some(path.clone()),
            policy: Some(Policy::BinPack),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(
            c.instances,
            ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
        );
        assert_eq!(c.adapters.len(), 2);
        assert_eq!(c.settings.policy, Policy::BinPack);
        assert_eq!(read_adapters(&path).unwrap(), c.adapters);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn mistakes_are_named() {
        let e = Config::load(Args::default()).unwrap_err();
        assert!(e.to_string().contains("no instances"), "{e}");
        let path = write("instances = [\"http://a\"]\nlisten_on = \"x\"\n");
        let e = format!(
            "{:#}",
            Config::load(Args {
                config: Some(path.clone()),
                ..Args::default()
            })
            .unwrap_err()
        );
        assert!(e.contains("listen_on"), "{e}");
        std::fs::remove_file(path).unwrap();
        let path = write(
            "instances = [\"http://a\"]\n[[adapter]]\nname=\"a\"\nbase_model=\"m\"\npath=\"/p\"\n[[adapter]]\nname=\"a\"\nbase_model=\"m\"\npath=\"/q\"\n",
        );
        let e = format!(
            "{:#}",
            Config::load(Args {
                config: Some(path.clone()),
                ..Args::default()
            })
            .unwrap_err()
        );
        assert!(e.contains("declared twice"), "{e}");
        std::fs::remove_file(path).unwrap();
        let e = Config::load(Args {
            instances: vec!["localhost:8000".into()],
            ..Args::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not an http:// URL"), "{e}");
    }
}
