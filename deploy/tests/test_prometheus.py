"""deploy/prometheus: promtool accepts the scrape configuration and the rules, the rules' unit
tests pass (each alert fires and clears), and every metric the rules name is one the binaries
export: a kvcache-server, the gateway, the LoRA manager and the autoscaler are started and their
/metrics read, so renaming a metric in the code fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
sys.path.insert(0, str(REPO / "pyo3-bindings" / "tests"))

from kvserver import find_binary, free_port, start_server, stop_server  # noqa: E402


def promtool(*args: str) -> str:
    if shutil.which("promtool") is None:
        if os.environ.get("KVCACHE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("promtool not found: install Debian's prometheus")
        pytest.skip("promtool not found: install Debian's prometheus (scripts/test.sh does)")
    out = subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_promtool_accepts_the_config_and_the_rules():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in promtool("check", "rules", "rules.yml")


def test_every_alert_fires_and_clears_in_its_unit_test():
    rules = (PROMETHEUS / "rules.yml").read_text()
    tests = (PROMETHEUS / "rules_test.yml").read_text()
    for alert in re.findall(r"alert: (\w+)", rules):
        assert f"alertname: {alert}" in tests, f"{alert} has no unit test"
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


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


def test_every_metric_the_rules_name_is_exported(tmp_path: Path):
    exported = exported_names(tmp_path)
    assert "kvcache_hit_blocks_total" in exported and "kvcache_gateway_backend_up" in exported, sorted(exported)
    used = set(re.findall(r"\b(kvcache_[a-z_]+)", (PROMETHEUS / "rules.yml").read_text()))
    assert used, "the rules name no metric"
    missing = sorted(used - exported)
    assert not missing, f"the rules name metrics no binary exports: {missing}"
