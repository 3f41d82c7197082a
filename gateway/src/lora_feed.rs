//! Reads the kvcache-lora manager's `GET /v1/adapters` every `health.interval_ms` into the
//! gateway's adapter routes. The manager's API is the one source: the gateway writes nothing
//! back, and when the manager does not answer it keeps what it read last (an adapter's
//! instances change only through the manager's own reconcile).

use std::sync::Arc;

use tracing::{info, warn};

use crate::adapters::read;
use crate::state::Gateway;
use crate::upstream;

/// Reads the manager at `url` every `health.interval_ms` until the process ends; logs when it
/// stops and starts answering, and each adapter's change of Ready instances.
pub async fn run(gw: Arc<Gateway>, url: String) {
    let mut tick = tokio::time::interval(gw.config.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let list = format!("{url}/v1/adapters");
    let mut failing: Option<String> = None;
    loop {
        tick.tick().await;
        let read = upstream::get(&gw.http, &list, gw.config.health_timeout)
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
