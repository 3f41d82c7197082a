"""Fixtures: the real kvcache-server binary on ephemeral loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvserver import Server, start_server, stop_server


@pytest.fixture
def server() -> Iterator[Server]:
    s = start_server("--memory", "256MiB", "--enable-test-hooks")
    yield s
    stop_server(s)
