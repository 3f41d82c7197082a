//! The adapters the manager knows: each one's declaration, where it comes from (the config
//! file or the HTTP API), and its state on every instance it is placed on. Pure: the
//! reconcile step (`reconcile.rs`) moves the per-instance states; this file declares,
//! deletes and reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{AdapterSpec, Replicas};

/// Where a declaration comes from: the file's adapters follow the file, the API's follow
/// the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    File,
    Api,
}

/// An adapter's phase, over all its instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Not placed: no live instance of its base model has room (`error` says which).
    Pending,
    /// A load is under way on some instance (the instances already Ready take requests).
    Loading,
    /// Loaded and verified in /v1/models on its instances.
    Ready,
    /// The engines refused to load it, `retries` times; `error` has their last answer. It
    /// is not retried until it is declared again.
    Failed,
    /// Deleted: being drained and unloaded; it disappears when no instance holds it.
    Unloading,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Self::Pending,
        Self::Loading,
        Self::Ready,
        Self::Failed,
        Self::Unloading,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Loading => "Loading",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
            Self::Unloading => "Unloading",
        }
    }
}

/// An adapter's state on one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    /// To be loaded (or being loaded); not routable.
    Loading,
    /// Listed by the instance's /v1/models: routable.
    Ready,
    /// Loaded but leaving (deleted, moved, scaled down): not routable; unloaded once no request
    /// for it runs there and the drain grace has passed.
    Draining,
}

/// One (adapter, instance) pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub state: SlotState,
    /// Refused loads here in a row.
    pub attempts: u32,
    /// No operation before this time (backoff, verification, drain grace).
    pub not_before_ms: u64,
    pub error: Option<String>,
}

impl Slot {
    pub fn new(state: SlotState, now_ms: u64) -> Self {
        Self {
            state,
            attempts: 0,
            not_before_ms: now_ms,
            error: None,
        }
    }
}

/// One adapter.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub spec: AdapterSpec,
    pub origin: Origin,
    /// By instance URL.
    pub slots: BTreeMap<String, Slot>,
    /// Refused loads, all instances together, since it was (re)declared.
    pub retries: u32,
    /// The last refusal, or why it is not placed.
    pub error: Option<String>,
    pub failed: bool,
    pub deleting: bool,
}

impl Adapter {
    fn new(spec: AdapterSpec, origin: Origin) -> Self {
        Self {
            spec,
            origin,
            slots: BTreeMap::new(),
            retries: 0,
            error: None,
            failed: false,
            deleting: false,
        }
    }

    /// Its phase (see [`Phase`]).
    pub fn phase(&self) -> Phase {
        let any = |s: SlotState| self.slots.values().any(|slot| slot.state == s);
        if self.deleting {
            Phase::Unloading
        } else if self.failed {
            Phase::Failed
        } else if any(SlotState::Loading) || (!any(SlotState::Ready) && any(SlotState::Draining)) {
            Phase::Loading
        } else if any(SlotState::Ready) {
            Phase::Ready
        } else {
            Phase::Pending
        }
    }

    fn view(&self) -> AdapterView {
        AdapterView {
            name: self.spec.name.clone(),
            base_model: self.spec.base_model.clone(),
            path: self.spec.path.clone(),
            replicas: self.spec.replicas,
            origin: self.origin,
            phase: self.phase(),
            instances: self
                .slots
                .iter()
                .map(|(url, s)| InstanceView {
                    url: url.clone(),
                    state: s.state,
                    error: s.error.clone(),
                })
                .collect(),
            error: self.error.clone(),
            retries: self.retries,
        }
    }
}

/// An adapter as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterView {
    pub name: String,
    pub base_model: String,
    pub path: String,
    pub replicas: Replicas,
    pub origin: Origin,
    pub phase: Phase,
    /// Every instance it is placed on, with its state there (`Ready` ones take requests).
    pub instances: Vec<InstanceView>,
    pub error: Option<String>,
    pub retries: u32,
}

