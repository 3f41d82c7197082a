//! Active health checks: every `health.interval_ms` each backend's /health, then its /metrics
//! (the engine's queue and KV usage) and /v1/models (what it serves). The readers of those
//! answers are pure; [`run`] is the loop around them.

use std::sync::Arc;

use serde_json::Value;
use tracing::{info, warn};

use crate::index::EngineId;
use crate::pool::{EngineLoad, ModelCard};
use crate::state::Gateway;
use kvcache_control::prometheus_text;

use crate::upstream;

/// The engine's load from vLLM's Prometheus text: `vllm:num_requests_waiting`,
/// `vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (the deprecated
/// `vllm:gpu_cache_usage_perc` where the new name is absent), summed over label sets.
pub fn engine_load(text: &str) -> EngineLoad {
    let samples = prometheus_text::parse(text);
    let sum = |name: &str| prometheus_text::sum(&samples, name, &[]);
    let usage = sum("vllm:kv_cache_usage_perc").or_else(|| sum("vllm:gpu_cache_usage_perc"));
    EngineLoad {
        waiting: sum("vllm:num_requests_waiting").unwrap_or(0.0).max(0.0) as u32,
        running: sum("vllm:num_requests_running").unwrap_or(0.0).max(0.0) as u32,
        kv_usage: usage.unwrap_or(0.0).clamp(0.0, 1.0),
    }
}

/// The models of an OpenAI /v1/models answer; vLLM names an adapter's base model in `parent`.
pub fn model_cards(body: &[u8]) -> Result<Vec<ModelCard>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or("no `data` array")?;
    Ok(data
        .iter()
        .filter_map(|m| {
            let id = m.get("id").and_then(Value::as_str)?.to_string();
            let adapter = m.get("parent").is_some_and(|p| !p.is_null());
            Some(ModelCard { id, adapter })
        })
        .collect())
}

/// One probe of backend `e`: its load and models, or why it failed.
async fn probe(gw: &Gateway, e: EngineId) -> Result<(EngineLoad, Vec<ModelCard>), String> {
    let url = gw.pool.lock().get(e).config.url.clone();
    let timeout = gw.config.health_timeout;
    let (status, _) = upstream::get(&gw.http, &format!("{url}/health"), timeout).await?;
    if !status.is_success() {
        return Err(format!("/health answered {status}"));
    }
    let (status, body) = upstream::get(&gw.http, &format!("{url}/v1/models"), timeout).await?;
    if !status.is_success() {
        return Err(format!("/v1/models answered {status}"));
    }
    let models = model_cards(&body).map_err(|e| format!("/v1/models: {e}"))?;
    // The load is an input to the cost, not a condition of health: an engine without
    // /metrics is routed on the gateway's own counts.
    let load = match upstream::get(&gw.http, &format!("{url}/metrics"), timeout).await {
        Ok((s, body)) if s.is_success() => engine_load(&String::from_utf8_lossy(&body)),
        _ => EngineLoad::default(),
    };
    Ok((load, models))
}

/// Probes every backend every `health.interval_ms` until the process ends; logs each change
/// of a backend's health once, with the reason.
pub async fn run(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(gw.config.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Vec<Option<String>> = Vec::new();
    loop {
        tick.tick().await;
        // Backends join through discovery; retired ones are not probed.
        let n = gw.pool.lock().backends().len() as EngineId;
        last_error.resize(n as usize, None);
        let live: Vec<EngineId> = (0..n).filter(|&e| !gw.pool.lock().get(e).retired).collect();
        let results = futures_util::future::join_all(live.iter().map(|&e| probe(&gw, e))).await;
        for (e, result) in live.into_iter().zip(results) {
            let url = gw.pool.lock().get(e).config.url.clone();
            match result {
                Ok((load, models)) => {
                    let came_up = gw.pool.lock().probe_passed(e, load, models.clone());
                    if came_up {
                        info!(backend = %url, ?models, "backend is up");
                    }
                    last_error[e as usize] = None;
                }
                Err(why) => {
                    let went_down = gw.pool.lock().probe_failed(e, gw.config.health_failures);
                    if went_down || last_error[e as usize].is_none() {
                        warn!(backend = %url, reason = %why, down = went_down, "backend probe failed");
                    }
                    last_error[e as usize] = Some(why);
                }
            }
            gw.publish_backend(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_load_is_read_from_its_metrics_text() {
        let text = "# HELP vllm:num_requests_waiting x\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"tiny\"} 3.0\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"tiny\"} 2.0\n\
            vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"tiny\"} 0.25\n\
            vllm:gpu_cache_usage_perc{engine=\"0\"} 0.9\n\
            vllm:num_requests_waiting_by_reason{reason=\"x\"} 7\n";
        assert_eq!(
            engine_load(text),
            EngineLoad {
                waiting: 3,
                running: 2,
                kv_usage: 0.25
            }
        );
        assert_eq!(engine_load("vllm:gpu_cache_usage_perc 0.5\n").kv_usage, 0.5);
        assert_eq!(engine_load("garbage {{{\n"), EngineLoad::default());
    }

    #[test]
    fn model_ids_come_from_the_data_array() {
        let body = br#"{"object":"list","data":[{"id":"tiny","parent":null},{"id":"sql-lora","parent":"tiny"}]}"#;
        let sql = ModelCard {
            id: "sql-lora".into(),
            adapter: true,
        };
        assert_eq!(model_cards(body).unwrap(), [ModelCard::from("tiny"), sql]);
        assert!(model_cards(b"{}").is_err());
    }
}
