//! The shell around the pure reconcile step: every `interval` (or at once after an API change)
//! it reads the config file if it changed, lists the instances (configured, and discovered in
//! etcd), observes each one, runs the step, makes the loads and unloads it asks for, and
//! reports their outcomes back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use kvcache_membership::{ENGINES_PREFIX, Etcd};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::{Config, DEFAULT_MAX_LORAS, read_adapters};
use crate::engine::Engines;
use crate::reconcile::{Action, Observed, Outcome};
use crate::registry::{Phase, Registry};
use crate::source::{AdapterSource, LocalDir};
use crate::spec::AdapterSpec;

/// What the manager knows of one instance between passes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InstanceInfo {
    pub url: String,
    pub up: bool,
    /// Why it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub down_since_ms: Option<u64>,
    /// Kept while it is down, so its placements wait for it.
    pub base_models: Vec<String>,
    pub adapters: BTreeSet<String>,
    pub busy: BTreeSet<String>,
    pub capacity: usize,
}

/// The manager's state, shared by the loop and the HTTP API.
pub struct Manager {
    pub config: Config,
    pub registry: Mutex<Registry>,
    pub metrics: crate::metrics::Metrics,
    pub instances: Mutex<BTreeMap<String, InstanceInfo>>,
    engines: Engines,
    source: Box<dyn AdapterSource>,
    started: Instant,
    wake: Notify,
}

/// An engine record in etcd (the connector's; other fields are the gateway's).
#[derive(Deserialize)]
struct EngineRecord {
    url: String,
}

impl Manager {
    /// The manager for `config`, with the file's adapters declared.
    pub fn new(config: Config) -> Arc<Self> {
        let engines = Engines::new(
            config.interval.max(std::time::Duration::from_secs(2)),
            config.load_timeout,
            config.engine_api_key.clone(),
        );
        let m = Arc::new(Self {
            source: Box::new(LocalDir {
                check: config.check_paths,
            }),
            registry: Mutex::new(Registry::default()),
            metrics: crate::metrics::Metrics::new(),
            instances: Mutex::new(BTreeMap::new()),
            engines,
            started: Instant::now(),
            wake: Notify::new(),
            config,
        });
        m.sync_file(&m.config.adapters);
        m
    }

    /// Milliseconds since start: the clock the pure step takes.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs a pass soon (after an API change).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// `spec` with its path resolved by the source, or why it cannot be used.
    pub fn resolve(&self, mut spec: AdapterSpec) -> Result<AdapterSpec, String> {
        spec.check().map_err(|e| e.to_string())?;
        spec.path = self.source.resolve(&spec.path).map_err(|e| e.to_string())?;
        Ok(spec)
    }

    /// Makes the file's adapters `specs`; one whose files cannot be used is listed Failed.
    fn sync_file(&self, specs: &[AdapterSpec]) {
        let mut resolved = Vec::with_capacity(specs.len());
        let mut broken = Vec::new();
        for spec in specs {
            match self.resolve(spec.clone()) {
                Ok(s) => resolved.push(s),
                Err(why) => {
                    resolved.push(spec.clone());
                    broken.push((spec.name.clone(), why));
                }
            }
        }
        let mut registry = self.registry.lock();
        for (name, change) in registry.sync_file(&resolved) {
            info!(adapter = %name, ?change, "config file");
        }
        for (name, why) in broken {
            warn!(adapter = %name, error = %why, "adapter in the config file cannot be used");
            registry.fail(&name, why);
        }
    }

    /// The instances to manage now: the configured ones and those registered in etcd
    /// (`discovered`, kept from the last successful read when etcd does not answer).
    fn instance_urls(&self, discovered: &BTreeSet<String>) -> Vec<String> {
        let mut urls: BTreeSet<String> = self.config.instances.iter().cloned().collect();
        urls.extend(discovered.iter().cloned());
        urls.into_iter().collect()
    }

    /// Observes every instance in `urls`, updating [`Manager::instances`].
    async fn observe(&self, urls: &[String]) -> Vec<Observed> {
        let now = self.now_ms();
        let results = futures_util::future::join_all(urls.iter().map(|u| async move {
            let models = self.engines.models(u).await;
            let activity = match &models {
                Ok(_) => self.engines.activity(u).await.unwrap_or_default(),
                Err(_) => Default::default(),
            };
            (models, activity)
        }))
        .await;
        let mut book = self.instances.lock();
        book.retain(|url, _| urls.contains(url));
        let mut out = Vec::with_capacity(urls.len());
        for (url, (models, activity)) in urls.iter().zip(results) {
            let info = book.entry(url.clone()).or_insert_with(|| InstanceInfo {
                url: url.clone(),
                capacity: self.config.max_loras.unwrap_or(DEFAULT_MAX_LORAS),
                ..Default::default()
            });
            match models {
                Ok(m) => {
                    if !info.up {
                        info!(instance = %url, base_models = ?m.base, adapters = ?m.adapters, "instance up");
                    }
                    info.up = true;
                    info.error = None;
                    info.down_since_ms = None;
                    info.base_models = m.base;
                    info.adapters = m.adapters;
                    info.busy = activity.busy;
                    info.capacity = self
                        .config
                        .max_loras
                        .or(activity.max_loras)
                        .unwrap_or(DEFAULT_MAX_LORAS);
                }
                Err(why) => {
                    if info.up || info.error.is_none() {
                        warn!(instance = %url, error = %why, "instance not answering");
                    }
                    info.up = false;
                    info.down_since_ms.get_or_insert(now);
                    info.error = Some(why);
                    info.adapters.clear();
                    info.busy.clear();
                }
            }
            self.metrics
                .instance_up
                .get_or_create(&vec![("instance", url.clone())])
                .set(info.up as i64);
            out.push(Observed {
                url: url.clone(),
                up: info.up,
                down_since_ms: info.down_since_ms,
                base_models: info.base_models.clone(),
                adapters: info.adapters.clone(),
                busy: info.busy.clone(),
                capacity: info.capacity,
            });
        }
        out
    }

