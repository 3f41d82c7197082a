//! `Registration`: a record kept alive in etcd under a lease (an engine's, for gateways to find
//! it), renewed on the module's runtime and revoked by `close()`, exactly as a cache node keeps
//! its own (`kvcache_membership::Registration`).

use std::sync::Arc;
use std::time::Duration;

use kvcache_membership::{Etcd, Registration as Record, RegistrationObserver};
use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tokio::sync::watch;

use crate::runtime::runtime;

/// What the renewal loop last said.
#[derive(Default)]
struct State {
    registered: Mutex<bool>,
}

impl RegistrationObserver for State {
    fn registered(&self, yes: bool) {
        *self.registered.lock() = yes;
    }
    fn failed(&self) {}
}

/// A record in etcd under a lease renewed every third of `ttl_s`; registered again if etcd
/// forgets it, revoked by `close()` (or when the process ends, after `ttl_s`).
#[pyclass(module = "kvcache")]
pub struct Registration {
    key: String,
    state: Arc<State>,
    stop: Option<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[pymethods]
impl Registration {
    /// Starts keeping `value` (a string, JSON by convention) under `key` in the etcd at `etcd`
    /// (`etcd://[user[:password]@]host:port`).
    #[new]
    #[pyo3(signature = (etcd, key, value, ttl_s = 10))]
    fn new(etcd: &str, key: String, value: String, ttl_s: u64) -> PyResult<Self> {
        if ttl_s < 2 {
            return Err(PyValueError::new_err("ttl_s must be at least 2"));
        }
        let client = Etcd::new(etcd, Duration::from_secs(2))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let record = Record {
            etcd: client,
            key: key.clone(),
            value,
            ttl: ttl_s,
        };
        let state = Arc::new(State::default());
        let (stop, stopped) = watch::channel(false);
        let observer: Arc<dyn RegistrationObserver> = Arc::clone(&state) as _;
        let task = runtime().spawn(record.run(observer, stopped));
        Ok(Self {
            key,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The record's key.
    #[getter]
    fn key(&self) -> &str {
        &self.key
    }

    /// Whether the record is in etcd now (as of the last renewal).
    #[getter]
    fn registered(&self) -> bool {
        *self.state.registered.lock()
    }

    /// Revokes the lease (the record disappears at once) and stops renewing.
    fn close(&mut self, py: Python<'_>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.task.take() {
            py.detach(|| {
                let _ = runtime()
                    .block_on(async { tokio::time::timeout(Duration::from_secs(3), task).await });
            });
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}
