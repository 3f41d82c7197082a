//! LoRA adapters as the kvcache-lora manager reports them (`GET /v1/adapters`, read every
//! `health.interval_ms`): for each adapter, its phase and the instances where it is Ready.
//! Routing sends an adapter's requests only there. The manager's API is the one source: the
//! gateway writes nothing back, and when the manager does not answer it keeps what it read
//! last (an adapter's instances change only through the manager's own reconcile).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use tracing::{info, warn};

use crate::state::Gateway;
use crate::upstream;

/// Where one adapter may be routed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdapterRoute {
    pub base_model: String,
    /// `Pending`, `Loading`, `Ready`, `Failed` or `Unloading`.
    pub phase: String,
    /// Instance URLs where it is Ready.
    pub ready: Vec<String>,
    pub error: Option<String>,
}

/// Every adapter the manager knows, by name.
pub type AdapterRoutes = HashMap<String, AdapterRoute>;

/// Reads the manager's `GET /v1/adapters` answer (fields the gateway does not use are ignored).
pub fn read(body: &[u8]) -> Result<AdapterRoutes, String> {
    #[derive(Deserialize)]
    struct Instance {
        url: String,
        state: String,
    }
    #[derive(Deserialize)]
    struct Adapter {
        name: String,
        base_model: String,
        phase: String,
        #[serde(default)]
        instances: Vec<Instance>,
        #[serde(default)]
        error: Option<String>,
    }
    #[derive(Deserialize)]
    struct List {
        adapters: Vec<Adapter>,
    }
    let list: List =
        serde_json::from_slice(body).map_err(|e| format!("not an adapter list: {e}"))?;
    Ok(list
        .adapters
        .into_iter()
        .map(|a| {
            let ready = a
                .instances
                .into_iter()
                .filter(|i| i.state == "Ready")
                .map(|i| i.url.trim_end_matches('/').to_string())
                .collect();
            let route = AdapterRoute {
                base_model: a.base_model,
                phase: a.phase,
                ready,
                error: a.error,
            };
            (a.name, route)
        })
        .collect())
}

/// Reads the manager at `url` every `health.interval_ms` until the process ends; logs when it
/// stops and starts answering, and each adapter's change of Ready instances.
pub async fn run(gw: Arc<Gateway>, url: String) {
    let mut tick = tokio::time::interval(gw.config.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let list = format!("{url}/v1/adapters");
    let mut failing: Option<String> = None;
    loop {
        tick.tick().await;
        let read = upstream::get(
            &gw.http,
            &list,
            gw.config
                .health_interval
                .max(std::time::Duration::from_secs(1)),
        )
        .await
        .and_then(|(status, body)| {
            if status.is_success() {
                read(&body)
            } else {
                Err(format!("answered {status}"))
            }
        });
        match read {
            Ok(routes) => {
                if failing.take().is_some() {
                    info!(lora = %url, "LoRA manager answering again");
                }
                let mut current = gw.adapters.lock();
                for (name, r) in &routes {
                    if current.get(name).map(|c| (&c.phase, &c.ready)) != Some((&r.phase, &r.ready))
                    {
                        info!(adapter = %name, phase = %r.phase, ready = ?r.ready, "LoRA adapter");
                    }
                }
                *current = routes;
            }
            Err(why) => {
                if failing.as_deref() != Some(why.as_str()) {
                    warn!(lora = %url, error = %why, "LoRA manager not answering; routing adapters as it said last");
                }
                failing = Some(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_instances_route_an_adapter() {
        let body = br#"{"adapters":[{"name":"a","base_model":"tiny","path":"/x","replicas":1,"origin":"api",
            "phase":"Loading","instances":[{"url":"http://i1/","state":"Ready"},{"url":"http://i2","state":"Loading"},
            {"url":"http://i3","state":"Draining"}],"error":null,"retries":0}]}"#;
        let routes = read(body).unwrap();
        assert_eq!(
            routes["a"],
            AdapterRoute {
                base_model: "tiny".into(),
                phase: "Loading".into(),
                ready: vec!["http://i1".into()],
                error: None
            }
        );
        assert!(read(b"[]").unwrap_err().contains("not an adapter list"));
    }
}