    /// One pass; returns whether it acted (then the next pass runs at once, to verify).
    async fn pass(&self, urls: &[String]) -> bool {
        let started = Instant::now();
        let observed = self.observe(urls).await;
        let settings = &self.config.settings;
        let step = self
            .registry
            .lock()
            .reconcile(&observed, settings, self.now_ms());
        for n in &step.notes {
            if n.lost {
                self.metrics.lost.inc();
                warn!(adapter = %n.adapter, instance = n.url.as_deref().unwrap_or(""), "{}", n.what);
            } else {
                info!(adapter = %n.adapter, instance = n.url.as_deref().unwrap_or(""), "{}", n.what);
            }
        }
        let outcomes = futures_util::future::join_all(step.actions.iter().map(|a| async move {
            match a {
                Action::Load { adapter, url, path } => {
                    info!(%adapter, instance = %url, %path, "loading");
                    self.engines.load(url, adapter, path).await
                }
                Action::Unload { adapter, url } => {
                    info!(%adapter, instance = %url, "unloading (drained)");
                    self.engines.unload(url, adapter).await
                }
            }
        }))
        .await;
        let now = self.now_ms();
        {
            let mut registry = self.registry.lock();
            for (action, outcome) in step.actions.iter().zip(outcomes) {
                let label = match &outcome {
                    Outcome::Done => "ok",
                    Outcome::Refused(_) => "refused",
                    Outcome::Unreachable(_) => "unreachable",
                };
                match action {
                    Action::Load { adapter, url, .. } => {
                        self.metrics.operation("load", label);
                        if let Outcome::Unreachable(why) = &outcome {
                            warn!(%adapter, instance = %url, error = %why, "load did not reach the engine; retrying");
                        }
                        if let Some(n) = registry.loaded(adapter, url, outcome, settings, now) {
                            warn!(adapter = %n.adapter, instance = n.url.as_deref().unwrap_or(""), "{}", n.what);
                        }
                    }
                    Action::Unload { adapter, url } => {
                        self.metrics.operation("unload", label);
                        if outcome != Outcome::Done {
                            warn!(%adapter, instance = %url, ?outcome, "unload failed; retrying");
                        }
                        registry.unloaded(adapter, url, outcome, settings, now);
                    }
                }
            }
            let phases = registry.phases();
            for phase in Phase::ALL {
                self.metrics
                    .adapters
                    .get_or_create(&vec![("phase", phase.name().to_string())])
                    .set(phases[phase.name()] as i64);
            }
        }
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        !step.actions.is_empty()
    }

    /// Runs passes until the process ends.
    pub async fn run(self: Arc<Self>) {
        let etcd = self.config.discover.as_deref().and_then(|url| match Etcd::new(url, std::time::Duration::from_secs(2)) {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(error = %e, "invalid discover URL: only the listed instances are managed");
                None
            }
        });
        let mut discovered: BTreeSet<String> = BTreeSet::new();
        let mut file_stamp = self.config.file.as_deref().and_then(stamp);
        loop {
            if let Some(path) = self.config.file.as_deref() {
                let now_stamp = stamp(path);
                if now_stamp != file_stamp {
                    file_stamp = now_stamp;
                    match read_adapters(path) {
                        Ok(specs) => self.sync_file(&specs),
                        Err(e) => warn!(
                            error = format!("{e:#}"),
                            "config file changed but cannot be used; keeping the adapters as they were"
                        ),
                    }
                }
            }
            if let Some(etcd) = &etcd {
                match etcd.range_prefix(ENGINES_PREFIX).await {
                    Ok(records) => {
                        let urls: BTreeSet<String> = records
                            .iter()
                            .filter_map(|(_, v)| serde_json::from_str::<EngineRecord>(v).ok())
                            .map(|r| r.url.trim_end_matches('/').to_string())
                            .collect();
                        if urls != discovered {
                            info!(instances = ?urls, "discovered instances changed");
                            discovered = urls;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "etcd discovery failed; keeping the instances it listed last")
                    }
                }
            }
            let urls = self.instance_urls(&discovered);
            if self.pass(&urls).await {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// The file's contents, to notice a change (a modification time can miss two writes in
/// one tick).
fn stamp(path: &std::path::Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}
