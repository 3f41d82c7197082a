//! The Python module `kvcache` (native part `kvcache._native`): a thin shell over
//! `kvcache-client` and `kvcache-core`. Every blocking call releases the GIL and runs on one
//! shared tokio runtime, created on first use (after any fork the engine does at start-up).

//!
//! Rooms: `client.rs` (the `Client` class), `segments.rs` (the unsafe views of caller memory),
//! `keys.rs` (`chain_keys`, `namespace_id`), `registry.rs` (`Registration`: a record kept
//! alive in etcd), `error.rs` (exceptions), `runtime.rs`.

mod client;
mod error;
mod keys;
mod registry;
mod runtime;
mod segments;

use pyo3::prelude::*;

use crate::client::Client;
use crate::error::KvcacheError;
use crate::keys::{chain_keys, namespace_id};
use crate::registry::Registration;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<Registration>()?;
    m.add_function(wrap_pyfunction!(chain_keys, m)?)?;
    m.add_function(wrap_pyfunction!(namespace_id, m)?)?;
    m.add("KvcacheError", m.py().get_type::<KvcacheError>())?;
    Ok(())
}