/// An adapter's state on one instance, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub url: String,
    pub state: SlotState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a declaration or deletion is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("adapter `{0}` is already declared with other settings; DELETE it first")]
    Conflict(String),
    #[error("adapter `{0}` is declared in the config file; remove it there")]
    InFile(String),
    #[error("no adapter `{0}`")]
    NotFound(String),
    #[error("adapter `{0}` is being unloaded; declare it again once it is gone")]
    Unloading(String),
}

/// What a declaration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    Created,
    /// The same declaration was there; a Failed adapter is retried.
    Unchanged,
    /// The file changed it.
    Changed,
}

/// Every adapter, by name.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub(crate) adapters: BTreeMap<String, Adapter>,
}

impl Registry {
    /// Declares `spec` (checked already) from the API: new, or the same again (which retries
    /// a Failed adapter). A different declaration under the same name is refused.
    pub fn declare(&mut self, spec: AdapterSpec) -> Result<Declared, RegistryError> {
        match self.adapters.get_mut(&spec.name) {
            None => {
                self.adapters
                    .insert(spec.name.clone(), Adapter::new(spec, Origin::Api));
                Ok(Declared::Created)
            }
            Some(a) if a.deleting => Err(RegistryError::Unloading(spec.name)),
            Some(a) if a.spec == spec => {
                reset_failure(a);
                Ok(Declared::Unchanged)
            }
            Some(a) if a.origin == Origin::File => Err(RegistryError::InFile(spec.name)),
            Some(_) => Err(RegistryError::Conflict(spec.name)),
        }
    }

    /// Deletes an API adapter: it is drained and unloaded everywhere, then forgotten.
    pub fn delete(&mut self, name: &str) -> Result<(), RegistryError> {
        let a = self
            .adapters
            .get_mut(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        if a.origin == Origin::File {
            return Err(RegistryError::InFile(name.to_string()));
        }
        a.deleting = true;
        Ok(())
    }

    /// Makes the file's adapters exactly `specs`: new ones are added, changed ones take the new
    /// settings (a new path or base model unloads the old adapter first), missing ones are
    /// deleted. An API adapter of the same name becomes the file's. Returns what changed, by name.
    pub fn sync_file(&mut self, specs: &[AdapterSpec]) -> Vec<(String, Declared)> {
        let mut changes = Vec::new();
        for spec in specs {
            match self.adapters.get_mut(&spec.name) {
                None => {
                    self.adapters
                        .insert(spec.name.clone(), Adapter::new(spec.clone(), Origin::File));
                    changes.push((spec.name.clone(), Declared::Created));
                }
                Some(a) => {
                    let same = a.spec == *spec && a.origin == Origin::File && !a.deleting;
                    if same {
                        continue;
                    }
                    if a.spec.path != spec.path || a.spec.base_model != spec.base_model {
                        // The engines hold the old files under this name: unload, then load.
                        for slot in a.slots.values_mut() {
                            slot.state = SlotState::Draining;
                        }
                    }
                    a.spec = spec.clone();
                    a.origin = Origin::File;
                    a.deleting = false;
                    reset_failure(a);
                    changes.push((spec.name.clone(), Declared::Changed));
                }
            }
        }
        for a in self.adapters.values_mut() {
            if a.origin == Origin::File
                && !a.deleting
                && !specs.iter().any(|s| s.name == a.spec.name)
            {
                a.deleting = true;
                changes.push((a.spec.name.clone(), Declared::Changed));
            }
        }
        changes
    }

    /// Marks adapter `name` Failed for a reason found before any load (its files).
    pub fn fail(&mut self, name: &str, why: String) {
        if let Some(a) = self.adapters.get_mut(name) {
            a.failed = true;
            a.error = Some(why);
        }
    }

    /// Every adapter, by name.
    pub fn view(&self) -> Vec<AdapterView> {
        self.adapters.values().map(Adapter::view).collect()
    }

    /// One adapter.
    pub fn get(&self, name: &str) -> Option<AdapterView> {
        self.adapters.get(name).map(Adapter::view)
    }

    /// How many adapters are in each phase.
    pub fn phases(&self) -> BTreeMap<&'static str, usize> {
        let mut out: BTreeMap<&'static str, usize> =
            Phase::ALL.iter().map(|p| (p.name(), 0)).collect();
        for a in self.adapters.values() {
            *out.entry(a.phase().name()).or_default() += 1;
        }
        out
    }

