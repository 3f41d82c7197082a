"""Every Kustomize overlay in deploy/kubernetes renders with kubectl, every object validates
strictly against the Kubernetes schemas (kubernetes-validate), and the house rules hold on every
workload: probes, resources, a locked-down security context, the app.kubernetes.io labels.
Objects of the Prometheus Operator's CRDs have no schema there; they are listed, and only they
are skipped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

KUBERNETES = Path(__file__).resolve().parents[1] / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
VERSION = "1.33.0"
# Kinds from CRDs kubernetes-validate has no schema for: the Prometheus Operator's.
CRD_KINDS = {"monitoring.coreos.com/v1": {"PodMonitor", "ServiceMonitor"}}
# The only capability a container adds, and why: mlock of the cache pool and of RDMA-registered
# engine memory.
ALLOWED_CAPABILITIES = {"IPC_LOCK"}


def render(path: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not found: install it (scripts/test.sh does) to render the overlays")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def workloads(objects: list[dict]):
    for o in objects:
        if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield o, o["spec"]["template"]["spec"]


def test_every_overlay_is_there():
    assert set(OVERLAYS) >= {"cpu", "gpu", "rdma", "pd", "external-etcd", "prometheus-operator"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_renders_and_validates_strictly(overlay: str):
    objects = render(KUBERNETES / "overlays" / overlay)
    assert objects, "nothing rendered"
    skipped = []
    for o in objects:
        if o["kind"] in CRD_KINDS.get(o["apiVersion"], set()):
            skipped.append(o["kind"])
            continue
        try:
            kubernetes_validate.validate(o, VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
    if overlay != "prometheus-operator":
        assert not skipped, skipped


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_probes_resources_a_locked_down_context_and_labels(overlay: str):
    objects = render(KUBERNETES / "overlays" / overlay)
    for o in objects:
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "kvcache", (o["kind"], o["metadata"]["name"])
    for w, pod in workloads(objects):
        name = f"{w['kind']}/{w['metadata']['name']}"
        assert "app.kubernetes.io/name" in w["metadata"]["labels"], name
        assert pod["securityContext"].get("runAsNonRoot") is True, name
        assert pod["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for c in pod["containers"]:
            where = f"{name} container {c['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, where
            assert c["resources"]["requests"] and c["resources"]["limits"].get("memory"), where
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert set(sc["capabilities"].get("add", [])) <= ALLOWED_CAPABILITIES, where


def test_the_autoscaler_may_scale_and_nothing_else():
    objects = render(KUBERNETES / "overlays" / "cpu")
    (role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "kvcache-autoscaler"]
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments/scale", "statefulsets/scale"], "verbs": ["get", "patch"]}
    ]
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_pd_overlay_has_a_producer_and_a_consumer_pool_and_no_plain_engine():
    objects = render(KUBERNETES / "overlays" / "pd")
    engines = {w["metadata"]["name"]: pod for w, pod in workloads(objects) if w["metadata"]["name"].startswith("vllm")}
    assert set(engines) == {"vllm-prefill", "vllm-decode"}
    roles = {n: next(a for a in p["containers"][0]["args"] if "kv_role" in a) for n, p in engines.items()}
    assert '"kv_role":"kv_producer"' in roles["vllm-prefill"] and '"kv_role":"kv_consumer"' in roles["vllm-decode"]


def test_strict_validation_catches_a_misspelled_field():
    """The control: the validator does reject what it should."""
    objects = render(KUBERNETES / "overlays" / "cpu")
    (gateway,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "kvcache-gateway"]
    gateway["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, VERSION, strict=True)
