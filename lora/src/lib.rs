//! kvcache-lora: places LoRA adapters on vLLM instances, keeps them loaded, and tells the
//! gateway where each one is Ready.
//!
//! The pure rooms: `spec` (an adapter's declaration), `registry` (every adapter, its phase
//! and its state per instance), `placement` (which instances should hold which adapter),
//! `reconcile` (one step: observations in, loads and unloads out), `source` (where adapter
//! files come from), `config`. The shell: `manager` (the loop that observes, steps and acts),
//! `engine` (vLLM's /v1/models, runtime LoRA endpoints and /metrics), `http` (the API),
//! `metrics`.

pub mod config;
pub mod engine;
pub mod http;
pub mod manager;
pub mod metrics;
pub mod placement;
pub mod reconcile;
pub mod registry;
pub mod source;
pub mod spec;