    /// Whether the manager manages adapter `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.adapters.contains_key(name)
    }
}

fn reset_failure(a: &mut Adapter) {
    a.failed = false;
    a.retries = 0;
    a.error = None;
    for s in a.slots.values_mut() {
        s.attempts = 0;
        s.error = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, path: &str) -> AdapterSpec {
        AdapterSpec {
            name: name.into(),
            base_model: "tiny".into(),
            path: path.into(),
            replicas: Replicas::Count(1),
        }
    }

    #[test]
    fn declaring_the_same_adapter_again_is_a_no_op_and_another_one_under_its_name_is_refused() {
        let mut r = Registry::default();
        assert_eq!(r.declare(spec("a", "/x")), Ok(Declared::Created));
        assert_eq!(r.declare(spec("a", "/x")), Ok(Declared::Unchanged));
        assert_eq!(
            r.declare(spec("a", "/y")),
            Err(RegistryError::Conflict("a".into()))
        );
        assert_eq!(r.get("a").unwrap().phase, Phase::Pending);
    }

    #[test]
    fn file_adapters_follow_the_file_and_cannot_be_deleted_through_the_api() {
        let mut r = Registry::default();
        r.sync_file(&[spec("f", "/x")]);
        assert_eq!(r.delete("f"), Err(RegistryError::InFile("f".into())));
        assert_eq!(
            r.declare(spec("f", "/y")),
            Err(RegistryError::InFile("f".into()))
        );
        assert_eq!(r.sync_file(&[]), vec![("f".to_string(), Declared::Changed)]);
        assert_eq!(r.get("f").unwrap().phase, Phase::Unloading);
        assert_eq!(
            r.delete("nope"),
            Err(RegistryError::NotFound("nope".into()))
        );
    }

    #[test]
    fn a_new_path_in_the_file_unloads_the_old_files_before_loading_the_new() {
        let mut r = Registry::default();
        r.sync_file(&[spec("f", "/x")]);
        let a = r.adapters.get_mut("f").unwrap();
        a.slots
            .insert("http://i".into(), Slot::new(SlotState::Ready, 0));
        r.sync_file(&[spec("f", "/y")]);
        let v = r.get("f").unwrap();
        assert_eq!(v.path, "/y");
        assert_eq!(v.instances[0].state, SlotState::Draining);
        assert_eq!(v.phase, Phase::Loading);
    }

    #[test]
    fn declaring_a_failed_adapter_again_retries_it() {
        let mut r = Registry::default();
        r.declare(spec("a", "/x")).unwrap();
        let a = r.adapters.get_mut("a").unwrap();
        (a.failed, a.retries, a.error) = (true, 4, Some("bad".into()));
        assert_eq!(r.get("a").unwrap().phase, Phase::Failed);
        r.declare(spec("a", "/x")).unwrap();
        let v = r.get("a").unwrap();
        assert_eq!((v.phase, v.retries, v.error), (Phase::Pending, 0, None));
    }

    #[test]
    fn the_view_serializes_as_the_api_documents() {
        let mut r = Registry::default();
        r.declare(spec("a", "/x")).unwrap();
        r.adapters
            .get_mut("a")
            .unwrap()
            .slots
            .insert("http://i".into(), Slot::new(SlotState::Ready, 0));
        let v = serde_json::to_value(r.view()).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{
                "name": "a", "base_model": "tiny", "path": "/x", "replicas": 1, "origin": "api",
                "phase": "Ready", "instances": [{"url": "http://i", "state": "Ready"}],
                "error": null, "retries": 0
            }])
        );
        assert_eq!(r.phases()["Ready"], 1);
    }
}
