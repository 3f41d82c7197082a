//! The autoscaler's settings: a TOML file (`--config`, required: targets live there), then
//! flags for what a run changes (`--listen`, `--dry-run`). Unknown keys are errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;

use crate::metric::{Kind, MetricSpec};
use crate::policy::{Algorithm, Params};
use crate::target::Rules;

/// kvcache-autoscaler: replicas for vLLM pools and the kvcache tier from what inference feels.
///
/// Every `interval_s` it scrapes each target's sources (vLLM's, the gateway's or cache nodes'
/// /metrics, listed or found in etcd; or a Prometheus server's query API), averages each metric
/// over a stable and a panic window, and decides replicas by `algorithm`: `kpa` (stable and
/// panic windows; panic never scales down), `apa` (a tolerance band and rate caps) or `slo`
/// (demand over measured capacity, plus one when a latency SLO is missed). Several metrics:
/// the largest answer wins. A scale-down waits `scale_down_cooldown_s`; a failed source freezes
/// the target. The `actuator` applies it: `kubernetes` (a Deployment's or StatefulSet's scale
/// subresource), `command` (`scale_command` run with {replicas}) or `dry-run`. GET /status
/// (JSON) and /metrics say, per target, the values, current, desired and why.
///
/// The file: `listen`, `interval_s`, then `[[target]]` tables with `name`, `sources` (metrics
/// URLs), `discover` (etcd://host:port: the engines the connector registers) and `role`,
/// `prometheus` (a server whose `query` per metric gives the value), `metric` + `target_value`
/// (one gauge) or `[[target.metrics]]` tables (`name`, `kind` gauge|rate|histogram_mean,
/// `labels`, `per`, `target_value`, `capacity_per_replica`, `query`), `algorithm`,
/// `min_replicas`, `max_replicas`, `stable_window_s`, `panic_window_s`,
/// `scale_down_cooldown_s`, `tolerance`, `max_scale_up_rate`, `max_scale_down_rate`,
/// `panic_threshold`, `actuator`, `scale_command`, `scale_timeout_s`, `initial_replicas`,
/// `[target.kubernetes]` (`namespace`, `kind` Deployment|StatefulSet, `name`). The README
/// explains each.
#[derive(Parser, Debug, Default)]
#[command(
    name = "kvcache-autoscaler",
    version,
    about,
    long_about,
    max_term_width = 100
)]
pub struct Args {
    /// TOML file with the targets (see above).
    #[arg(long, env = "KVCACHE_AUTOSCALER_CONFIG", value_name = "FILE")]
    pub config: PathBuf,

    /// Address of GET /status and /metrics [default: the file's `listen`, else 127.0.0.1:9090].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,

    /// Decide and report only: every target's actuator becomes dry-run.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    interval_s: Option<f64>,
    #[serde(default)]
    target: Vec<TargetFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    name: String,
    #[serde(default)]
    sources: Vec<String>,
    discover: Option<String>,
    role: Option<String>,
    prometheus: Option<String>,
    metric: Option<String>,
    target_value: Option<f64>,
    #[serde(default)]
    metrics: Vec<MetricFile>,
    algorithm: Option<Algorithm>,
    min_replicas: Option<u32>,
    max_replicas: Option<u32>,
    stable_window_s: Option<f64>,
    panic_window_s: Option<f64>,
    scale_down_cooldown_s: Option<f64>,
    tolerance: Option<f64>,
    max_scale_up_rate: Option<f64>,
    max_scale_down_rate: Option<f64>,
    panic_threshold: Option<f64>,
    actuator: Option<ActuatorKind>,
    scale_command: Option<String>,
    scale_timeout_s: Option<f64>,
    initial_replicas: Option<u32>,
    kubernetes: Option<KubernetesTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricFile {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    kind: Kind,
    per: Option<String>,
    target_value: Option<f64>,
    capacity_per_replica: Option<f64>,
    query: Option<String>,
}

/// How a target's replica count is changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActuatorKind {
    Kubernetes,
    Command,
    #[default]
    DryRun,
}

impl ActuatorKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::Command => "command",
            Self::DryRun => "dry-run",
        }
    }
}

/// The workload a `kubernetes` actuator scales.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesTarget {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// `Deployment` or `StatefulSet`.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub name: String,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_kind() -> String {
    "Deployment".into()
}

/// Where a target's numbers come from.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceConfig {
    /// Prometheus text from these URLs and from the engines registered in etcd (of `role`).
    Scrape {
        urls: Vec<String>,
        discover: Option<String>,
        role: Option<String>,
    },
    /// A Prometheus server: one instant query per metric.
    Prometheus { url: String, queries: Vec<String> },
}

/// One resolved target.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    pub name: String,
    pub rules: Rules,
    pub source: SourceConfig,
    pub actuator: ActuatorKind,
    pub scale_command: Option<String>,
    pub scale_timeout: Duration,
    pub initial_replicas: Option<u32>,
    pub kubernetes: Option<KubernetesTarget>,
}

