"""Prefill/decode disaggregation end to end: a real kvcache-server, a `vllm serve` prefill
instance (connector `kv_role` kv_producer) and a decode instance (kv_consumer), and two gateways
in front: one that always disaggregates (`pd_bypass_tokens = 0`) and one with the default bypass
rule. The tests share the stack and run in file order; the last two kill the cache node and
then the prefill instance.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest

from gwstack import FAST_HEALTH, KEY, Gateway, call, lookup_namespace, wait_for
from kvserver import Server, free_port, start_server, stop_server
from vllm_serve import Serve, require_model

BLOCK_SIZE = 128


@dataclass
class PdStack:
    cache: Server
    prefill: Serve
    decode: Serve
    # Always disaggregates; and the default bypass rule.
    always: Gateway
    default: Gateway


def _connector(cache: Server, role: str) -> dict:
    return {
        "kv_connector": "KVCacheConnector",
        "kv_connector_module_path": "kvcache_vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"servers": [cache.data], "timeout_s": 1.0},
    }


def _gateway_config(model, cache: Server, prefill: Serve, decode: Serve, events: int, ns: str, routing: str) -> str:
    return f"""
listen = "127.0.0.1:0"
strategy = "cache-aware"
tokenizer = "{model}"
cache = ["{cache.data}"]

[[backend]]
url = "{prefill.url}"
role = "prefill"
namespace = "{ns}"

[[backend]]
url = "{decode.url}"
role = "decode"
namespace = "{ns}"
kv_events = "tcp://127.0.0.1:{events}"
kv_events_topic = "kv"
{FAST_HEALTH}
[routing]
cache_lookup_timeout_ms = 200
{routing}

