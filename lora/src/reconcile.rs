//! The reconcile step: from what every instance says now (its /v1/models and /metrics), bring
//! each adapter's per-instance states up to date, place it, and say which loads and unloads
//! to make. Pure: the shell (`manager.rs`) observes, calls [`Registry::reconcile`], runs the
//! actions and reports each outcome back ([`Registry::loaded`], [`Registry::unloaded`]).
//!
//! Invariants: a slot is Ready only while its instance lists the adapter; an adapter is
//! unloaded only from an instance that runs no request for it, after the drain grace (so a
//! gateway reading the manager has stopped sending there); a load the engine refuses counts
//! towards `max_attempts`, one that could not reach the engine does not.

use std::collections::BTreeSet;

use crate::placement::{self, Node, Policy, Want};
use crate::registry::{Registry, Slot, SlotState};

/// An instance as the shell last saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub url: String,
    /// Its /v1/models answered.
    pub up: bool,
    /// When it stopped answering (None while up).
    pub down_since_ms: Option<u64>,
    /// Base models it serves (models without a parent).
    pub base_models: Vec<String>,
    /// Adapters it lists (models with a parent).
    pub adapters: BTreeSet<String>,
    /// Adapters with requests running or waiting there (from `vllm:lora_requests_info`);
    /// empty when the engine runs no request at all.
    pub busy: BTreeSet<String>,
    /// How many adapters it may hold.
    pub capacity: usize,
}

/// The step's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub policy: Policy,
    /// Refused loads before an adapter is Failed.
    pub max_attempts: u32,
    /// Backoff after the first refusal; doubles each time, up to `backoff_max_ms`.
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// How long an adapter leaving an instance stays loaded (not routable) before it may be unloaded.
    pub drain_grace_ms: u64,
    /// How long an instance may be down before its adapters are placed elsewhere.
    pub down_grace_ms: u64,
    /// After a load the engine accepted, how long to wait for /v1/models to list it before loading again.
    pub verify_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            max_attempts: 4,
            backoff_ms: 1_000,
            backoff_max_ms: 30_000,
            drain_grace_ms: 3_000,
            down_grace_ms: 60_000,
            verify_ms: 5_000,
        }
    }
}

/// An operation on an engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Load {
        adapter: String,
        url: String,
        path: String,
    },
    Unload {
        adapter: String,
        url: String,
    },
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The engine was not reached, or answered with a server error: retried, not counted.
    Unreachable(String),
    /// The engine answered no (its message).
    Refused(String),
}

/// Something the step did that an operator wants in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub adapter: String,
    pub url: Option<String>,
    pub what: String,
    /// An instance stopped serving an adapter it held (down, or restarted without it).
    pub lost: bool,
}

fn note(adapter: &str, url: Option<&str>, what: String) -> Note {
    Note {
        adapter: adapter.to_string(),
        url: url.map(str::to_string),
        what,
        lost: false,
    }
}

fn lost(adapter: &str, url: &str, what: &str) -> Note {
    Note {
        lost: true,
        ..note(adapter, Some(url), what.to_string())
    }
}

/// The step's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    pub actions: Vec<Action>,
    pub notes: Vec<Note>,
}

