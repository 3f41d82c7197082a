//! The backends and what the gateway knows of each: health (active probes), ejection (passive:
//! a failed request sits the backend out), the models it serves, its load as the gateway
//! counts it (requests in flight, prompt blocks dispatched and not yet answered) and as the
//! engine reports it (its queue and KV usage). Pure: time comes in as milliseconds.

use kvcache_core::{Namespace, NamespaceId};

use crate::config::BackendConfig;
use crate::index::EngineId;
use crate::pd::{Need, Role};
use crate::route::Candidate;

/// The engine's own load, from its /metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineLoad {
    pub waiting: u32,
    pub running: u32,
    /// 0..1.
    pub kv_usage: f64,
}

/// One backend's state.
#[derive(Clone, Debug)]
pub struct Backend {
    pub config: BackendConfig,
    /// The namespace its blocks are keyed in in the prefix index: its engine's lookup
    /// namespace when known (then the shared tier can be asked too), else one the gateway
    /// derives, so prompts and events still agree.
    pub index_namespace: NamespaceId,
    /// Gone from discovery (its etcd record expired): it takes no requests until it returns.
    pub retired: bool,
    /// Whether the last probes passed (false until the first one does).
    pub healthy: bool,
    failed_probes: u32,
    /// Sitting out after a failed request, until then.
    ejected_until_ms: Option<u64>,
    pub in_flight: u32,
    pub pending_blocks: u64,
    pub load: EngineLoad,
    /// Served models (and adapters), from its /v1/models.
    pub models: Vec<String>,
    /// Of those, the LoRA adapters (models with a parent).
    pub adapters: Vec<String>,
}

impl Backend {
    /// Whether it takes requests at `now_ms`.
    pub fn up(&self, now_ms: u64) -> bool {
        !self.retired && self.healthy && self.ejected_until_ms.is_none_or(|t| t <= now_ms)
    }

    /// Whether it has room for one more request.
    pub fn has_room(&self) -> bool {
        (self.in_flight as usize) < self.config.max_concurrency
    }

    /// Whether it serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        !self.retired && self.models.iter().any(|m| m == model)
    }

    fn new(config: BackendConfig) -> Self {
        Self {
            index_namespace: index_namespace(&config),
            config,
            retired: false,
            healthy: false,
            failed_probes: 0,
            ejected_until_ms: None,
            in_flight: 0,
            pending_blocks: 0,
            load: EngineLoad::default(),
            models: Vec::new(),
            adapters: Vec::new(),
        }
    }
}

/// Why no backend can take a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoBackend {
    /// None serves the model (as far as the probes have seen).
    UnknownModel,
    /// Some serve it, but none is healthy now.
    AllDown,
    /// Some are up, but every one is at its concurrency limit.
    AllBusy,
    /// A LoRA adapter the manager knows is Ready nowhere: its `phase` there and its error.
    AdapterNotReady {
        phase: String,
        error: Option<String>,
    },
}

/// Every backend.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    backends: Vec<Backend>,
}

impl Pool {
    /// A pool of `configs`, none healthy until probed.
    pub fn new(configs: Vec<BackendConfig>) -> Self {
        Self {
            backends: configs.into_iter().map(Backend::new).collect(),
        }
    }

    /// Adds a backend, or updates the one with the same URL (and brings it back if it was
    /// retired). Returns its id and whether its KV-event source or namespace changed (its feed
    /// and index entries must then start over).
    pub fn upsert(&mut self, config: BackendConfig) -> (EngineId, bool) {
        match self
            .backends
            .iter()
            .position(|b| b.config.url == config.url)
        {
            Some(i) => {
                let b = &mut self.backends[i];
                let changed = b.retired
                    || b.config.kv_events != config.kv_events
                    || b.config.namespace != config.namespace
                    || b.config.block_size != config.block_size;
                b.index_namespace = index_namespace(&config);
                b.config = config;
                b.retired = false;
                (i as EngineId, changed)
            }
            None => {
                self.backends.push(Backend::new(config));
                ((self.backends.len() - 1) as EngineId, true)
            }
        }
    }