[[api_key]]
key = "{KEY}"
"""


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdStack]:
    model = require_model("tiny")
    work = tmp_path_factory.mktemp("gateway-pd")
    cache = start_server("--memory", "256MiB")
    events = free_port()
    kv_events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{events}",
        "topic": "kv",
    }
    prefill = Serve(model, _connector(cache, "kv_producer"), work / "prefill.log", wait=False, core=0)
    decode = Serve(
        model,
        _connector(cache, "kv_consumer"),
        work / "decode.log",
        extra=["--kv-events-config", json.dumps(kv_events)],
        wait=False,
        core=1,
    )
    gateways: list[Gateway] = []
    try:
        prefill.wait_ready()
        decode.wait_ready()
        ns = lookup_namespace(prefill.log)
        assert lookup_namespace(decode.log) == ns, "a prefill and a decode engine of one model share a namespace"
        for name, routing in [("always", "pd_bypass_tokens = 0"), ("default", "")]:
            (work / name).mkdir()
            config = _gateway_config(model, cache, prefill, decode, events, ns, routing)
            gateways.append(Gateway(config, work / name))
        for g in gateways:
            wait_for("both pools up", lambda g=g: call("GET", g.url + "/health").status == 200)
        yield PdStack(cache, prefill, decode, *gateways)
    finally:
        for g in gateways:
            g.stop()
        prefill.stop()
        decode.stop()
        if cache.proc.poll() is None:
            stop_server(cache)


def settles(what: str, read, expected: float) -> None:
    """`read()` reaches `expected` within a few seconds (vLLM updates /metrics just after it
    answers) and stays there."""
    wait_for(what, lambda: read() >= expected, timeout=10)
    assert read() == expected, (what, read(), expected)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


def text_of(answer_json: dict, chat: bool) -> str:
    choice = answer_json["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def streamed_text(raw: bytes, chat: bool) -> str:
    lines = [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", raw[-300:]
    events = [json.loads(line) for line in lines[:-1]]
    return "".join((c["delta"].get("content") or "") if chat else c["text"] for e in events for c in e["choices"])


def test_health_needs_both_pools_and_says_so(pd: PdStack):
    health = call("GET", pd.always.url + "/health")
    assert health.status == 200, health.body
    assert health.json()["prefill_up"] == 1 and health.json()["decode_up"] == 1
    assert pd.always.metric("kvcache_gateway_pd_pool_up", role="prefill") == 1


def test_outputs_equal_one_instance_doing_both_streamed_or_not(pd: PdStack):
    cases = [
        ("/v1/completions", {"prompt": prompt(300, 11), "max_tokens": 12}),
        (
            "/v1/completions",
            {"prompt": "the prefill engine hands its blocks to the decode engine " * 12, "max_tokens": 12},
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hello disaggregated " * 30}], "max_tokens": 12},
        ),
    ]
    for path, extra in cases:
        chat = path.endswith("chat/completions")
        body = {"model": "tiny", "temperature": 0.0, **extra}
        # One instance that does both: the decode instance alone, sent the request itself,
        # before any leg stored this prompt anywhere (it computes every token).
        direct = call("POST", pd.decode.url + path, body)
        assert direct.status == 200, direct.body
        # Another prompt's worth of state would let the decode instance skip its loads: a new
        # salt makes the same request new to every cache (vLLM's and ours).
        salted = {**body, "cache_salt": f"pd-{path.rsplit('/', 1)[1]}-{len(str(extra))}"}
        disaggregated = pd.always.metric("kvcache_gateway_pd_requests_total", path="disaggregated")
        via = pd.always.post(path, salted)
        assert via.status == 200, via.body
        assert via.headers["x-kvcache-backend"] == pd.decode.url
        assert via.headers["x-kvcache-prefill"] == pd.prefill.url
        assert text_of(via.json(), chat) == text_of(direct.json(), chat), path
        streamed = pd.always.post(path, {**salted, "cache_salt": salted["cache_salt"] + "-s", "stream": True})
        assert streamed.status == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed_text(streamed.body, chat) == text_of(direct.json(), chat), path
        after = pd.always.metric("kvcache_gateway_pd_requests_total", path="disaggregated")
        assert after == disaggregated + 2


def test_the_prefill_makes_one_token_and_the_decode_loads_every_full_block(pd: PdStack):
    for i, n in enumerate([300, 512, 129]):
        tokens = prompt(n, 100 + i)
        generated = pd.prefill.metric("vllm:generation_tokens_total")
        hits = pd.decode.metric("vllm:external_prefix_cache_hits_total")
        local = pd.decode.metric("vllm:prefix_cache_hits_total")
        answer = pd.always.post(
            "/v1/completions", {"model": "tiny", "prompt": tokens, "max_tokens": 8, "temperature": 0}
        )
        assert answer.status == 200, answer.body
        settles("the prefill leg's one token", lambda: pd.prefill.metric("vllm:generation_tokens_total"), generated + 1)
        # vLLM computes at least the prompt's last token itself: every full block before it loads.
        expected = hits + (n - 1) // BLOCK_SIZE * BLOCK_SIZE
        settles(
            f"{n}-token prompt's loaded blocks",
            lambda: pd.decode.metric("vllm:external_prefix_cache_hits_total"),
            expected,
        )
        loaded = expected - hits
        computed = n - loaded - (pd.decode.metric("vllm:prefix_cache_hits_total") - local)
        assert computed <= BLOCK_SIZE, (n, computed)


def test_a_prompt_the_decode_instance_holds_skips_the_prefill_leg(pd: PdStack):
    gw = pd.default
    tokens = prompt(4 * BLOCK_SIZE + 40, 200)
    first = gw.post("/v1/completions", {"model": "tiny", "prompt": tokens, "max_tokens": 4, "temperature": 0})
    assert first.status == 200 and first.headers.get("x-kvcache-prefill") == pd.prefill.url
    # The decode instance's KV events tell the gateway it holds the prompt's blocks now.
    longer = tokens + prompt(20, 201)
    wait_for(
        "the decode instance's events",
        lambda: gw.explain({"model": "tiny", "prompt": longer})["candidates"][0]["local_blocks"] >= 4,
    )
    bypassed = gw.metric("kvcache_gateway_pd_requests_total", path="bypass", reason="cached")
    generated = pd.prefill.metric("vllm:generation_tokens_total")
    second = gw.post("/v1/completions", {"model": "tiny", "prompt": longer, "max_tokens": 4, "temperature": 0})
    assert second.status == 200, second.body
    assert second.headers["x-kvcache-backend"] == pd.decode.url
    assert "x-kvcache-prefill" not in second.headers
    assert gw.metric("kvcache_gateway_pd_requests_total", path="bypass", reason="cached") == bypassed + 1
    assert pd.prefill.metric("vllm:generation_tokens_total") == generated, "no prefill leg ran"


def test_a_client_that_disconnects_cancels_the_decode_leg(pd: PdStack):
    target = urlparse(pd.always.url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
    body = {"model": "tiny", "prompt": prompt(300, 250), "max_tokens": 1700, "ignore_eos": True, "stream": True}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    generated_before = pd.decode.metric("vllm:generation_tokens_total")
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    response = conn.getresponse()
    assert response.status == 200 and response.fp is not None
    assert response.getheader("x-kvcache-prefill") == pd.prefill.url
    response.fp.readline()  # the first chunk: the decode engine is generating
    conn.close()
    wait_for(
        "the decode engine to drop the request",
        lambda: pd.decode.metric("vllm:num_requests_running") == 0,
        timeout=30,
    )
    generated = pd.decode.metric("vllm:generation_tokens_total") - generated_before
    assert generated < 1700, f"the decode leg ran to the end ({generated} tokens): it was not cancelled"


def test_requests_sharing_a_cached_prefix_in_one_step_are_saved_once(pd: PdStack):
    # A prefill engine saves every prompt block, its cached ones too: requests of one step that
    # extend one cached prefix share its blocks, and a save naming a block twice was refused by
    # the client (and took the engine down with it).
    base = prompt(2 * BLOCK_SIZE, 260)
    first = call("POST", pd.prefill.url + "/v1/completions", {"model": "tiny", "prompt": base, "max_tokens": 1})
    assert first.status == 200, first.body
    answers: list = [None] * 4

    def send(i: int) -> None:
        body = {"model": "tiny", "prompt": base + prompt(BLOCK_SIZE + 5, 270 + i), "max_tokens": 1}
        answers[i] = call("POST", pd.prefill.url + "/v1/completions", body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(a is not None and a.status == 200 for a in answers), [a and a.status for a in answers]
    assert call("GET", pd.prefill.url + "/health").status == 200


def test_a_cache_node_lost_between_the_legs_means_recompute_not_wrong_tokens(pd: PdStack):
    tokens = prompt(3 * BLOCK_SIZE + 10, 300)
    body = {"model": "tiny", "prompt": tokens, "max_tokens": 10, "temperature": 0}
    # What the tokens must be: the prefill instance computing the whole request itself.
    expected = call("POST", pd.prefill.url + "/v1/completions", body)
    assert expected.status == 200
    leg = call(
        "POST",
        pd.prefill.url + "/v1/completions",
        {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    assert leg.status == 200, leg.body
    params = leg.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["kvcache"]["blocks"] == 3, params
    pd.cache.proc.kill()
    pd.cache.proc.wait()
    started = time.monotonic()
    decoded = call("POST", pd.decode.url + "/v1/completions", {**body, "kv_transfer_params": params})
    took = time.monotonic() - started
    assert decoded.status == 200, decoded.body
    assert decoded.json()["choices"][0]["text"] == expected.json()["choices"][0]["text"]
    deadline_s = params["kvcache"]["deadline_unix_ms"] / 1000 - time.time()
    assert took < 20 and deadline_s > 0, (took, deadline_s)


def test_a_killed_prefill_instance_costs_no_request(pd: PdStack):
    gw = pd.always
    pd.prefill.kill()
    fallbacks = gw.metric("kvcache_gateway_pd_requests_total", path="fallback") + gw.metric(
        "kvcache_gateway_pd_requests_total", path="bypass", reason="no_prefill"
    )
    for i in range(4):
        answer = gw.post(
            "/v1/completions", {"model": "tiny", "prompt": prompt(200, 400 + i), "max_tokens": 4, "temperature": 0}
        )
        assert answer.status == 200, answer.body
        assert answer.headers["x-kvcache-backend"] == pd.decode.url
    after = gw.metric("kvcache_gateway_pd_requests_total", path="fallback") + gw.metric(
        "kvcache_gateway_pd_requests_total", path="bypass", reason="no_prefill"
    )
    assert after == fallbacks + 4
    health = wait_for("/health to say the prefill pool is empty", lambda: call("GET", gw.url + "/health").status == 503)
    assert health
    assert call("GET", gw.url + "/health").json()["prefill_up"] == 0
