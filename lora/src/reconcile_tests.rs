//! The reconcile step on plain data: each test plays the shell (observe, step, act, report).

use std::collections::BTreeSet;

use super::*;
use crate::registry::Phase;
use crate::spec::{AdapterSpec, Replicas};

fn spec(name: &str) -> AdapterSpec {
    AdapterSpec {
        name: name.into(),
        base_model: "tiny".into(),
        path: format!("/adapters/{name}"),
        replicas: Replicas::Count(1),
    }
}

fn up(url: &str, adapters: &[&str]) -> Observed {
    Observed {
        url: url.into(),
        up: true,
        down_since_ms: None,
        base_models: vec!["tiny".into()],
        adapters: adapters.iter().map(|s| s.to_string()).collect(),
        busy: BTreeSet::new(),
        capacity: 4,
    }
}

fn loads(step: &Step) -> Vec<(String, String)> {
    step.actions
        .iter()
        .filter_map(|a| match a {
            Action::Load { adapter, url, .. } => Some((adapter.clone(), url.clone())),
            Action::Unload { .. } => None,
        })
        .collect()
}

fn unloads(step: &Step) -> Vec<(String, String)> {
    step.actions
        .iter()
        .filter_map(|a| match a {
            Action::Unload { adapter, url } => Some((adapter.clone(), url.clone())),
            Action::Load { .. } => None,
        })
        .collect()
}

fn pair(a: &str, u: &str) -> (String, String) {
    (a.to_string(), u.to_string())
}

fn ready_on(r: &Registry, name: &str) -> Vec<String> {
    r.get(name)
        .unwrap()
        .instances
        .into_iter()
        .filter(|i| i.state == SlotState::Ready)
        .map(|i| i.url)
        .collect()
}

#[test]
fn two_adapters_with_one_replica_each_land_on_different_instances_and_become_ready_when_listed() {
    let s = Settings::default();
    let mut r = Registry::default();
    r.declare(spec("a")).unwrap();
    r.declare(spec("b")).unwrap();
    let step = r.reconcile(&[up("i1", &[]), up("i2", &[])], &s, 0);
    assert_eq!(loads(&step), [pair("a", "i1"), pair("b", "i2")]);
    assert_eq!(r.get("a").unwrap().phase, Phase::Loading);
    assert_eq!(r.loaded("a", "i1", Outcome::Done, &s, 10), None);
    r.loaded("b", "i2", Outcome::Done, &s, 10);
    // Not listed yet: no second load before the verification time.
    let step = r.reconcile(&[up("i1", &[]), up("i2", &[])], &s, 20);
    assert!(step.actions.is_empty());
    let step = r.reconcile(&[up("i1", &["a"]), up("i2", &["b"])], &s, 30);
    assert!(step.actions.is_empty());
    assert_eq!(r.get("a").unwrap().phase, Phase::Ready);
    assert_eq!(ready_on(&r, "a"), ["i1"]);
    assert_eq!(ready_on(&r, "b"), ["i2"]);
}

#[test]
fn an_instance_that_restarted_without_its_adapters_gets_them_loaded_again() {
    let s = Settings::default();
    let mut r = Registry::default();
    r.declare(spec("a")).unwrap();
    r.reconcile(&[up("i1", &["a"])], &s, 0);
    assert_eq!(ready_on(&r, "a"), ["i1"]);
    // Killed: down, not routable, nothing to do while it is.
    let mut down = up("i1", &[]);
    (down.up, down.down_since_ms) = (false, Some(100));
    let step = r.reconcile(std::slice::from_ref(&down), &s, 100);
    assert!(step.actions.is_empty());
    assert_eq!(r.get("a").unwrap().phase, Phase::Loading);
    assert!(ready_on(&r, "a").is_empty());
    // Back, empty: loaded again, on the same instance.
    let step = r.reconcile(&[up("i1", &[])], &s, 5_000);
    assert_eq!(loads(&step), [pair("a", "i1")]);
    // Without a down phase in between (a restart faster than a probe), the loss is noted.
    r.reconcile(&[up("i1", &["a"])], &s, 6_000);
    let step = r.reconcile(&[up("i1", &[])], &s, 7_000);
    assert!(step.notes.iter().any(|n| n.lost));
    assert_eq!(loads(&step), [pair("a", "i1")]);
}

