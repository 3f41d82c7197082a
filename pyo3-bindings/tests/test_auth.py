"""Tokens from Python against a real node started with `--auth`: who is refused, and tenants
that never see each other's blocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import kvcache
from kvserver import Server, start_server, stop_server

TOKEN_A = "py-team-a-secret-01"
TOKEN_B = "py-team-b-secret-02"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path: Path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(
        f'[[tenant]]\nname = "a"\ntokens = ["{TOKEN_A}"]\n\n[[tenant]]\nname = "b"\ntokens = ["{TOKEN_B}"]\n'
    )
    s = start_server("--memory", "32MiB", "--auth", str(path))
    yield s
    stop_server(s)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_tenants_share_a_node_but_not_their_blocks(auth_server: Server, transport: str) -> None:
    a = kvcache.Client(auth_server.data, transport=transport, token=TOKEN_A)
    b = kvcache.Client(auth_server.data, transport=transport, token=TOKEN_B)
    key = bytes([transport == "shm"]) + bytes(15)
    assert a.put(key, b"tenant a's kv")
    assert b.get(key) is None
    assert b.exists([key]) == [False]
    assert b.prefix_match([key]) == 0
    assert b.put(key, b"tenant b's kv")
    assert a.get(key) == b"tenant a's kv"
    assert b.get(key) == b"tenant b's kv"


def test_a_missing_or_wrong_token_raises_permission_error(auth_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVCACHE_TOKEN", raising=False)
    with pytest.raises(PermissionError, match="--auth"):
        kvcache.Client(auth_server.data, transport="tcp")
    with pytest.raises(PermissionError, match="does not know this token"):
        kvcache.Client(auth_server.data, transport="tcp", token="not-anyones-token")


def test_the_token_comes_from_kvcache_token_when_not_given(
    auth_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVCACHE_TOKEN", TOKEN_A)
    c = kvcache.Client(auth_server.data, transport="tcp")
    assert c.put(b"\x07" * 16, b"from the environment")
    assert kvcache.Client(auth_server.data, transport="tcp", token=TOKEN_A).get(b"\x07" * 16) == (
        b"from the environment"
    )