impl Registry {
    /// One reconcile step at `now_ms` over `instances` (every instance the manager manages).
    pub fn reconcile(&mut self, instances: &[Observed], s: &Settings, now_ms: u64) -> Step {
        let mut step = Step::default();
        let find = |url: &str| instances.iter().find(|i| i.url == url);
        // 1. Per-instance states from what each instance lists.
        for (name, a) in self.adapters.iter_mut() {
            a.slots.retain(|url, slot| {
                let Some(inst) = find(url) else {
                    step.notes.push(note(
                        name,
                        Some(url),
                        "instance no longer managed: forgotten".into(),
                    ));
                    return false;
                };
                if !inst.up {
                    if slot.state == SlotState::Ready {
                        slot.state = SlotState::Loading;
                        step.notes.push(lost(
                            name,
                            url,
                            "instance down: not routable until it lists the adapter again",
                        ));
                    }
                    return true;
                }
                let listed = inst.adapters.contains(name);
                match (slot.state, listed) {
                    (SlotState::Loading, true) => {
                        *slot = Slot::new(SlotState::Ready, now_ms);
                        step.notes.push(note(
                            name,
                            Some(url),
                            "Ready (listed in /v1/models)".into(),
                        ));
                    }
                    (SlotState::Ready, false) => {
                        *slot = Slot::new(SlotState::Loading, now_ms);
                        step.notes.push(lost(
                            name,
                            url,
                            "the instance no longer lists it (restarted?): loading it again",
                        ));
                    }
                    (SlotState::Draining, false) => return false,
                    _ => {}
                }
                true
            });
            if !a.deleting && !a.failed {
                for inst in instances
                    .iter()
                    .filter(|i| i.up && i.adapters.contains(name))
                {
                    if !a.slots.contains_key(&inst.url) {
                        a.slots
                            .insert(inst.url.clone(), Slot::new(SlotState::Ready, now_ms));
                        step.notes.push(note(
                            name,
                            Some(&inst.url),
                            "found loaded: adopted".into(),
                        ));
                    }
                }
            }
        }
        // 2. Placement, over instances up or down for less than the grace. A down instance
        // keeps the base models it last listed (the shell passes them along), so a restarting
        // instance keeps its placements.
        let nodes: Vec<Node> = instances
            .iter()
            .map(|i| Node {
                url: i.url.clone(),
                base_models: i.base_models.clone(),
                capacity: i.capacity,
                unmanaged: i.adapters.iter().filter(|n| !self.contains(n)).count()
                    + self
                        .adapters
                        .values()
                        .filter(|a| {
                            a.slots
                                .get(&i.url)
                                .is_some_and(|s| s.state == SlotState::Draining)
                        })
                        .count(),
                eligible: i.up
                    || i.down_since_ms
                        .is_some_and(|t| now_ms.saturating_sub(t) < s.down_grace_ms),
            })
            .collect();
        let wants: Vec<Want> = self
            .adapters
            .values()
            .filter(|a| !a.deleting && !a.failed)
            .map(|a| {
                let mut current: Vec<(u8, String)> = a
                    .slots
                    .iter()
                    .filter(|(_, s)| s.state != SlotState::Draining)
                    .map(|(url, s)| (u8::from(s.state != SlotState::Ready), url.clone()))
                    .collect();
                current.sort();
                Want {
                    name: a.spec.name.clone(),
                    base_model: a.spec.base_model.clone(),
                    replicas: a.spec.replicas,
                    current: current.into_iter().map(|(_, u)| u).collect(),
                }
            })
            .collect();
        let placed = placement::place(&wants, &nodes, s.policy);
        // 3. Slots follow the placement.
        for (name, a) in self.adapters.iter_mut() {
            let desired: &[String] = placed.get(name).map_or(&[], |p| p.urls.as_slice());
            if let Some(p) = placed.get(name)
                && a.retries == 0
            {
                a.error = p.short.clone();
            }
            for url in desired {
                if !a.slots.contains_key(url) {
                    a.slots
                        .insert(url.clone(), Slot::new(SlotState::Loading, now_ms));
                    step.notes
                        .push(note(name, Some(url), "placed: loading".into()));
                }
            }
            a.slots.retain(|url, slot| {
                if desired.contains(url) || slot.state == SlotState::Draining {
                    return true;
                }
                if slot.state == SlotState::Ready {
                    *slot = Slot::new(SlotState::Draining, now_ms + s.drain_grace_ms);
                    step.notes.push(note(
                        name,
                        Some(url),
                        "leaving this instance: draining".into(),
                    ));
                    return true;
                }
                false
            });
        }
        // 4. What to do now.
        for (name, a) in &self.adapters {
            for (url, slot) in &a.slots {
                let Some(inst) = find(url).filter(|i| i.up) else {
                    continue;
                };
                if now_ms < slot.not_before_ms {
                    continue;
                }
                match slot.state {
                    SlotState::Loading => step.actions.push(Action::Load {
                        adapter: name.clone(),
                        url: url.clone(),
                        path: a.spec.path.clone(),
                    }),
                    SlotState::Draining if !inst.busy.contains(name) => {
                        step.actions.push(Action::Unload {
                            adapter: name.clone(),
                            url: url.clone(),
                        })
                    }
                    _ => {}
                }
            }
        }
        // 5. Deleted adapters that no instance holds are gone.
        self.adapters.retain(|name, a| {
            let gone = a.deleting && a.slots.is_empty();
            if gone {
                step.notes
                    .push(note(name, None, "unloaded everywhere: removed".into()));
            }
            !gone
        });
        step
    }

    /// The outcome of loading `adapter` on `url` at `now_ms`.
    pub fn loaded(
        &mut self,
        adapter: &str,
        url: &str,
        outcome: Outcome,
        s: &Settings,
        now_ms: u64,
    ) -> Option<Note> {
        let a = self.adapters.get_mut(adapter)?;
        let slot = a.slots.get_mut(url)?;
        match outcome {
            // Verified by the next observation; until then, no second load.
            Outcome::Done => slot.not_before_ms = now_ms + s.verify_ms,
            Outcome::Unreachable(why) => {
                slot.not_before_ms = now_ms + s.backoff_ms;
                slot.error = Some(why);
            }
            Outcome::Refused(why) => {
                slot.attempts += 1;
                a.retries += 1;
                slot.error = Some(why.clone());
                a.error = Some(why.clone());
                if a.retries >= s.max_attempts {
                    a.failed = true;
                    return Some(note(
                        adapter,
                        Some(url),
                        format!("Failed after {} refused loads; last: {why}", a.retries),
                    ));
                }
                let shift = (slot.attempts - 1).min(20);
                slot.not_before_ms = now_ms + (s.backoff_ms << shift).min(s.backoff_max_ms);
                return Some(note(
                    adapter,
                    Some(url),
                    format!("load refused (attempt {}): {why}", a.retries),
                ));
            }
        }
        None
    }

    /// The outcome of unloading `adapter` from `url` at `now_ms`.
    pub fn unloaded(
        &mut self,
        adapter: &str,
        url: &str,
        outcome: Outcome,
        s: &Settings,
        now_ms: u64,
    ) {
        let Some(a) = self.adapters.get_mut(adapter) else {
            return;
        };
        match outcome {
            Outcome::Done => {
                a.slots.remove(url);
            }
            Outcome::Unreachable(why) | Outcome::Refused(why) => {
                if let Some(slot) = a.slots.get_mut(url) {
                    slot.not_before_ms = now_ms + s.backoff_ms;
                    slot.error = Some(why);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
