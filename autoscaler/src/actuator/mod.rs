//! How a target's replica count is changed, behind one trait: `kubernetes.rs` (a Deployment's
//! or StatefulSet's scale subresource, feature `kubernetes`), `command.rs` (a command run with
//! the new count: how a bare-metal user starts and stops instances) and `dry_run.rs` (decide and
//! report only).

pub mod command;
pub mod dry_run;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;

use crate::config::{ActuatorKind, TargetConfig};

/// Changes a replica count.
pub trait Scale {
    /// The count asked for now, when the actuator knows it (a Deployment's `spec.replicas`);
    /// None when only this process's own last request says (a command).
    fn current(&mut self) -> impl Future<Output = Result<Option<u32>, String>> + Send;
    /// Asks for `replicas`.
    fn set(&mut self, replicas: u32) -> impl Future<Output = Result<(), String>> + Send;
}

/// The configured actuator of a target.
pub enum Actuator {
    Command(command::Command),
    DryRun(dry_run::DryRun),
    #[cfg(feature = "kubernetes")]
    Kubernetes(kubernetes::Kubernetes),
}

impl Actuator {
    /// The actuator `t` names; an error when it cannot be made (no Kubernetes configuration,
    /// or the feature not built).
    pub async fn new(t: &TargetConfig) -> Result<Self, String> {
        match t.actuator {
            ActuatorKind::DryRun => Ok(Self::DryRun(dry_run::DryRun)),
            ActuatorKind::Command => Ok(Self::Command(command::Command::new(
                t.scale_command.clone().unwrap_or_default(),
                t.scale_timeout,
            ))),
            #[cfg(feature = "kubernetes")]
            ActuatorKind::Kubernetes => {
                let k = t.kubernetes.clone().ok_or("no [target.kubernetes] table")?;
                Ok(Self::Kubernetes(kubernetes::Kubernetes::from_environment(k).await?))
            }
            #[cfg(not(feature = "kubernetes"))]
            ActuatorKind::Kubernetes => Err(
                "this kvcache-autoscaler was built without the `kubernetes` feature (cargo build --features kubernetes)"
                    .into(),
            ),
        }
    }
}

impl Scale for Actuator {
    async fn current(&mut self) -> Result<Option<u32>, String> {
        match self {
            Self::Command(a) => a.current().await,
            Self::DryRun(a) => a.current().await,
            #[cfg(feature = "kubernetes")]
            Self::Kubernetes(a) => a.current().await,
        }
    }

    async fn set(&mut self, replicas: u32) -> Result<(), String> {
        match self {
            Self::Command(a) => a.set(replicas).await,
            Self::DryRun(a) => a.set(replicas).await,
            #[cfg(feature = "kubernetes")]
            Self::Kubernetes(a) => a.set(replicas).await,
        }
    }
}
