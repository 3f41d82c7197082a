//! Which instances should hold which adapter: a pure function over a snapshot (no I/O, no
//! clock), so every policy is tested on plain data.
//!
//! Placements are sticky: an adapter stays where it is loaded while that instance serves its
//! base model and is not going away, so a reconcile never moves adapters for balance alone.
//! New replicas go where the policy says, within each instance's `capacity` (its max_loras).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::spec::Replicas;

/// How new replicas are placed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// On the instance holding the fewest adapters: spreads adapters, so each instance's
    /// adapter slots stay free for the requests that use them.
    #[default]
    LeastLoaded,
    /// On the fullest instance that still has room: keeps other instances free of adapters
    /// (for large adapters, or to scale in the emptiest).
    BinPack,
}

impl Policy {
    /// The name in config and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::LeastLoaded => "least-loaded",
            Self::BinPack => "bin-pack",
        }
    }
}

/// An instance as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub url: String,
    /// The base models it serves.
    pub base_models: Vec<String>,
    /// How many adapters it may hold.
    pub capacity: usize,
    /// Adapters it holds that this manager does not manage (they take room too).
    pub unmanaged: usize,
    /// Up and staying: takes new adapters and keeps the ones it has. False for an instance
    /// that is going away (removed, or down past its grace): its adapters move elsewhere.
    pub eligible: bool,
}

/// An adapter's wish.
#[derive(Clone, Debug, PartialEq)]
pub struct Want {
    pub name: String,
    pub base_model: String,
    pub replicas: Replicas,
    /// Where it is now (loaded or loading), most useful first: kept in this order when
    /// there are more than `replicas`.
    pub current: Vec<String>,
}

/// Where an adapter should be, and why it has fewer replicas than asked when it does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub urls: Vec<String>,
    pub short: Option<String>,
}

