"""deploy/prometheus: promtool accepts the scrape configuration and the rules, the rules' unit
tests pass (each alert fires and clears), and every metric the rules name is one the binaries
export: a kvcache-server, the gateway, the LoRA manager and the autoscaler are started and their
/metrics read, so renaming a metric in the code fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from components import PROMETHEUS, declared_names, exported_names


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


def test_every_metric_the_rules_name_is_exported(tmp_path: Path):
    live = exported_names(tmp_path)
    assert "kvcache_hit_blocks_total" in live and "kvcache_gateway_backend_up" in live, sorted(live)
    # What the binaries served, and what the code declares for families without a sample yet.
    exported = live | declared_names()
    used = set(re.findall(r"\b(kvcache_[a-z_]+)", (PROMETHEUS / "rules.yml").read_text()))
    assert used, "the rules name no metric"
    missing = sorted(used - exported)
    assert not missing, f"the rules name metrics no binary exports: {missing}"
