"""`kvcache.Registration` against a real etcd: the record appears under its key with a lease and
disappears at once on close() (renewal after etcd loses a lease is the Rust loop's, tested in
kvcache-membership's etcd contract tests)."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path

import pytest

import kvcache
from kvserver import start_etcd


def read(etcd_url: str, key: str) -> str | None:
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{etcd_url}/v3/kv/range", data=body), timeout=5) as r:
        kvs = json.loads(r.read()).get("kvs", [])
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_registration_lives_under_its_key_until_closed(tmp_path: Path):
    etcd = start_etcd(str(tmp_path / "etcd"))
    try:
        key = "/kvcache/engines/127.0.0.1:8000"
        record = json.dumps({"url": "http://127.0.0.1:8000", "model": "tiny"})
        reg = kvcache.Registration(etcd.url.replace("http://", "etcd://"), key, record, ttl_s=2)
        assert reg.key == key
        assert wait_until(lambda: read(etcd.url, key) == record), "the record never appeared"
        assert wait_until(lambda: reg.registered)
        reg.close()
        assert read(etcd.url, key) is None, "close() revokes the lease at once"
        assert not reg.registered
    finally:
        etcd.proc.kill()
        etcd.proc.wait()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        kvcache.Registration("not a url", "/k", "v")
    with pytest.raises(ValueError):
        kvcache.Registration("etcd://127.0.0.1:2379", "/k", "v", ttl_s=1)
