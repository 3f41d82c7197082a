//! kvcache-autoscaler: replica counts for vLLM engine pools and the kvcache tier from what
//! inference feels.
//!
//! The pure rooms: `metric` (a target's metric from
//! two scrapes), `window` (trailing averages), `policy/` (KPA, APA, SLO), `target` (one
//! target's decision: several metrics, panic, cooldown, bounds, freezing), `config`. The shell:
//! `sources` (scrapes and etcd discovery), `actuator/` (Kubernetes, a command, dry-run),
//! `scaler` (the loop), `http` (/status, /metrics), `metrics`.

pub mod actuator;
pub mod config;
pub mod http;
pub mod metric;
pub mod metrics;
pub mod policy;
pub mod scaler;
pub mod sources;
pub mod target;
pub mod window;
