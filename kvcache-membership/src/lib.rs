//! kvcache-membership: who the cache nodes are, for everyone who needs to know (the server,
//! the client, the gateway, the LoRA manager) without pulling in the client.
//!
//! - [`source`]: the [`MemberSource`] seam and a fixed list ([`StaticMembers`]);
//! - [`etcd`]: a small etcd v3 client over its JSON gateway;
//! - [`etcd_members`]: members registered in etcd ([`EtcdMembers`]);
//! - [`registration`]: a node's own registration, kept alive by lease;
//! - `testing` (feature `test-support`): a real etcd process for tests.
//!
//! It depends on no other kvcache crate.

pub mod etcd;
pub mod etcd_members;
pub mod registration;
pub mod source;
#[cfg(feature = "test-support")]
pub mod testing;

pub use etcd::{ENGINES_PREFIX, Etcd, EtcdError, MEMBERS_PREFIX};
pub use etcd_members::EtcdMembers;
pub use registration::{Registration, RegistrationObserver};
pub use source::{MemberSource, MembershipError, StaticMembers};
