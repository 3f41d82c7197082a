//! Keys and namespaces from Python, exactly as the Rust core derives them (the golden vectors
//! are checked from both languages), and the checks on keys Python hands in.

use kvcache_core::{BlockKey, Namespace, NamespaceId, TpPlacement};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pub(crate) fn key_of(bytes: &[u8], what: &str) -> PyResult<BlockKey> {
    BlockKey::from_slice(bytes).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{what} must be 16 bytes (a kvcache block key), got {}",
            bytes.len()
        ))
    })
}

pub(crate) fn keys_of(keys: Vec<Vec<u8>>) -> PyResult<Vec<BlockKey>> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| key_of(k, &format!("keys[{i}]")))
        .collect()
}

/// Keys of every full block of `tokens`, exactly as the Rust core derives them.
/// `namespace` is the 16-byte namespace id (see `namespace_id`).
#[pyfunction]
pub(crate) fn chain_keys<'py>(
    py: Python<'py>,
    namespace: Vec<u8>,
    tokens: Vec<u32>,
    block_size: usize,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let ns: [u8; 16] = namespace.as_slice().try_into().map_err(|_| {
        PyValueError::new_err(format!(
            "namespace must be a 16-byte namespace id, got {} bytes",
            namespace.len()
        ))
    })?;
    if block_size == 0 {
        return Err(PyValueError::new_err("block_size must be positive"));
    }
    let keys =
        py.detach(|| kvcache_core::chain_keys(&NamespaceId::from_bytes(ns), &tokens, block_size));
    Ok(keys
        .iter()
        .map(|k| PyBytes::new(py, &k.to_bytes()))
        .collect())
}

/// The 16-byte id of a namespace: everything that makes KV bytes differ for the same tokens.
#[pyfunction]
#[pyo3(signature = (model, kv_dtype, block_size, *, layout = String::new(), tp_world_size = 1, tp_rank = 0, rank_agnostic = false, lora = None, salt = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn namespace_id<'py>(
    py: Python<'py>,
    model: String,
    kv_dtype: String,
    block_size: u32,
    layout: String,
    tp_world_size: u32,
    tp_rank: u32,
    rank_agnostic: bool,
    lora: Option<String>,
    salt: Option<String>,
) -> PyResult<Bound<'py, PyBytes>> {
    if !rank_agnostic && tp_rank >= tp_world_size {
        return Err(PyValueError::new_err(format!(
            "tp_rank {tp_rank} is not below tp_world_size {tp_world_size}"
        )));
    }
    let tp = if rank_agnostic {
        TpPlacement::RankAgnostic
    } else {
        TpPlacement::Rank {
            world_size: tp_world_size,
            rank: tp_rank,
        }
    };
    let ns = Namespace {
        model,
        kv_dtype,
        block_size,
        layout,
        tp,
        lora,
        salt,
    };
    Ok(PyBytes::new(py, ns.id().as_bytes()))
}
