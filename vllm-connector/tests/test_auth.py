"""A node started with `--auth` (two tenants) and real vLLM engines on CPU (single-process): an
engine with its tenant's token loads what another engine of that tenant saved, and engines with
another tenant's token or an unknown one only miss, with the same outputs and no error.

Skips while `kvcache-server --help` lists no `--auth`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import assert_same_outputs, kv_config, loadable_tokens, make_prompts, run_engine
from kvserver import Server, server_binary, start_server, stop_server

# No shared prefixes between the prompts, so every cached token is an external hit.
PROMPTS = make_prompts([300, 260], seed=21)
TENANTS = """
[[tenant]]
name = "alpha"
tokens = ["alpha-token-1"]
admin = false

[[tenant]]
name = "beta"
tokens = ["beta-token-1"]
admin = false
"""


def server_has_auth() -> bool:
    done = subprocess.run([str(server_binary()), "--help"], capture_output=True, text=True, timeout=60)
    return "--auth" in done.stdout + done.stderr


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[Server]:
    if not server_has_auth():
        pytest.skip(f"{server_binary()} --help lists no --auth: this test needs a node with authentication")
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    s = start_server("--memory", "256MiB", "--auth", str(tenants))
    yield s
    stop_server(s)


def test_a_tenants_token_shares_prefixes_and_other_tokens_only_miss(
    auth_server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    baseline = run_engine(tmp_path, tiny_model, PROMPTS, None)
    first = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(auth_server, token="alpha-token-1"))
    assert_same_outputs(first, baseline)
    assert all(out["num_cached_tokens"] == 0 for out in first)

    # The same tenant, its token read from a file: every loadable block comes from the node.
    token_file = tmp_path / "alpha.token"
    token_file.write_text("alpha-token-1\n")
    second = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(auth_server, token_file=str(token_file)))
    assert_same_outputs(second, baseline)
    for prompt, out in zip(PROMPTS, second, strict=True):
        assert out["num_cached_tokens"] >= loadable_tokens(prompt), out

    # Another tenant has its own key space: nothing of alpha's is visible to it.
    other_tenant = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(auth_server, token="beta-token-1"))
    assert_same_outputs(other_tenant, baseline)
    assert all(out["num_cached_tokens"] == 0 for out in other_tenant)

    # An unknown token is refused by the node: the connector treats the cache as empty.
    unknown = run_engine(tmp_path, tiny_model, PROMPTS, kv_config(auth_server, token="not-a-token", timeout_s=1.0))
    assert_same_outputs(unknown, baseline)
    assert all(out["num_cached_tokens"] == 0 for out in unknown)
