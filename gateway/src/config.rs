//! The gateway's settings: a TOML file (`--config`), then flags, in that order of precedence;
//! [`Config::load`] merges and checks them, and says which key is wrong when one is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kvcache_core::NamespaceId;
use serde::Deserialize;

use crate::pd::{PdConfig, Role};
use crate::route::{CostModel, Strategy};

/// kvcache-gateway: an OpenAI-compatible router in front of vLLM instances.
///
/// Routes each /v1/completions and /v1/chat/completions request to the instance with the lowest
/// expected time to first token: the blocks of the prompt it already holds (from its KV events),
/// the blocks the shared kvcache tier holds (a transfer credit), and its load. Settings come from
/// the --config TOML file (keys as below, plus `[[backend]]`, `[[api_key]]`, `[routing]`,
/// `[limits]` and `[health]` tables), overridden by flags. Backends with `role = "prefill"` or
/// `"decode"` disaggregate requests: a prefill leg whose engine saves the prompt's KV to the
/// cache, then the decode leg that loads it (the README's P/D section).
#[derive(Parser, Debug, Default)]
#[command(
    name = "kvcache-gateway",
    version,
    about,
    long_about,
    max_term_width = 100
)]
pub struct Args {
    /// TOML file with settings (flags override it).
    #[arg(long, env = "KVCACHE_GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to serve the OpenAI API, /health and /metrics on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,

    /// A vLLM instance's base URL (http://host:port); repeat for several. Replaces the file's
    /// `[[backend]]` list.
    #[arg(long = "backend", value_name = "URL")]
    pub backends: Vec<String>,

    /// How to pick an instance [default: cache-aware]; a request's `x-kvcache-strategy` header
    /// overrides it.
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,

    /// The served model's directory (tokenizer.json, tokenizer_config.json, chat template):
    /// prompts are tokenized exactly as the engines do. Without it, routing cannot see
    /// prefixes and falls back to least-request.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,

    /// kvcache nodes for the shared-tier credit: `host:port` (repeat) or `etcd://host:port/prefix`.
    #[arg(long = "cache", value_name = "ADDR")]
    pub cache: Vec<String>,

    /// Find backends in etcd (`etcd://host:port`): the engines whose kvcache connector has
    /// `advertise` set register there with their block size, namespace and KV-event endpoints.
    /// Adds to the configured backends.
    #[arg(long, value_name = "ETCD_URL")]
    pub discover: Option<String>,

    /// The kvcache-lora manager (`http://host:port`): a request whose model is one of its
    /// adapters goes only to instances where the adapter is Ready; 503 with Retry-After while
    /// it is loading.
    #[arg(long, value_name = "URL")]
    pub lora: Option<String>,

    /// The tenant token the engines use with the cache nodes (nodes run with --auth), so the
    /// shared-tier lookup sees their blocks. Prefer the environment variable to the flag.
    #[arg(
        long,
        env = "KVCACHE_GATEWAY_CACHE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub cache_token: Option<String>,
}

