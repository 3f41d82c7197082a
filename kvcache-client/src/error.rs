//! Client errors. A miss is not an error: lookups return `None`/`Miss`/`false` for absent keys.

use std::time::Duration;

use kvcache_core::wire::ErrorCode;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to kvcache node {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("connection to kvcache node failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("kvcache node sent an invalid reply: {0}")]
    Protocol(String),
    #[error("kvcache node refused the request ({code:?}): {message}")]
    Server { code: ErrorCode, message: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("shared memory unavailable: {0}")]
    ShmUnavailable(String),
    #[error("RDMA unavailable: {0}")]
    RdmaUnavailable(String),
    #[error("cannot read the cluster membership: {0}")]
    Membership(String),
}

impl ClientError {
    /// True when the node could not be reached or stopped answering: the caller may treat the
    /// data as missing and retry elsewhere. False for errors in the request itself.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Io(_)
        )
    }

    /// True when the node refused this client's credentials: no token where one is needed,
    /// a token it does not know, or one removed since.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Self::Server {
                code: ErrorCode::Unauthenticated,
                ..
            }
        )
    }
}

/// Checks that a batch names as many `what` as keys.
pub(crate) fn same_len(keys: usize, other: usize, what: &str) -> Result<(), ClientError> {
    if keys == other {
        Ok(())
    } else {
        Err(ClientError::InvalidArgument(format!(
            "{keys} keys but {other} {what}"
        )))
    }
}

impl From<kvcache_membership::MembershipError> for ClientError {
    fn from(e: kvcache_membership::MembershipError) -> Self {
        ClientError::Membership(e.to_string())
    }
}
