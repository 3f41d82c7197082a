//! Where a cluster's members come from: the seam every reader of membership uses, and its
//! simplest implementation, a fixed list.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::etcd::EtcdError;

/// Why the members could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// The members' future, as a [`MemberSource`] returns it.
pub type MembersFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<String>, MembershipError>> + Send + 'a>>;

/// Where a cluster's members come from.
pub trait MemberSource: Send + Sync + 'static {
    /// The current members' `host:port`.
    fn members(&self) -> MembersFuture<'_>;
    /// How often to ask again; `None` for a source that never changes.
    fn refresh(&self) -> Option<Duration>;
    /// Where the members come from, for logs.
    fn describe(&self) -> String;
}

/// A fixed member list.
pub struct StaticMembers(pub Vec<String>);

impl MemberSource for StaticMembers {
    fn members(&self) -> MembersFuture<'_> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }
    fn refresh(&self) -> Option<Duration> {
        None
    }
    fn describe(&self) -> String {
        format!("static list of {}", self.0.len())
    }
}
