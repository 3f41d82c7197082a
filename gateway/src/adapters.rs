//! LoRA adapters as the kvcache-lora manager reports them (`GET /v1/adapters`; `lora_feed.rs`
//! reads it): for each adapter, its phase and the instances where it is Ready. Routing sends an
//! adapter's requests only there. Pure: the reader of the manager's answer.

use std::collections::HashMap;

use serde::Deserialize;

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