/// The resolved settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub interval: Duration,
    pub targets: Vec<TargetConfig>,
}

fn ms(seconds: Option<f64>, default_s: f64, what: &str) -> anyhow::Result<u64> {
    let s = seconds.unwrap_or(default_s);
    if !(s >= 0.0 && s.is_finite()) {
        bail!("{what} must be a number of seconds, at least 0");
    }
    Ok((s * 1000.0) as u64)
}

fn target(t: TargetFile, dry_run: bool) -> anyhow::Result<TargetConfig> {
    let name = t.name.clone();
    if name.is_empty() {
        bail!("a target needs a name");
    }
    let mut metrics: Vec<MetricFile> = t.metrics;
    if let Some(metric) = t.metric {
        metrics.insert(
            0,
            MetricFile {
                name: metric,
                labels: BTreeMap::new(),
                kind: Kind::Gauge,
                per: None,
                target_value: t.target_value,
                capacity_per_replica: None,
                query: None,
            },
        );
    } else if t.target_value.is_some() {
        bail!(
            "target_value without metric: give `metric = NAME` or put target_value in a [[target.metrics]] table"
        );
    }
    if metrics.is_empty() {
        bail!("no metric: give `metric` and `target_value`, or [[target.metrics]] tables");
    }
    let algorithm = t.algorithm.unwrap_or_default();
    for m in &metrics {
        let has = |v: Option<f64>| v.is_some_and(|v| v > 0.0 && v.is_finite());
        match algorithm {
            Algorithm::Kpa | Algorithm::Apa if !has(m.target_value) => {
                bail!(
                    "metric {}: {} needs a positive target_value",
                    m.name,
                    algorithm.name()
                )
            }
            Algorithm::Slo if !has(m.target_value) && !has(m.capacity_per_replica) => {
                bail!(
                    "metric {}: slo needs a target_value (a latency SLO) or a capacity_per_replica (a demand rate)",
                    m.name
                )
            }
            _ => {}
        }
    }
    let source = match (t.prometheus, t.sources.is_empty() && t.discover.is_none()) {
        (Some(url), _) => {
            let queries = metrics
                .iter()
                .map(|m| {
                    m.query.clone().with_context(|| {
                        format!(
                            "metric {}: a prometheus target needs a query per metric",
                            m.name
                        )
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if !url.starts_with("http://") {
                bail!("prometheus must be an http:// URL, got {url:?}");
            }
            SourceConfig::Prometheus {
                url: url.trim_end_matches('/').to_string(),
                queries,
            }
        }
        (None, true) => bail!(
            "no sources: list `sources` (metrics URLs), `discover` etcd://..., or `prometheus`"
        ),
        (None, false) => {
            if let Some(url) = &t.discover {
                kvcache_membership::Etcd::new(url, Duration::from_secs(2))
                    .map_err(|e| anyhow::anyhow!("discover: {e}"))?;
            }
            for u in &t.sources {
                if !u.starts_with("http://") {
                    bail!("source {u:?} is not an http:// URL");
                }
            }
            SourceConfig::Scrape {
                urls: t.sources,
                discover: t.discover,
                role: t.role,
            }
        }
    };
    let min_replicas = t.min_replicas.unwrap_or(1);
    let max_replicas = t.max_replicas.unwrap_or(10);
    if max_replicas < min_replicas || max_replicas == 0 {
        bail!(
            "max_replicas ({max_replicas}) must be at least 1 and at least min_replicas ({min_replicas})"
        );
    }
    let stable_window_ms = ms(t.stable_window_s, 60.0, "stable_window_s")?;
    let panic_window_ms = ms(t.panic_window_s, 6.0, "panic_window_s")?;
    if panic_window_ms > stable_window_ms {
        bail!("panic_window_s must not exceed stable_window_s");
    }
    let defaults = Params::default();
    let params = Params {
        tolerance_up: t.tolerance.unwrap_or(defaults.tolerance_up),
        tolerance_down: t.tolerance.unwrap_or(defaults.tolerance_down),
        rate_up: t.max_scale_up_rate.unwrap_or(defaults.rate_up),
        rate_down: t.max_scale_down_rate.unwrap_or(defaults.rate_down),
        panic_threshold: t.panic_threshold.unwrap_or(defaults.panic_threshold),
    };
    if params.rate_up < 1.0 || params.rate_down < 1.0 {
        bail!("max_scale_up_rate and max_scale_down_rate must be at least 1");
    }
    let actuator = if dry_run {
        ActuatorKind::DryRun
    } else {
        t.actuator.unwrap_or_default()
    };
    if actuator == ActuatorKind::Command
        && !t
            .scale_command
            .as_deref()
            .is_some_and(|c| c.contains("{replicas}"))
    {
        bail!("actuator = \"command\" needs scale_command with {{replicas}} in it");
    }
    if actuator == ActuatorKind::Kubernetes && t.kubernetes.is_none() {
        bail!(
            "actuator = \"kubernetes\" needs a [target.kubernetes] table (namespace, kind, name)"
        );
    }
    if let Some(k) = &t.kubernetes
        && k.kind != "Deployment"
        && k.kind != "StatefulSet"
    {
        bail!(
            "kubernetes.kind must be Deployment or StatefulSet, got {:?}",
            k.kind
        );
    }
    Ok(TargetConfig {
        rules: Rules {
            algorithm,
            params,
            metrics: metrics
                .into_iter()
                .map(|m| MetricSpec {
                    name: m.name,
                    labels: m.labels,
                    kind: m.kind,
                    per: m.per,
                    target_value: m.target_value,
                    capacity_per_replica: m.capacity_per_replica,
                })
                .collect(),
            min_replicas,
            max_replicas,
            stable_window_ms,
            panic_window_ms,
            scale_down_cooldown_ms: ms(t.scale_down_cooldown_s, 300.0, "scale_down_cooldown_s")?,
        },
        name,
        source,
        actuator,
        scale_command: t.scale_command,
        scale_timeout: Duration::from_millis(
            ms(t.scale_timeout_s, 120.0, "scale_timeout_s")?.max(1000),
        ),
        initial_replicas: t.initial_replicas,
        kubernetes: t.kubernetes,
    })
}

impl Config {
    /// Reads `args.config` and checks it; says which target and key is wrong when one is.
    pub fn load(args: &Args) -> anyhow::Result<Self> {
        Self::from_file(&args.config, args.listen, args.dry_run)
    }

    fn from_file(path: &Path, listen: Option<SocketAddr>, dry_run: bool) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let file: File =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        if file.target.is_empty() {
            bail!("{}: no [[target]]", path.display());
        }
        let mut targets = Vec::new();
        for t in file.target {
            let name = t.name.clone();
            if targets.iter().any(|x: &TargetConfig| x.name == name) {
                bail!("target {name:?} is declared twice");
            }
            targets.push(target(t, dry_run).with_context(|| format!("target {name:?}"))?);
        }
        let interval_s = file.interval_s.unwrap_or(1.0);
        if !(0.05..=3600.0).contains(&interval_s) {
            bail!("interval_s must be between 0.05 and 3600");
        }
        Ok(Self {
            listen: listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:9090".parse().expect("a valid default")),
            interval: Duration::from_secs_f64(interval_s),
            targets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<Config> {
        let path = std::env::temp_dir().join(format!(
            "kvcache-autoscaler-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let c = Config::from_file(&path, None, false);
        std::fs::remove_file(&path).ok();
        c
    }

    const ISSUE_EXAMPLE: &str = r#"
listen = "127.0.0.1:9090"
interval_s = 1
[[target]]
name = "engines"
sources = ["http://127.0.0.1:8001/metrics"]
metric = "vllm:num_requests_running"
target_value = 2.0
algorithm = "kpa"
min_replicas = 1
max_replicas = 4
stable_window_s = 30
panic_window_s = 6
scale_down_cooldown_s = 10
actuator = "command"
scale_command = "scripts/scale-engines.sh {replicas}"
"#;

    #[test]
    fn the_documented_example_loads() {
        let c = load(ISSUE_EXAMPLE).unwrap();
        let t = &c.targets[0];
        assert_eq!(
            (
                t.rules.min_replicas,
                t.rules.max_replicas,
                t.rules.stable_window_ms
            ),
            (1, 4, 30_000)
        );
        assert_eq!(t.rules.metrics[0].target_value, Some(2.0));
        assert_eq!(t.actuator, ActuatorKind::Command);
    }

    #[test]
    fn mistakes_are_named_with_their_target() {
        let cases = [
            (
                ISSUE_EXAMPLE.replace("interval_s = 1", "interval_s = 1\nbogus = 2"),
                "bogus",
            ),
            (ISSUE_EXAMPLE.replace("{replicas}", "N"), "{replicas}"),
            (
                ISSUE_EXAMPLE.replace("max_replicas = 4", "max_replicas = 0"),
                "max_replicas",
            ),
            (
                ISSUE_EXAMPLE.replace("target_value = 2.0", ""),
                "positive target_value",
            ),
            (
                ISSUE_EXAMPLE.replace("algorithm = \"kpa\"", "algorithm = \"hpa\""),
                "hpa",
            ),
            (
                ISSUE_EXAMPLE.replace("sources = [\"http://127.0.0.1:8001/metrics\"]", ""),
                "no sources",
            ),
            (
                ISSUE_EXAMPLE.replace("actuator = \"command\"", "actuator = \"kubernetes\""),
                "[target.kubernetes]",
            ),
            (
                format!(
                    "{ISSUE_EXAMPLE}{}",
                    &ISSUE_EXAMPLE[ISSUE_EXAMPLE.find("[[target]]").unwrap()..]
                ),
                "twice",
            ),
        ];
        for (text, why) in cases {
            let e = format!("{:#}", load(&text).unwrap_err());
            assert!(e.contains(why), "expected {why:?} in {e}");
        }
    }
}