    /// Takes backend `e` out of routing (its registration is gone); its id stays, for its
    /// metrics and a possible return.
    pub fn retire(&mut self, e: EngineId) {
        let b = &mut self.backends[e as usize];
        b.retired = true;
        b.healthy = false;
    }

    /// The backends, by engine id.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Backend `e`.
    pub fn get(&self, e: EngineId) -> &Backend {
        &self.backends[e as usize]
    }

    /// The backends that can take work of kind `need` for `model` at `now_ms`, leaving out
    /// `tried`.
    pub fn available(
        &self,
        model: &str,
        now_ms: u64,
        tried: &[EngineId],
        need: Need,
    ) -> Result<Vec<EngineId>, NoBackend> {
        self.available_where(|b| b.serves(model), now_ms, tried, need)
    }

    /// The backends `admits` lets in that can take work of kind `need` at `now_ms`, leaving out
    /// `tried` (a LoRA adapter's requests go only where the manager says it is Ready).
    pub fn available_where(
        &self,
        admits: impl Fn(&Backend) -> bool,
        now_ms: u64,
        tried: &[EngineId],
        need: Need,
    ) -> Result<Vec<EngineId>, NoBackend> {
        let serving: Vec<EngineId> = (0..self.backends.len() as EngineId)
            .filter(|&e| {
                let b = self.get(e);
                !b.retired && admits(b) && b.config.role.takes(need)
            })
            .collect();
        if serving.is_empty() {
            return Err(NoBackend::UnknownModel);
        }
        let up: Vec<EngineId> = serving
            .into_iter()
            .filter(|&e| self.get(e).up(now_ms) && !tried.contains(&e))
            .collect();
        if up.is_empty() {
            return Err(NoBackend::AllDown);
        }
        let room: Vec<EngineId> = up.into_iter().filter(|&e| self.get(e).has_room()).collect();
        if room.is_empty() {
            return Err(NoBackend::AllBusy);
        }
        Ok(room)
    }

    /// Whether requests are disaggregated: some backend takes only prefill or only decode work.
    pub fn disaggregated(&self) -> bool {
        self.backends
            .iter()
            .any(|b| !b.retired && b.config.role != Role::Both)
    }

    /// Backends up at `now_ms` that take work of kind `need`.
    pub fn up_for(&self, need: Need, now_ms: u64) -> usize {
        self.backends
            .iter()
            .filter(|b| b.up(now_ms) && b.config.role.takes(need))
            .count()
    }

    /// Whether any backend serves `model` (up or not).
    pub fn knows_model(&self, model: &str) -> bool {
        self.backends.iter().any(|b| b.serves(model))
    }

