//! How client errors reach Python: connection and timeout errors as Python's own, refused
//! credentials as `PermissionError`, bad arguments as `ValueError`, the rest as
//! `KvcacheError`.

use kvcache_client::ClientError;
use kvcache_core::wire::ErrorCode;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyConnectionError, PyException, PyPermissionError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;

create_exception!(
    _native,
    KvcacheError,
    PyException,
    "A kvcache node refused a request, sent an invalid reply, or the client is closed."
);

pub(crate) fn to_py(e: ClientError) -> PyErr {
    match e {
        ClientError::Connect { .. } | ClientError::Io(_) => {
            PyConnectionError::new_err(e.to_string())
        }
        ClientError::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        ClientError::Server {
            code: ErrorCode::Unauthenticated | ErrorCode::Forbidden,
            ..
        } => PyPermissionError::new_err(e.to_string()),
        ClientError::InvalidArgument(m) => PyValueError::new_err(m),
        ClientError::Server { .. }
        | ClientError::Protocol(_)
        | ClientError::ShmUnavailable(_)
        | ClientError::RdmaUnavailable(_)
        | ClientError::Membership(_) => KvcacheError::new_err(e.to_string()),
    }
}