/// The placement of every `wants` (keyed by name) over `nodes` under `policy`.
pub fn place(wants: &[Want], nodes: &[Node], policy: Policy) -> BTreeMap<String, Placement> {
    let mut load: BTreeMap<&str, usize> = nodes
        .iter()
        .map(|n| (n.url.as_str(), n.unmanaged))
        .collect();
    let serves = |n: &Node, base: &str| n.eligible && n.base_models.iter().any(|m| m == base);
    let mut out: BTreeMap<String, Placement> = BTreeMap::new();
    let mut order: Vec<&Want> = wants.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    // Pass 1: keep what is placed and still valid, up to the count wanted.
    for w in &order {
        let wanted = match w.replicas {
            Replicas::Count(n) => n as usize,
            Replicas::All => usize::MAX,
        };
        let mut kept: Vec<String> = Vec::new();
        for url in &w.current {
            let valid = nodes
                .iter()
                .any(|n| &n.url == url && serves(n, &w.base_model));
            if valid && kept.len() < wanted && !kept.contains(url) {
                kept.push(url.clone());
                *load
                    .get_mut(url.as_str())
                    .expect("valid nodes are in the load map") += 1;
            }
        }
        out.insert(
            w.name.clone(),
            Placement {
                urls: kept,
                short: None,
            },
        );
    }
    // Pass 2: new replicas, one at a time per adapter in name order, by the policy.
    for w in &order {
        let placement = out
            .get_mut(&w.name)
            .expect("every want was placed in pass 1");
        let wanted = match w.replicas {
            Replicas::Count(n) => n as usize,
            Replicas::All => nodes.iter().filter(|n| serves(n, &w.base_model)).count(),
        };
        while placement.urls.len() < wanted {
            let room = nodes.iter().filter(|n| {
                serves(n, &w.base_model)
                    && !placement.urls.contains(&n.url)
                    && load[n.url.as_str()] < n.capacity
            });
            let best = match policy {
                Policy::LeastLoaded => room.min_by(|a, b| {
                    load[a.url.as_str()]
                        .cmp(&load[b.url.as_str()])
                        .then(a.url.cmp(&b.url))
                }),
                Policy::BinPack => room.min_by(|a, b| {
                    load[b.url.as_str()]
                        .cmp(&load[a.url.as_str()])
                        .then(a.url.cmp(&b.url))
                }),
            };
            let Some(node) = best else { break };
            *load
                .get_mut(node.url.as_str())
                .expect("nodes are in the load map") += 1;
            placement.urls.push(node.url.clone());
        }
        if placement.urls.len() < wanted || wanted == 0 {
            let any = nodes.iter().any(|n| serves(n, &w.base_model));
            placement.short = Some(if any {
                format!(
                    "{} of {} replicas placed: every instance serving `{}` holds max_loras adapters",
                    placement.urls.len(),
                    wanted,
                    w.base_model
                )
            } else {
                format!("no live instance serves the base model `{}`", w.base_model)
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(url: &str, capacity: usize) -> Node {
        Node {
            url: url.into(),
            base_models: vec!["tiny".into()],
            capacity,
            unmanaged: 0,
            eligible: true,
        }
    }

    fn want(name: &str, replicas: Replicas, current: &[&str]) -> Want {
        Want {
            name: name.into(),
            base_model: "tiny".into(),
            replicas,
            current: current.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn urls(p: &BTreeMap<String, Placement>, name: &str) -> Vec<String> {
        p[name].urls.clone()
    }

    #[test]
    fn least_loaded_spreads_one_replica_adapters_over_the_instances() {
        let nodes = [node("a", 4), node("b", 4)];
        let wants = [
            want("x", Replicas::Count(1), &[]),
            want("y", Replicas::Count(1), &[]),
        ];
        let p = place(&wants, &nodes, Policy::LeastLoaded);
        assert_eq!(urls(&p, "x"), ["a"]);
        assert_eq!(urls(&p, "y"), ["b"]);
        assert!(p.values().all(|p| p.short.is_none()));
    }

    #[test]
    fn bin_pack_fills_one_instance_before_the_next() {
        let nodes = [node("a", 2), node("b", 2)];
        let wants = [
            want("x", Replicas::Count(1), &[]),
            want("y", Replicas::Count(1), &[]),
            want("z", Replicas::Count(1), &[]),
        ];
        let p = place(&wants, &nodes, Policy::BinPack);
        assert_eq!(
            (urls(&p, "x"), urls(&p, "y"), urls(&p, "z")),
            (
                vec!["a".to_string()],
                vec!["a".to_string()],
                vec!["b".to_string()]
            )
        );
    }

    #[test]
    fn placements_stay_where_they_are_even_when_another_instance_is_emptier() {
        let nodes = [node("a", 4), node("b", 4)];
        let wants = [
            want("x", Replicas::Count(1), &["a"]),
            want("y", Replicas::Count(1), &["a"]),
        ];
        let p = place(&wants, &nodes, Policy::LeastLoaded);
        assert_eq!(
            (urls(&p, "x"), urls(&p, "y")),
            (vec!["a".to_string()], vec!["a".to_string()])
        );
    }

    #[test]
    fn max_loras_is_honoured_and_the_shortfall_says_why() {
        let mut a = node("a", 1);
        a.unmanaged = 1;
        let nodes = [a, node("b", 1)];
        let wants = [
            want("x", Replicas::Count(1), &[]),
            want("y", Replicas::Count(2), &[]),
        ];
        let p = place(&wants, &nodes, Policy::LeastLoaded);
        assert_eq!(urls(&p, "x"), ["b"]);
        assert!(urls(&p, "y").is_empty());
        let why = p["y"].short.as_deref().unwrap();
        assert!(why.contains("0 of 2") && why.contains("max_loras"), "{why}");
    }

    #[test]
    fn an_instance_going_away_hands_its_adapters_to_one_that_stays() {
        let mut a = node("a", 4);
        a.eligible = false;
        let nodes = [a, node("b", 4), node("c", 4)];
        let wants = [
            want("x", Replicas::Count(1), &["a"]),
            want("y", Replicas::Count(2), &["a", "c"]),
        ];
        let p = place(&wants, &nodes, Policy::LeastLoaded);
        assert_eq!(urls(&p, "x"), ["b"]);
        assert_eq!(urls(&p, "y"), ["c", "b"]);
    }

    #[test]
    fn all_means_every_instance_of_the_base_model_and_only_those() {
        let mut other = node("o", 4);
        other.base_models = vec!["big".into()];
        let nodes = [node("a", 4), other, node("b", 4)];
        let p = place(
            &[want("x", Replicas::All, &["b"])],
            &nodes,
            Policy::LeastLoaded,
        );
        assert_eq!(urls(&p, "x"), ["b", "a"]);
        assert!(p["x"].short.is_none());
    }

    #[test]
    fn fewer_replicas_wanted_keeps_the_first_current_ones() {
        let nodes = [node("a", 4), node("b", 4)];
        let p = place(
            &[want("x", Replicas::Count(1), &["b", "a"])],
            &nodes,
            Policy::LeastLoaded,
        );
        assert_eq!(urls(&p, "x"), ["b"]);
    }

    #[test]
    fn no_instance_of_the_base_model_leaves_the_adapter_unplaced_with_the_reason() {
        let mut w = want("x", Replicas::Count(1), &[]);
        w.base_model = "absent".into();
        let p = place(&[w], &[node("a", 4)], Policy::LeastLoaded);
        assert!(urls(&p, "x").is_empty());
        assert!(p["x"].short.as_deref().unwrap().contains("`absent`"));
    }
}
