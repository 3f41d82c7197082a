"""What the deploy tests share: the real binaries started with small configs, and every metric
name they export, read from their own /metrics (the one list the dashboard and the alerts are
checked against)."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "kvcache.json"
sys.path.insert(0, str(REPO / "pyo3-bindings" / "tests"))

from kvserver import find_binary, free_port, start_server, stop_server  # noqa: E402

__all__ = ["find_binary", "free_port", "start_server", "stop_server"]


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


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def start(binary: str, env: str, args: list[str], tmp: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(find_binary(binary, env)), *args],
        stdout=subprocess.PIPE,
        stderr=(tmp / f"{binary}.log").open("w"),
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert " ready http=" in line, f"{binary} did not start: {line!r}"
    return proc, "http://" + line.split("http=", 1)[1].strip()


def exported_names(tmp: Path) -> set[str]:
    """Every sample name the four binaries' /metrics can carry, from their # TYPE lines."""
    dead = f"http://127.0.0.1:{free_port()}"
    server = start_server()
    procs = []
    try:
        texts = [scrape(f"http://{server.metrics}/metrics")]
        (tmp / "gateway.toml").write_text(f'listen = "127.0.0.1:0"\n[[backend]]\nurl = "{dead}"\n')
        (tmp / "lora.toml").write_text(f'listen = "127.0.0.1:0"\ninstances = ["{dead}"]\n')
        (tmp / "autoscaler.toml").write_text(
            f'listen = "127.0.0.1:0"\n[[target]]\nname = "t"\nsources = ["{dead}/metrics"]\n'
            'metric = "m"\ntarget_value = 1.0\n'
        )
        for binary, env in [
            ("kvcache-gateway", "KVCACHE_GATEWAY_BIN"),
            ("kvcache-lora", "KVCACHE_LORA_BIN"),
            ("kvcache-autoscaler", "KVCACHE_AUTOSCALER_BIN"),
        ]:
            config = tmp / f"{binary.removeprefix('kvcache-')}.toml"
            proc, url = start(binary, env, ["--config", str(config)], tmp)
            procs.append(proc)
            texts.append(scrape(f"{url}/metrics"))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        stop_server(server)
    names: set[str] = set()
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "unknown": [""],
        "info": ["_info"],
    }
    for text in texts:
        for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            base = family.removesuffix("_total")
            names.update(base + s for s in suffixes.get(kind, [""]))
    return names