    /// Every model some healthy backend serves, sorted, once each.
    pub fn models(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .backends
            .iter()
            .filter(|b| b.healthy && !b.retired)
            .flat_map(|b| b.models.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The routing view of backend `e`.
    pub fn candidate(&self, e: EngineId) -> Candidate {
        let b = self.get(e);
        Candidate {
            in_flight: b.in_flight,
            pending_blocks: b.pending_blocks,
            engine_waiting: b.load.waiting,
            engine_running: b.load.running,
            kv_usage: b.load.kv_usage,
            ..Candidate::default()
        }
    }

    /// A probe of `e` passed; its load and models as read. Returns true if it came back up.
    pub fn probe_passed(&mut self, e: EngineId, load: EngineLoad, models: Vec<ModelCard>) -> bool {
        let b = &mut self.backends[e as usize];
        let was = b.healthy;
        b.healthy = true;
        b.failed_probes = 0;
        b.load = load;
        b.adapters = models
            .iter()
            .filter(|m| m.adapter)
            .map(|m| m.id.clone())
            .collect();
        b.models = models.into_iter().map(|m| m.id).collect();
        !was
    }

    /// Whether some backend lists `model` as a LoRA adapter.
    pub fn is_adapter(&self, model: &str) -> bool {
        self.backends
            .iter()
            .any(|b| b.adapters.iter().any(|a| a == model))
    }

    /// A probe of `e` failed; after `failures` in a row it is down. Returns true if it went down now.
    pub fn probe_failed(&mut self, e: EngineId, failures: u32) -> bool {
        let b = &mut self.backends[e as usize];
        b.failed_probes = b.failed_probes.saturating_add(1);
        if b.healthy && b.failed_probes >= failures {
            b.healthy = false;
            return true;
        }
        false
    }

    /// A request to `e` failed (connect error, 5xx): it sits out until `until_ms`, and it is
    /// marked unhealthy until a probe passes again when the failure was a connection's.
    pub fn eject(&mut self, e: EngineId, until_ms: u64, connection_failed: bool) {
        let b = &mut self.backends[e as usize];
        b.ejected_until_ms = Some(b.ejected_until_ms.map_or(until_ms, |t| t.max(until_ms)));
        if connection_failed {
            b.healthy = false;
        }
    }

    /// A request of `blocks` prompt blocks to compute was sent to `e`.
    pub fn dispatched(&mut self, e: EngineId, blocks: u64) {
        let b = &mut self.backends[e as usize];
        b.in_flight += 1;
        b.pending_blocks += blocks;
    }

    /// The first response byte of a request of `blocks` came from `e` (its prefill is done).
    pub fn first_byte(&mut self, e: EngineId, blocks: u64) {
        let b = &mut self.backends[e as usize];
        b.pending_blocks = b.pending_blocks.saturating_sub(blocks);
    }

    /// A request to `e` ended (answered, failed, or cancelled); `blocks` unless `first_byte` took them.
    pub fn finished(&mut self, e: EngineId, blocks: u64) {
        let b = &mut self.backends[e as usize];
        b.in_flight = b.in_flight.saturating_sub(1);
        b.pending_blocks = b.pending_blocks.saturating_sub(blocks);
    }
}

/// One entry of a backend's /v1/models.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCard {
    pub id: String,
    /// A LoRA adapter (it names a parent model).
    pub adapter: bool,
}

impl From<&str> for ModelCard {
    /// A base model.
    fn from(id: &str) -> Self {
        Self {
            id: id.to_string(),
            adapter: false,
        }
    }
}

/// The namespace a LoRA adapter's blocks are keyed in in the index: the backend's own, with the
/// adapter folded in (its KV differs from the base model's for the same tokens).
pub fn adapter_namespace(base: NamespaceId, adapter: &str) -> NamespaceId {
    let mut ns = Namespace::new("kvcache-gateway/adapter-index", "", 0);
    ns.layout = format!("{:032x}", u128::from_be_bytes(*base.as_bytes()));
    ns.lora = Some(adapter.to_string());
    ns.id()
}

/// The namespace a backend's blocks are keyed in in the index (see [`Backend::index_namespace`]).
fn index_namespace(config: &BackendConfig) -> NamespaceId {
    config.namespace.unwrap_or_else(|| {
        Namespace::new("kvcache-gateway/local-index", "", config.block_size as u32).id()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(n: usize) -> Pool {
        let mut toml = String::new();
        for i in 0..n {
            toml.push_str(&format!(
                "[[backend]]\nurl = \"http://127.0.0.1:{}\"\nmax_concurrency = 2\n",
                9000 + i
            ));
        }
        Pool::new(Config::from_toml(&toml).unwrap().backends)
    }

    #[test]
    fn a_backend_takes_requests_only_after_a_probe_passes() {
        let mut p = pool(2);
        assert_eq!(
            p.available("m", 0, &[], Need::Any),
            Err(NoBackend::UnknownModel)
        );
        p.probe_passed(0, EngineLoad::default(), vec!["m".into()]);
        assert_eq!(p.available("m", 0, &[], Need::Any), Ok(vec![0]));
        assert_eq!(p.models(), ["m"]);
        assert!(!p.knows_model("other"));
    }

    #[test]
    fn ejection_sits_a_backend_out_until_its_time_and_a_passing_probe() {
        let mut p = pool(2);
        for e in 0..2 {
            p.probe_passed(e, EngineLoad::default(), vec!["m".into()]);
        }
        p.eject(0, 5_000, true);
        assert_eq!(p.available("m", 1_000, &[], Need::Any), Ok(vec![1]));
        assert_eq!(
            p.available("m", 6_000, &[], Need::Any),
            Ok(vec![1]),
            "no probe passed yet"
        );
        assert!(p.probe_passed(0, EngineLoad::default(), vec!["m".into()]));
        assert_eq!(p.available("m", 6_000, &[], Need::Any), Ok(vec![0, 1]));
        assert_eq!(
            p.available("m", 6_000, &[1], Need::Any),
            Ok(vec![0]),
            "tried ones are left out"
        );
    }

    #[test]
    fn probes_mark_down_after_the_configured_failures_in_a_row() {
        let mut p = pool(1);
        p.probe_passed(0, EngineLoad::default(), vec!["m".into()]);
        assert!(!p.probe_failed(0, 2));
        assert!(p.probe_failed(0, 2));
        assert_eq!(p.available("m", 0, &[], Need::Any), Err(NoBackend::AllDown));
    }

    #[test]
    fn discovered_backends_join_leave_and_come_back_under_one_id() {
        let mut p = pool(1);
        let mut extra = p.get(0).config.clone();
        extra.url = "http://127.0.0.1:9100".into();
        let (e, fresh) = p.upsert(extra.clone());
        assert_eq!((e, fresh), (1, true));
        p.probe_passed(e, EngineLoad::default(), vec!["m".into()]);
        assert_eq!(p.available("m", 0, &[], Need::Any), Ok(vec![1]));
        p.retire(e);
        assert_eq!(
            p.available("m", 0, &[], Need::Any),
            Err(NoBackend::UnknownModel)
        );
        assert!(p.models().is_empty());
        assert_eq!(
            p.upsert(extra.clone()),
            (1, true),
            "a return restarts its feed"
        );
        assert_eq!(
            p.upsert(extra),
            (1, false),
            "an unchanged record changes nothing"
        );
    }

    #[test]
    fn concurrency_limits_and_load_accounting() {
        let mut p = pool(1);
        p.probe_passed(0, EngineLoad::default(), vec!["m".into()]);
        p.dispatched(0, 5);
        p.dispatched(0, 3);
        assert_eq!(p.available("m", 0, &[], Need::Any), Err(NoBackend::AllBusy));
        assert_eq!(p.candidate(0).pending_blocks, 8);
        p.first_byte(0, 5);
        p.finished(0, 0);
        p.finished(0, 3);
        let c = p.candidate(0);
        assert_eq!((c.in_flight, c.pending_blocks), (0, 0));
    }

    #[test]
    fn prefill_and_decode_work_go_only_to_backends_of_that_role() {
        let toml = "[[backend]]\nurl = \"http://127.0.0.1:9000\"\nrole = \"prefill\"\n\
                    [[backend]]\nurl = \"http://127.0.0.1:9001\"\nrole = \"decode\"\n\
                    [[backend]]\nurl = \"http://127.0.0.1:9002\"\n";
        let mut p = Pool::new(Config::from_toml(toml).unwrap().backends);
        for e in 0..3 {
            p.probe_passed(e, EngineLoad::default(), vec!["m".into()]);
        }
        assert!(p.disaggregated());
        assert_eq!(p.available("m", 0, &[], Need::Prefill), Ok(vec![0, 2]));
        assert_eq!(p.available("m", 0, &[], Need::Decode), Ok(vec![1, 2]));
        assert_eq!(p.available("m", 0, &[], Need::Any), Ok(vec![0, 1, 2]));
        p.probe_failed(0, 1);
        assert_eq!(p.up_for(Need::Prefill, 0), 1);
        assert_eq!(p.up_for(Need::Decode, 0), 2);
        let both = Pool::new(
            Config::from_toml("[[backend]]\nurl = \"http://127.0.0.1:9000\"\n")
                .unwrap()
                .backends,
        );
        assert!(!both.disaggregated());
    }
}
