//! A Deployment's or StatefulSet's `scale` subresource through kube-rs: `current` reads
//! `spec.replicas`, `set` patches it (a merge patch of the subresource, as `kubectl scale`
//! does). The client is configured from the environment (in-cluster service account, else
//! KUBECONFIG); the RBAC it needs is `get` and `patch` on `deployments/scale` or
//! `statefulsets/scale` (deploy/ has the Role).

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::Scale;
use crate::config::KubernetesTarget;

/// The Kubernetes actuator.
pub struct Kubernetes {
    target: KubernetesTarget,
    client: kube::Client,
}

impl Kubernetes {
    /// A client from the environment.
    pub async fn from_environment(target: KubernetesTarget) -> Result<Self, String> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes client (in-cluster or KUBECONFIG): {e}"))?;
        Ok(Self::with_client(target, client))
    }

    /// With a given client (tests point one at their own server).
    pub fn with_client(target: KubernetesTarget, client: kube::Client) -> Self {
        Self { target, client }
    }

    fn what(&self) -> String {
        format!(
            "{} {}/{}",
            self.target.kind, self.target.namespace, self.target.name
        )
    }
}

impl Scale for Kubernetes {
    async fn current(&mut self) -> Result<Option<u32>, String> {
        let ns = &self.target.namespace;
        let scale = if self.target.kind == "StatefulSet" {
            Api::<StatefulSet>::namespaced(self.client.clone(), ns)
                .get_scale(&self.target.name)
                .await
        } else {
            Api::<Deployment>::namespaced(self.client.clone(), ns)
                .get_scale(&self.target.name)
                .await
        }
        .map_err(|e| format!("reading the scale of {}: {e}", self.what()))?;
        Ok(scale.spec.and_then(|s| s.replicas).map(|r| r.max(0) as u32))
    }

    async fn set(&mut self, replicas: u32) -> Result<(), String> {
        let ns = &self.target.namespace;
        let patch = Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}}));
        let params = PatchParams::default();
        if self.target.kind == "StatefulSet" {
            Api::<StatefulSet>::namespaced(self.client.clone(), ns)
                .patch_scale(&self.target.name, &params, &patch)
                .await
        } else {
            Api::<Deployment>::namespaced(self.client.clone(), ns)
                .patch_scale(&self.target.name, &params, &patch)
                .await
        }
        .map(|_| ())
        .map_err(|e| format!("scaling {} to {replicas}: {e}", self.what()))
    }
}