/// The TOML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    strategy: Option<Strategy>,
    tokenizer: Option<PathBuf>,
    /// The model name requests use; default: the backends' served model.
    model: Option<String>,
    #[serde(default)]
    cache: Vec<String>,
    cache_token: Option<String>,
    discover: Option<String>,
    /// The kvcache-lora manager's URL.
    lora: Option<String>,
    #[serde(default)]
    backend: Vec<BackendFile>,
    #[serde(default)]
    api_key: Vec<ApiKeyFile>,
    api_keys_file: Option<PathBuf>,
    #[serde(default)]
    routing: RoutingFile,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    health: HealthFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendFile {
    url: String,
    /// The engine's vLLM KV-event publisher (`tcp://host:port`).
    kv_events: Option<String>,
    /// Its replay endpoint, to fill gaps in the event stream.
    kv_events_replay: Option<String>,
    /// The topic the engine publishes under [default: ""].
    kv_events_topic: Option<String>,
    /// The engine's lookup namespace (32 hex digits, as the connector logs it): lets the
    /// gateway ask the cache nodes for exactly the keys this engine would load.
    namespace: Option<String>,
    /// Tokens per KV block [default: 128, vLLM's CPU default].
    block_size: Option<usize>,
    /// Requests in flight at most [default: 256].
    max_concurrency: Option<usize>,
    /// What work it takes: `both` (whole requests), `prefill` or `decode` (P/D) [both].
    role: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyFile {
    key: String,
    /// A name for logs and metrics (the key itself is never logged).
    name: Option<String>,
    /// Models the key may use [default: all].
    models: Option<Vec<String>>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    /// Cost of loading one block from a cache node, in units of computing one block [0.1].
    transfer_cost: Option<f64>,
    /// The same from a cache node on the instance's own host [0.05].
    near_transfer_cost: Option<f64>,
    /// Cost of each request an instance is running, in blocks [0.5].
    running_cost: Option<f64>,
    /// Cost of each request waiting in an instance's queue, in blocks [4.0].
    waiting_cost: Option<f64>,
    /// Cost at a full KV cache (scaled by the engine's kv_cache_usage_perc squared) [8.0].
    kv_pressure_cost: Option<f64>,
    /// (engine, block) entries the prefix index may hold, all engines together [1000000].
    index_budget_blocks: Option<usize>,
    /// How long a block learned from routing (engines without KV events) counts [30 s].
    learned_ttl_s: Option<f64>,
    /// How long the cache nodes may take to answer the shared-tier lookup [20 ms].
    cache_lookup_timeout_ms: Option<u64>,
    /// P/D: skip the prefill leg when fewer prompt tokens than this are uncached on the
    /// decode instance ... [2048]
    pd_bypass_tokens: Option<usize>,
    /// ... and they are less than this fraction of the prompt [0.7].
    pd_bypass_fraction: Option<f64>,
    /// P/D: how long the prefill leg may take before the request goes decode-only [60 s].
    pd_prefill_timeout_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    /// Largest request body [4 MiB].
    max_body_bytes: Option<usize>,
    /// Time to connect to a backend [2 s].
    connect_timeout_ms: Option<u64>,
    /// Time a whole request may take [600 s].
    request_timeout_s: Option<f64>,
    /// Backends tried for one request when connecting fails before any response byte [2].
    max_attempts: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    /// How often each backend's /health and /metrics are read [1 s].
    interval_ms: Option<u64>,
    /// Failed probes in a row that mark a backend down [2].
    failures: Option<u32>,
    /// How long one probe may take before it counts as failed [2 s]: an engine busy with
    /// prefills on few cores answers /health late but is not down.
    timeout_ms: Option<u64>,
    /// How long a backend that failed a request (connect error, 5xx) sits out [5 s].
    eject_s: Option<f64>,
}

/// One backend, resolved.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub url: String,
    pub kv_events: Option<String>,
    pub kv_events_replay: Option<String>,
    pub kv_events_topic: String,
    pub namespace: Option<NamespaceId>,
    pub block_size: usize,
    pub max_concurrency: usize,
    pub role: Role,
}

/// One API key, resolved.
#[derive(Clone, Debug)]
pub struct ApiKey {
    pub key: String,
    pub name: String,
    pub models: Option<Vec<String>>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// Everything the gateway runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub strategy: Strategy,
    pub tokenizer: Option<PathBuf>,
    pub model: Option<String>,
    pub cache: Vec<String>,
    pub cache_token: Option<String>,
    /// The etcd engines register in (`etcd://host:port`), if backends are discovered.
    pub discover: Option<String>,
    /// The kvcache-lora manager whose adapter states routing follows.
    pub lora: Option<String>,
    pub backends: Vec<BackendConfig>,
    /// Empty: no authentication.
    pub api_keys: Vec<ApiKey>,
    pub cost: CostModel,
    pub index_budget_blocks: usize,
    pub learned_ttl: Duration,
    pub cache_lookup_timeout: Duration,
    pub pd: PdConfig,
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_attempts: usize,
    pub health_interval: Duration,
    pub health_failures: u32,
    pub health_timeout: Duration,
    pub eject_for: Duration,
}

impl Config {
    /// Reads the file `args` names (if any) and applies the flags over it.
    pub fn load(args: Args) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => File::default(),
        };
        resolve(file, args)
    }

    /// A configuration from TOML text and no flags (tests, examples).
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let file: File = toml::from_str(text).context("invalid gateway config")?;
        resolve(file, Args::default())
    }
}

fn read_file(path: &Path) -> anyhow::Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

