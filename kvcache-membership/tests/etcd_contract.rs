//! The contract the hand-written etcd client keeps, against a real etcd (Debian's
//! `etcd-server`), since it stands where the `etcd-client` crate would (that crate needs
//! `protoc` to build): keys and values round trip, a lease kept alive keeps its keys and one
//! left alone takes them with it, a stopped etcd costs a bounded error and a restarted one is
//! reached again by the same client, and a node's registration comes back after etcd lost it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvcache_membership::testing::EtcdProcess;
use kvcache_membership::{
    Etcd, EtcdError, EtcdMembers, MEMBERS_PREFIX, MemberSource, Registration, RegistrationObserver,
};
use tokio::sync::watch;

fn client(etcd: &EtcdProcess) -> Etcd {
    Etcd::new(&etcd.client_url, Duration::from_secs(2)).unwrap()
}

/// Polls `cond` every 50 ms until it holds, failing after `within`.
async fn eventually<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !cond().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keys_and_values_round_trip_by_prefix_in_key_order() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let c = client(&etcd);
    c.put("/t/b", "two ünïcode", None).await.unwrap();
    c.put("/t/a", "{\"addr\":\"h:1\"}", None).await.unwrap();
    c.put("/u/a", "outside the prefix", None).await.unwrap();
    let got = c.range_prefix("/t/").await.unwrap();
    assert_eq!(
        got,
        [
            ("/t/a".to_string(), "{\"addr\":\"h:1\"}".to_string()),
            ("/t/b".to_string(), "two ünïcode".to_string()),
        ]
    );
    c.delete("/t/a").await.unwrap();
    assert_eq!(c.range_prefix("/t/").await.unwrap().len(), 1);
    assert!(c.range_prefix("/none/").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_lease_kept_alive_keeps_its_key_and_one_left_alone_takes_it() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let c = client(&etcd);
    let kept = c.grant(2).await.unwrap();
    let left = c.grant(2).await.unwrap();
    c.put("/l/kept", "1", Some(kept)).await.unwrap();
    c.put("/l/left", "1", Some(left)).await.unwrap();
    // Past two TTLs, renewing one lease every half second.
    let until = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < until {
        assert!(c.keep_alive(kept).await.unwrap(), "a live lease renews");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let keys: Vec<String> = c
        .range_prefix("/l/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        ["/l/kept"],
        "the unrenewed lease expired with its key"
    );
    assert!(
        !c.keep_alive(left).await.unwrap(),
        "an expired lease is unknown"
    );
    c.revoke(kept).await.unwrap();
    assert!(
        c.range_prefix("/l/").await.unwrap().is_empty(),
        "revoke deletes at once"
    );
    assert!(!c.keep_alive(kept).await.unwrap());
}

#[tokio::test]
async fn a_stopped_etcd_costs_a_bounded_error_and_a_restarted_one_is_reached_again() {
    let Some(mut etcd) = EtcdProcess::start() else {
        return;
    };
    let c = client(&etcd);
    c.put("/r/k", "before", None).await.unwrap();
    etcd.kill();
    let started = Instant::now();
    let err = c.range_prefix("/r/").await.unwrap_err();
    assert!(
        matches!(err, EtcdError::Io { .. } | EtcdError::Timeout(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by the timeout"
    );
    etcd.restart();
    // The same client, no reconnect step: each call opens its own connection.
    let got = c.range_prefix("/r/").await.unwrap();
    assert_eq!(
        got,
        [("/r/k".to_string(), "before".to_string())],
        "data kept"
    );
}

/// Counts what a registration loop reports.
#[derive(Default)]
struct Seen {
    registered: AtomicBool,
    failures: AtomicU64,
}

impl RegistrationObserver for Seen {
    fn registered(&self, yes: bool) {
        self.registered.store(yes, Relaxed);
    }
    fn failed(&self) {
        self.failures.fetch_add(1, Relaxed);
    }
}

#[tokio::test]
async fn a_registration_comes_back_after_etcd_loses_it_and_is_revoked_at_shutdown() {
    let Some(mut etcd) = EtcdProcess::start() else {
        return;
    };
    let registration = Registration::member(client(&etcd), "node-a", "127.0.0.1:7400", 2);
    assert_eq!(registration.key(), format!("{MEMBERS_PREFIX}node-a"));
    let members = EtcdMembers::with_endpoint(client(&etcd), Duration::from_millis(100));
    let seen = Arc::new(Seen::default());
    let (stop, stopped) = watch::channel(false);
    let observer: Arc<dyn RegistrationObserver> = Arc::clone(&seen) as _;
    let running = tokio::spawn(registration.run(observer, stopped));
    let listed = || async { members.members().await.ok() == Some(vec!["127.0.0.1:7400".into()]) };
    eventually(Duration::from_secs(5), "registered", listed).await;
    assert!(seen.registered.load(Relaxed));

    // etcd restarts with its data gone: the lease is unknown, the node registers anew.
    etcd.kill();
    eventually(Duration::from_secs(5), "failure reported", || async {
        seen.failures.load(Relaxed) > 0 && !seen.registered.load(Relaxed)
    })
    .await;
    etcd.wipe();
    etcd.restart();
    eventually(Duration::from_secs(10), "registered again", listed).await;

    stop.send(true).unwrap();
    running.await.unwrap();
    assert!(
        members.members().await.unwrap().is_empty(),
        "shutdown revokes the lease at once"
    );
    assert!(!seen.registered.load(Relaxed));
}
