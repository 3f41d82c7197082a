"""What the deploy tests share: the real binaries started with small configs, and every metric
name they export, read from their own /metrics, with what the code declares for label families
that have no sample yet (the one list the dashboard and the alerts are checked against)."""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "kvcache.json"
sys.path.insert(0, str(REPO / "pyo3-bindings" / "tests"))

from kvserver import Prometheus, Service, free_port, sample_sum, start_server, stop_server  # noqa: E402

__all__ = ["Prometheus", "Service", "free_port", "sample_sum", "start_server", "stop_server"]


def tier_names() -> set[str]:
    """`kvcache_<tier>_<suffix>` for the disk and GPU tiers, from kvcache-core's own list (a
    node exports them only with the tier configured)."""
    source = (REPO / "kvcache-core" / "src" / "metric_names.rs").read_text()
    block = source[source.index("pub const TIER_SUFFIXES") :]
    suffixes = re.findall(r'"([a-z_]+)"', block[: block.index("];")])
    promoted = re.search(r'TIER_PROMOTED_SUFFIX: &str = "([a-z_]+)"', source).group(1)
    return {f"kvcache_{t}_{s}" for t in ("disk", "gpu") for s in [*suffixes, promoted]}


def declared_names() -> set[str]:
    """The metric names the code declares (kvcache-core's list, and the gateway's, the LoRA
    manager's and the autoscaler's metrics files), each with the suffixes its type may add: a
    label family appears on /metrics only once it has a sample, so a scrape alone misses some."""
    files = [
        "kvcache-core/src/metric_names.rs",
        "gateway/src/metrics.rs",
        "lora/src/metrics.rs",
        "autoscaler/src/metrics.rs",
    ]
    names: set[str] = set()
    for f in files:
        for n in re.findall(r'"(kvcache_[a-z_]+)"', (REPO / f).read_text()):
            base = n.removesuffix("_total")
            names.update({base, base + "_total", base + "_bucket", base + "_sum", base + "_count"})
    return names


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def prometheus_query(url: str, expr: str, rate_interval: str = "10s") -> dict:
    """Prometheus' answer to an instant query (its error body too), with Grafana's
    `$__rate_interval` set to `rate_interval` (at least four scrape intervals)."""
    q = urllib.parse.urlencode({"query": expr.replace("$__rate_interval", rate_interval)})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def small_configs(dead: str) -> dict[str, str]:
    """Configs the gateway, the LoRA manager and the autoscaler start with when nothing they
    manage answers (at `dead`)."""
    return {
        "gateway": f'listen = "127.0.0.1:0"\n[[backend]]\nurl = "{dead}"\n',
        "lora": f'listen = "127.0.0.1:0"\ninstances = ["{dead}"]\n',
        "autoscaler": f'listen = "127.0.0.1:0"\ninterval_s = 0.5\n[[target]]\nname = "engines"\n'
        f'sources = ["{dead}/metrics"]\nmetric = "vllm:num_requests_running"\ntarget_value = 1.0\n',
    }


def start_services(configs: dict[str, str], tmp: Path) -> dict[str, Service]:
    """The control-plane binaries with `configs` (by short name: gateway, lora, autoscaler)."""
    started: dict[str, Service] = {}
    try:
        for name, config in configs.items():
            started[name] = Service(f"kvcache-{name}", f"KVCACHE_{name.upper()}_BIN", config, tmp)
    except BaseException:
        for s in started.values():
            s.stop()
        raise
    return started


def exported_names(tmp: Path) -> set[str]:
    """Every sample name the four binaries' /metrics carry now, from their # TYPE lines."""
    server = start_server()
    services: dict[str, Service] = {}
    try:
        services = start_services(small_configs(f"http://127.0.0.1:{free_port()}"), tmp)
        texts = [scrape(f"http://{server.metrics}/metrics")] + [scrape(f"{s.url}/metrics") for s in services.values()]
    finally:
        for s in services.values():
            s.stop()
        stop_server(server)
    names: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    for text in texts:
        for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            base = family.removesuffix("_total")
            names.update(base + s for s in suffixes.get(kind, [""]))
    return names
