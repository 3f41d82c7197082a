//! The one tokio runtime every call runs on, created on first use (after any fork the engine
//! does at start-up), and the way a call leaves the GIL while it waits.

use std::sync::OnceLock;

use pyo3::prelude::*;

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvcache-io")
            .enable_all()
            .build()
            .expect("cannot start the kvcache I/O runtime")
    })
}

/// Runs a future on the I/O runtime with the GIL released.
pub(crate) fn block<T: Send>(
    py: Python<'_>,
    fut: impl std::future::Future<Output = T> + Send,
) -> T {
    py.detach(|| runtime().block_on(fut))
}
