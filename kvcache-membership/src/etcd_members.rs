//! Members registered in etcd: each node keeps `MEMBERS_PREFIX<node id>` = `{"addr": ...}`
//! alive under a lease (see [`crate::registration`]), so a node that dies drops out when its
//! lease expires.

use std::time::Duration;

use crate::etcd::{Etcd, EtcdError, MEMBERS_PREFIX};
use crate::source::{MemberSource, MembersFuture};

/// Members registered in etcd under [`MEMBERS_PREFIX`].
pub struct EtcdMembers {
    etcd: Etcd,
    refresh: Duration,
}

impl EtcdMembers {
    /// `url` is `etcd://host:port` or `http://host:port`; members are re-read every `refresh`.
    pub fn new(url: &str, refresh: Duration, timeout: Duration) -> Result<Self, EtcdError> {
        Ok(Self::with_endpoint(Etcd::new(url, timeout)?, refresh))
    }

    /// Members from an etcd endpoint already made, re-read every `refresh`.
    pub fn with_endpoint(etcd: Etcd, refresh: Duration) -> Self {
        Self { etcd, refresh }
    }
}

impl MemberSource for EtcdMembers {
    fn members(&self) -> MembersFuture<'_> {
        Box::pin(async move {
            let kvs = self.etcd.range_prefix(MEMBERS_PREFIX).await?;
            let mut members = Vec::with_capacity(kvs.len());
            for (key, value) in kvs {
                let addr = serde_json::from_str::<serde_json::Value>(&value)
                    .ok()
                    .and_then(|v| v.get("addr")?.as_str().map(str::to_string));
                match addr {
                    Some(addr) => members.push(addr),
                    None => {
                        tracing::warn!(key, value, "etcd member record without an addr; ignored")
                    }
                }
            }
            members.sort();
            members.dedup();
            Ok(members)
        })
    }
    fn refresh(&self) -> Option<Duration> {
        Some(self.refresh)
    }
    fn describe(&self) -> String {
        format!("etcd at {}", self.etcd.addr())
    }
}