fn resolve(file: File, args: Args) -> anyhow::Result<Config> {
    let backends = if args.backends.is_empty() {
        file.backend
            .into_iter()
            .map(backend)
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        args.backends
            .into_iter()
            .map(|url| {
                backend(BackendFile {
                    url,
                    kv_events: None,
                    kv_events_replay: None,
                    kv_events_topic: None,
                    namespace: None,
                    block_size: None,
                    max_concurrency: None,
                    role: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let discover = args.discover.or(file.discover);
    if let Some(url) = &discover
        && !url.starts_with("etcd://")
    {
        bail!("discover must be an etcd URL (etcd://host:port), got {url:?}");
    }
    let lora = args
        .lora
        .or(file.lora)
        .map(|u| u.trim_end_matches('/').to_string());
    if let Some(url) = &lora
        && !url.starts_with("http://")
    {
        bail!("lora must be the manager's http:// URL, got {url:?}");
    }
    if backends.is_empty() && discover.is_none() {
        bail!(
            "no backends: give --backend URL (repeatable), [[backend]] url = ... in the config, or --discover etcd://host:port"
        );
    }
    let mut seen = BTreeMap::new();
    for b in &backends {
        if seen.insert(b.url.clone(), ()).is_some() {
            bail!("backend {} is listed twice", b.url);
        }
    }
    let mut api_keys: Vec<ApiKey> = file.api_key.into_iter().map(api_key).collect();
    if let Some(path) = &file.api_keys_file {
        api_keys.extend(read_keys_file(path)?);
    }
    let r = file.routing;
    let cost = CostModel {
        transfer: positive(r.transfer_cost, 0.1, "routing.transfer_cost")?,
        near_transfer: positive(r.near_transfer_cost, 0.05, "routing.near_transfer_cost")?,
        running: positive(r.running_cost, 0.5, "routing.running_cost")?,
        waiting: positive(r.waiting_cost, 4.0, "routing.waiting_cost")?,
        kv_pressure: positive(r.kv_pressure_cost, 8.0, "routing.kv_pressure_cost")?,
    };
    let l = file.limits;
    let h = file.health;
    let max_attempts = l.max_attempts.unwrap_or(2);
    if max_attempts == 0 {
        bail!("limits.max_attempts must be at least 1");
    }
    Ok(Config {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid")),
        strategy: args
            .strategy
            .or(file.strategy)
            .unwrap_or(Strategy::CacheAware),
        tokenizer: args.tokenizer.or(file.tokenizer),
        model: file.model,
        cache: if args.cache.is_empty() {
            file.cache
        } else {
            args.cache
        },
        cache_token: args.cache_token.or(file.cache_token),
        discover,
        lora,
        backends,
        api_keys,
        cost,
        index_budget_blocks: r.index_budget_blocks.unwrap_or(1_000_000).max(1),
        learned_ttl: seconds(r.learned_ttl_s, 30.0, "routing.learned_ttl_s")?,
        cache_lookup_timeout: Duration::from_millis(r.cache_lookup_timeout_ms.unwrap_or(20)),
        pd: pd_config(&r)?,
        max_body_bytes: l.max_body_bytes.unwrap_or(4 << 20),
        connect_timeout: Duration::from_millis(l.connect_timeout_ms.unwrap_or(2000)),
        request_timeout: seconds(l.request_timeout_s, 600.0, "limits.request_timeout_s")?,
        max_attempts,
        health_interval: Duration::from_millis(h.interval_ms.unwrap_or(1000).max(50)),
        health_failures: h.failures.unwrap_or(2).max(1),
        health_timeout: Duration::from_millis(h.timeout_ms.unwrap_or(2000).max(50)),
        eject_for: seconds(h.eject_s, 5.0, "health.eject_s")?,
    })
}

fn pd_config(r: &RoutingFile) -> anyhow::Result<PdConfig> {
    let d = PdConfig::default();
    let fraction = r.pd_bypass_fraction.unwrap_or(d.bypass_fraction);
    if !(0.0..=1.0).contains(&fraction) {
        bail!("routing.pd_bypass_fraction must be between 0 and 1, got {fraction}");
    }
    Ok(PdConfig {
        bypass_tokens: r.pd_bypass_tokens.unwrap_or(d.bypass_tokens),
        bypass_fraction: fraction,
        prefill_timeout: seconds(r.pd_prefill_timeout_s, 60.0, "routing.pd_prefill_timeout_s")?,
    })
}

fn backend(b: BackendFile) -> anyhow::Result<BackendConfig> {
    let url = b.url.trim_end_matches('/').to_string();
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("backend {url}: only http:// URLs are supported"))?;
    if rest.is_empty() || rest.contains('/') {
        bail!("backend {url}: give the base URL (http://host:port), without a path");
    }
    let namespace = match b.namespace {
        Some(hex) => Some(parse_namespace(&hex).with_context(|| format!("backend {url}"))?),
        None => None,
    };
    let block_size = b.block_size.unwrap_or(128);
    if block_size == 0 {
        bail!("backend {url}: block_size must be positive");
    }
    let role = match b.role.as_deref() {
        None => Role::Both,
        Some(r) => Role::parse(r).with_context(|| {
            format!("backend {url}: role must be both, prefill or decode, not {r:?}")
        })?,
    };
    Ok(BackendConfig {
        url,
        role,
        kv_events: b.kv_events,
        kv_events_replay: b.kv_events_replay,
        kv_events_topic: b.kv_events_topic.unwrap_or_default(),
        namespace,
        block_size,
        max_concurrency: b.max_concurrency.unwrap_or(256).max(1),
    })
}

/// A backend from its parts (a discovered engine's record), checked as a `[[backend]]` is.
pub fn backend_config(
    url: &str,
    kv_events: Option<String>,
    kv_events_replay: Option<String>,
    kv_events_topic: Option<String>,
    namespace: Option<&str>,
    block_size: Option<usize>,
    role: Option<&str>,
) -> anyhow::Result<BackendConfig> {
    backend(BackendFile {
        url: url.to_string(),
        kv_events,
        kv_events_replay,
        kv_events_topic,
        namespace: namespace.map(str::to_string),
        block_size,
        max_concurrency: None,
        role: role.map(str::to_string),
    })
}

/// A namespace id as 32 hex digits.
pub fn parse_namespace(hex: &str) -> anyhow::Result<NamespaceId> {
    let hex = hex.trim();
    if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("namespace must be 32 hex digits, got {hex:?}");
    }
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(NamespaceId::from_bytes(bytes))
}

fn api_key(k: ApiKeyFile) -> ApiKey {
    ApiKey {
        name: k.name.unwrap_or_else(|| redact(&k.key)),
        key: k.key,
        models: k.models,
        requests_per_minute: k.requests_per_minute,
        tokens_per_minute: k.tokens_per_minute,
    }
}

/// A key's stand-in for logs when it has no name: its last four characters.
fn redact(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("key-…{tail}")
}

/// A file of `[[api_key]]` tables (so keys can live outside the main config, e.g. a Secret).
fn read_keys_file(path: &Path) -> anyhow::Result<Vec<ApiKey>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Keys {
        #[serde(default)]
        api_key: Vec<ApiKeyFile>,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read api_keys_file {}", path.display()))?;
    let keys: Keys = toml::from_str(&text)
        .with_context(|| format!("invalid api_keys_file {}", path.display()))?;
    Ok(keys.api_key.into_iter().map(api_key).collect())
}

fn positive(v: Option<f64>, default: f64, key: &str) -> anyhow::Result<f64> {
    let v = v.unwrap_or(default);
    if !(v.is_finite() && v >= 0.0) {
        bail!("{key} must be a non-negative number, got {v}");
    }
    Ok(v)
}

fn seconds(v: Option<f64>, default: f64, key: &str) -> anyhow::Result<Duration> {
    let v = positive(v, default, key)?;
    Ok(Duration::from_secs_f64(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_config_parses_with_defaults() {
        let cfg = Config::from_toml(
            r#"
            listen = "127.0.0.1:8080"
            strategy = "cache-aware"
            cache = ["127.0.0.1:7400"]
            [[backend]]
            url = "http://127.0.0.1:8001"
            kv_events = "tcp://127.0.0.1:5557"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.strategy, Strategy::CacheAware);
        assert_eq!(cfg.backends[0].block_size, 128);
        assert_eq!(
            cfg.backends[0].kv_events.as_deref(),
            Some("tcp://127.0.0.1:5557")
        );
        assert!(cfg.api_keys.is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_urls_are_refused_with_the_key_named() {
        let err = Config::from_toml(
            "listen = \"127.0.0.1:1\"\nbogus = 1\n[[backend]]\nurl=\"http://a:1\"",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
        let err = Config::from_toml("[[backend]]\nurl = \"https://a:1\"").unwrap_err();
        assert!(format!("{err:#}").contains("only http://"), "{err:#}");
        let err = Config::from_toml("").unwrap_err();
        assert!(format!("{err:#}").contains("no backends"), "{err:#}");
        let err = Config::from_toml("[[backend]]\nurl = \"http://a:1\"\nnamespace = \"xyz\"")
            .unwrap_err();
        assert!(format!("{err:#}").contains("32 hex digits"), "{err:#}");
    }

    #[test]
    fn flags_override_the_file() {
        let file: File =
            toml::from_str("strategy = \"random\"\n[[backend]]\nurl = \"http://a:1\"").unwrap();
        let args = Args {
            strategy: Some(Strategy::Prefix),
            backends: vec!["http://b:2/".into()],
            ..Args::default()
        };
        let cfg = resolve(file, args).unwrap();
        assert_eq!(cfg.strategy, Strategy::Prefix);
        assert_eq!(cfg.backends.len(), 1);
        assert_eq!(cfg.backends[0].url, "http://b:2");
    }

    #[test]
    fn unnamed_keys_are_redacted_for_logs() {
        assert_eq!(redact("sk-secret-1234"), "key-…1234");
    }
}