#[test]
fn refused_loads_back_off_then_end_failed_with_the_engines_error_and_others_are_unaffected() {
    let s = Settings::default();
    let mut r = Registry::default();
    r.declare(spec("bad")).unwrap();
    r.declare(spec("good")).unwrap();
    let insts = [up("i1", &[]), up("i2", &[])];
    let mut now = 0;
    let mut refused = 0;
    while refused < s.max_attempts {
        let step = r.reconcile(&insts, &s, now);
        for (adapter, url) in loads(&step) {
            let outcome = if adapter == "bad" {
                refused += 1;
                Outcome::Refused("Loading lora bad failed: no adapter_model.safetensors".into())
            } else {
                Outcome::Done
            };
            r.loaded(&adapter, &url, outcome, &s, now);
        }
        now += 500;
        assert!(now < 120_000, "bounded retries");
    }
    let bad = r.get("bad").unwrap();
    assert_eq!(bad.phase, Phase::Failed);
    assert_eq!(bad.retries, s.max_attempts);
    assert!(bad.error.unwrap().contains("no adapter_model.safetensors"));
    // The backoff spaced the attempts out: 1 s, 2 s, 4 s.
    assert!(now >= 7_000, "{now}");
    // No more loads for it, ever; the other one goes on.
    let good_url = r.get("good").unwrap().instances[0].url.clone();
    let listing: Vec<Observed> = insts
        .iter()
        .map(|i| {
            if i.url == good_url {
                up(&i.url, &["good"])
            } else {
                i.clone()
            }
        })
        .collect();
    let step = r.reconcile(&listing, &s, now + 60_000);
    assert!(loads(&step).is_empty());
    assert_eq!(r.get("good").unwrap().phase, Phase::Ready);
}

#[test]
fn an_unreachable_engine_does_not_count_as_a_refusal() {
    let s = Settings::default();
    let mut r = Registry::default();
    r.declare(spec("a")).unwrap();
    for t in 0..10 {
        let step = r.reconcile(&[up("i1", &[])], &s, t * 2_000);
        for (a, u) in loads(&step) {
            r.loaded(
                &a,
                &u,
                Outcome::Unreachable("connection refused".into()),
                &s,
                t * 2_000,
            );
        }
    }
    let a = r.get("a").unwrap();
    assert_eq!((a.phase, a.retries), (Phase::Loading, 0));
}

#[test]
fn a_deleted_adapter_drains_then_unloads_only_when_no_request_runs_and_then_disappears() {
    let s = Settings::default();
    let mut r = Registry::default();
    r.declare(spec("a")).unwrap();
    r.reconcile(&[up("i1", &["a"])], &s, 0);
    r.delete("a").unwrap();
    let step = r.reconcile(&[up("i1", &["a"])], &s, 1_000);
    assert!(step.actions.is_empty(), "within the drain grace");
    let v = r.get("a").unwrap();
    assert_eq!(
        (v.phase, v.instances[0].state),
        (Phase::Unloading, SlotState::Draining)
    );
    let mut busy = up("i1", &["a"]);
    busy.busy.insert("a".into());
    let step = r.reconcile(&[busy], &s, 1_000 + s.drain_grace_ms);
    assert!(step.actions.is_empty(), "a request for it still runs there");
    let step = r.reconcile(&[up("i1", &["a"])], &s, 2_000 + s.drain_grace_ms);
    assert_eq!(unloads(&step), [pair("a", "i1")]);
    r.unloaded("a", "i1", Outcome::Done, &s, 2_000 + s.drain_grace_ms);
    r.reconcile(&[up("i1", &[])], &s, 3_000 + s.drain_grace_ms);
    assert!(r.get("a").is_none());
}

#[test]
fn an_instance_down_past_its_grace_hands_its_adapters_to_another() {
    let s = Settings::default();
    let mut r = Registry::default();
    r.declare(spec("a")).unwrap();
    r.reconcile(&[up("i1", &["a"]), up("i2", &["x"])], &s, 0);
    let mut down = up("i1", &[]);
    (down.up, down.down_since_ms) = (false, Some(1_000));
    let step = r.reconcile(&[down.clone(), up("i2", &["x"])], &s, 2_000);
    assert!(
        loads(&step).is_empty(),
        "within the grace it waits for the instance"
    );
    let step = r.reconcile(&[down, up("i2", &["x"])], &s, 1_000 + s.down_grace_ms);
    assert_eq!(loads(&step), [pair("a", "i2")]);
    assert_eq!(r.get("a").unwrap().instances.len(), 1);
}

#[test]
fn adapters_already_loaded_are_adopted_without_a_load_and_extra_replicas_drain() {
    let s = Settings::default();
    let mut r = Registry::default();
    r.declare(spec("a")).unwrap();
    let step = r.reconcile(&[up("i1", &["a"]), up("i2", &["a"])], &s, 0);
    assert!(loads(&step).is_empty());
    let v = r.get("a").unwrap();
    let states: Vec<SlotState> = v.instances.iter().map(|i| i.state).collect();
    assert_eq!(states, [SlotState::Ready, SlotState::Draining]);
    assert_eq!(v.phase, Phase::Ready);
}

#[test]
fn an_adapter_without_an_instance_of_its_base_model_is_pending_and_says_why() {
    let s = Settings::default();
    let mut r = Registry::default();
    let mut other = spec("a");
    other.base_model = "big".into();
    r.declare(other).unwrap();
    let step = r.reconcile(&[up("i1", &[])], &s, 0);
    assert!(step.actions.is_empty());
    let v = r.get("a").unwrap();
    assert_eq!(v.phase, Phase::Pending);
    assert!(v.error.unwrap().contains("`big`"));
}
