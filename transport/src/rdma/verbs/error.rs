//! What can go wrong in the verbs layer, and the two ways a verb reports it.

use std::io;
use std::time::Duration;

use crate::rdma::CompletionOutcome;

/// A failure of the verbs layer.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        source: io::Error,
    },
    #[error("RDMA transfer failed: {outcome:?} ({status})")]
    Transfer {
        outcome: CompletionOutcome,
        status: String,
    },
    #[error("RDMA transfer did not complete within {0:?}")]
    Timeout(Duration),
    #[error("the RDMA link is broken after an earlier failure")]
    Broken,
    #[error("{0}")]
    Invalid(String),
}

impl VerbsError {
    /// Whether the connection carrying this link must be dropped.
    pub fn breaks_link(&self) -> bool {
        !matches!(
            self,
            VerbsError::Transfer {
                outcome: CompletionOutcome::RemoteAccess,
                ..
            } | VerbsError::Invalid(_)
        )
    }
}

pub(super) fn last_os(call: &'static str) -> VerbsError {
    VerbsError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Calls that return an errno value rather than setting `errno`.
pub(super) fn check(call: &'static str, rc: i32) -> Result<(), VerbsError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(VerbsError::Call {
            call,
            source: io::Error::from_raw_os_error(rc.abs()),
        })
    }
}
