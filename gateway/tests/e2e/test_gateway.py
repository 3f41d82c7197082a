"""kvcache-gateway end to end: real `vllm serve` instances on CPU (with the kvcache connector and
KV events), a real kvcache-server, and the gateway binary. The tests share one stack (conftest)
and run in file order; the last one kills and restarts a backend.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections import Counter
from urllib.parse import urlparse

from conftest import BLOCK_SIZE, ENGINE_BLOCKS, KEY, LIMITED_KEY, OTHER_MODEL_KEY, Stack, call, wait_for


def prompt(n: int, seed: int) -> list[int]:
    """Token ids inside the tiny model's vocabulary."""
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


def completion(stack: Stack, body: dict, **kw):
    answer = stack.gateway.post("/v1/completions", {"model": "tiny", "temperature": 0.0, **body}, **kw)
    assert answer.status == 200, answer.body
    return answer


def sse_events(raw: bytes) -> list[dict]:
    """The JSON events of an SSE body, checking it ends with [DONE]."""
    lines = [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", raw[-300:]
    return [json.loads(line) for line in lines[:-1]]


def test_models_health_and_metrics(stack: Stack):
    gw = stack.gateway
    models = gw.get("/v1/models")
    assert models.status == 200
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]
    health = call("GET", gw.url + "/health")
    assert health.status == 200 and health.json()["backends_up"] == 2
    assert gw.metric("kvcache_gateway_index_budget_blocks") > 0


def test_outputs_equal_a_direct_request_streamed_or_not(stack: Stack):
    gw = stack.gateway
    cases = [
        ("/v1/completions", {"prompt": "hello world client rust tensor", "max_tokens": 12}),
        ("/v1/completions", {"prompt": prompt(200, 1), "max_tokens": 12}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello vllm layer"}], "max_tokens": 12}),
    ]
    for path, extra in cases:
        body = {"model": "tiny", "temperature": 0.0, **extra}
        via = gw.post(path, body)
        assert via.status == 200, via.body
        backend = via.headers["x-kvcache-backend"]
        assert backend in [e.url for e in stack.engines]
        assert via.headers["x-request-id"]
        direct = call("POST", backend + path, body)
        assert direct.status == 200
        chat = path.endswith("chat/completions")

        def text(choice: dict, chat: bool = chat) -> str:
            return choice["message"]["content"] if chat else choice["text"]

        assert text(via.json()["choices"][0]) == text(direct.json()["choices"][0]), path
        streamed = gw.post(path, {**body, "stream": True})
        assert streamed.status == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        events = sse_events(streamed.body)
        assert len(events) > 2, "the stream came in chunks"
        pieces = [(c["delta"].get("content") or "") if chat else c["text"] for e in events for c in e["choices"]]
        assert "".join(pieces) == text(direct.json()["choices"][0]), path


def test_request_ids_are_propagated(stack: Stack):
    answer = stack.gateway.post(
        "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 1}, headers={"x-request-id": "e2e-id-42"}
    )
    assert answer.status == 200
    assert answer.headers["x-request-id"] == "e2e-id-42"
    assert "e2e-id-42" in answer.json()["id"], "the backend saw the same request id"


def test_prompt_tokens_are_the_engines_own(stack: Stack):
    gw, engine = stack.gateway, stack.engines[0]
    text = "hello world, the client loads a tensor layer from memory"
    mine = gw.explain({"model": "tiny", "prompt": text})["token_ids"]
    theirs = call("POST", engine.url + "/tokenize", {"model": "tiny", "prompt": text}).json()["tokens"]
    assert mine == theirs
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "store and load"}]
    mine = gw.explain({"model": "tiny", "messages": messages}, chat=True)["token_ids"]
    theirs = call("POST", engine.url + "/tokenize", {"model": "tiny", "messages": messages}).json()["tokens"]
    assert mine == theirs


def test_an_extended_prompt_goes_to_the_instance_holding_its_prefix(stack: Stack):
    gw = stack.gateway
    base = prompt(3 * BLOCK_SIZE + 10, 11)
    holder = completion(stack, {"prompt": base, "max_tokens": 1}).headers["x-kvcache-backend"]
    # The holder's KV events reach the index.
    wait_for(
        "the index to hold the prompt's blocks",
        lambda: (
            {c["backend"]: c["local_blocks"] for c in gw.explain({"model": "tiny", "prompt": base})["candidates"]}[
                holder
            ]
            == 3
        ),
    )
    engine = stack.engine(holder)
    hits_before = engine.metric("vllm:prefix_cache_hits_total")
    for i in range(4):
        extended = base + prompt(2 * BLOCK_SIZE, 100 + i)
        chosen = completion(stack, {"prompt": extended, "max_tokens": 1}).headers["x-kvcache-backend"]
        assert chosen == holder, f"turn {i} went to {chosen}, not the prefix holder {holder}"
    assert engine.metric("vllm:prefix_cache_hits_total") >= hits_before + 4 * 3 * BLOCK_SIZE
    assert gw.metric("kvcache_gateway_predicted_local_blocks_total") >= 4 * 3


def test_a_burst_sharing_one_long_prefix_is_spread(stack: Stack):
    """Eight requests that arrive before any of them has been prefilled: each one's pending
    prefill counts against its instance, so they do not all follow the first one. (Once the
    first holder has the prefix, sending more there is the cheaper choice: the test fires
    the whole burst at once so that it measures the arrival, not the thread scheduler.)"""
    shared = prompt(6 * BLOCK_SIZE, 21)
    bodies = [{"model": "tiny", "prompt": shared + prompt(64, 200 + i), "max_tokens": 8} for i in range(8)]
    url = urlparse(stack.gateway.url)
    conns = [http.client.HTTPConnection(url.hostname, url.port, timeout=120) for _ in bodies]
    for c in conns:
        c.connect()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    for c, body in zip(conns, bodies, strict=True):
        c.request("POST", "/v1/completions", json.dumps({"temperature": 0.0, **body}), headers)
    chosen: list[str] = []
    for c in conns:
        r = c.getresponse()
        r.read()
        assert r.status == 200
        chosen.append(r.getheader("x-kvcache-backend") or "")
        c.close()
    counts = Counter(chosen)
    assert len(counts) == 2 and min(counts.values()) >= 2, f"the burst piled up: {counts}"


def test_the_shared_tier_credit_sees_what_the_connector_saved(stack: Stack):
    gw = stack.gateway
    p = prompt(4 * BLOCK_SIZE + 5, 31)
    fresh = gw.explain({"model": "tiny", "prompt": p})
    assert all(c["shared_blocks"] == 0 for c in fresh["candidates"])
    completion(stack, {"prompt": p, "max_tokens": 1})
    # The connector saved the prompt's full blocks to the cache node; the gateway asks it with
    # the engines' own namespace and keys, so every candidate now gets the credit.
    after = wait_for(
        "the shared tier to report the saved blocks",
        lambda: (lambda e: e if all(c["shared_blocks"] >= 3 for c in e["candidates"]) else None)(
            gw.explain({"model": "tiny", "prompt": p})
        ),
    )
    assert len(after["candidates"]) == 2
    assert gw.metric("kvcache_gateway_cache_lookup_errors_total") == 0


def test_engines_registered_in_etcd_are_found_and_routed_like_configured_ones(stack: Stack):
    gw = stack.discovering
    wait_for("the discovering gateway to find both engines", lambda: gw.metric("kvcache_gateway_backend_up") == 2)
    assert gw.metric("kvcache_gateway_index_source", source="events") == 2, "their KV events came with them"
    p = prompt(3 * BLOCK_SIZE + 7, 61)
    holder = completion(stack, {"prompt": p, "max_tokens": 1}).headers["x-kvcache-backend"]

    def rows() -> dict[str, dict]:
        return {c["backend"]: c for c in gw.explain({"model": "tiny", "prompt": p})["candidates"]}

    # The engine's own cache (its KV events) and the shared tier (its registered namespace).
    wait_for("the holder's blocks in the discovered index", lambda: rows()[holder]["local_blocks"] == 3)
    assert all(c["shared_blocks"] >= 3 for c in rows().values()), rows()
    # With the shared tier holding the prefix too, affinity is worth little (a load costs a tenth
    # of a compute): the holder wins once the load its first request left is gone from the scrape.
    longer = {"model": "tiny", "prompt": p + prompt(20, 62), "max_tokens": 1}
    wait_for("the holder to be the choice", lambda: gw.explain(longer)["choice"] == holder, timeout=15)
    answer = gw.post("/v1/completions", longer)
    assert answer.status == 200 and answer.headers["x-kvcache-backend"] == holder


def test_the_index_forgets_blocks_an_engine_evicted(stack: Stack):
    gw = stack.gateway
    target = stack.engines[1]
    p = prompt(2 * BLOCK_SIZE + 3, 41)
    call("POST", target.url + "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 1})

    def local() -> int:
        rows = gw.explain({"model": "tiny", "prompt": p})["candidates"]
        return next(c["local_blocks"] for c in rows if c["backend"] == target.url)

    wait_for("the index to learn the engine's blocks from its events", lambda: local() == 2)
    removed_before = gw.metric("kvcache_gateway_kv_events_total", backend=target.url, kind="removed")
    # Fill the engine's small KV cache with other prompts until it evicts ours.
    for i in range(ENGINE_BLOCKS // 4 + 4):
        call(
            "POST",
            target.url + "/v1/completions",
            {"model": "tiny", "prompt": prompt(4 * BLOCK_SIZE + 1, 500 + i), "max_tokens": 1},
        )
    wait_for("the index to forget the evicted blocks", lambda: local() == 0)
    assert gw.metric("kvcache_gateway_kv_events_total", backend=target.url, kind="removed") > removed_before
    assert gw.metric("kvcache_gateway_index_blocks") <= gw.metric("kvcache_gateway_index_budget_blocks")


def test_refusals_get_their_status_and_body_and_never_reach_a_backend(stack: Stack):
    gw = stack.gateway
    seen_before = stack.posts_seen()
    ok = {"model": "tiny", "prompt": "hello", "max_tokens": 1}
    cases = [
        (gw.post("/v1/completions", None, raw=b"{not json"), 400, "invalid_request"),
        (gw.post("/v1/completions", {"model": "tiny"}), 400, "invalid_request"),
        (gw.post("/v1/chat/completions", {"model": "tiny", "messages": "hi"}), 400, "invalid_request"),
        (gw.post("/v1/completions", {**ok, "model": "no-such-model"}), 404, "model_not_found"),
        (gw.post("/v1/completions", ok, key=None), 401, "invalid_api_key"),
        (gw.post("/v1/completions", ok, key="sk-wrong"), 401, "invalid_api_key"),
        (gw.post("/v1/completions", ok, key=OTHER_MODEL_KEY), 404, "model_not_found"),
        (gw.post("/v1/completions", {**ok, "prompt": "x" * 300_000}), 413, "request_too_large"),
        (gw.post("/v1/completions", ok, headers={"x-kvcache-strategy": "bogus"}), 400, "invalid_request"),
    ]
    for answer, status, code in cases:
        assert answer.status == status, (status, answer.body)
        error = answer.json()["error"]
        assert error["code"] == code and error["message"] and error["type"], error
    assert stack.posts_seen() == seen_before, "a refused request reached a backend"
    # The limited key: 2 requests a minute, the third refused with Retry-After.
    for _ in range(2):
        assert gw.post("/v1/completions", ok, key=LIMITED_KEY).status == 200
    seen_before = stack.posts_seen()
    limited = gw.post("/v1/completions", ok, key=LIMITED_KEY)
    assert limited.status == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert gw.metric("kvcache_gateway_rate_limited_total", limit="requests") >= 1
    assert stack.posts_seen() == seen_before
    assert KEY not in stack.gateway.log.read_text(), "a key was logged"


def test_a_streaming_client_that_disconnects_cancels_the_upstream_request(stack: Stack):
    # Streamed only: a non-streamed request cancelled while the engine computes was seen to run
    # to the end once under this suite (it is cancelled in a lone run); see the gateway README.
    gw = stack.gateway
    target = urlparse(gw.url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    body = {"model": "tiny", "prompt": prompt(64, 51), "max_tokens": 1900, "ignore_eos": True, "stream": True}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    generated_before = sum(e.metric("vllm:generation_tokens_total") for e in stack.engines)
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    response = conn.getresponse()
    assert response.status == 200 and response.fp is not None
    response.fp.readline()  # the first chunk: the engine is generating
    conn.close()
    # Generating 1900 tokens takes seconds; an engine that stops now was cancelled.
    wait_for(
        "the engine to drop the request",
        lambda: sum(e.metric("vllm:num_requests_running") for e in stack.engines) == 0,
        timeout=30,
    )
    generated = sum(e.metric("vllm:generation_tokens_total") for e in stack.engines) - generated_before
    assert generated < 1900, f"the request ran to the end ({generated} tokens): it was not cancelled"
    wait_for(
        "the gateway to count the cancelled request",
        lambda: gw.metric("kvcache_gateway_requests_total", status="499") >= 1,
        timeout=10,
    )


def test_a_killed_backend_costs_no_request_and_is_readmitted(stack: Stack):
    gw = stack.gateway
    victim = stack.engines[0]
    results: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        for i in range(40):
            if stop.is_set():
                return
            body = {"model": "tiny", "prompt": prompt(150, seed * 1000 + i), "max_tokens": 4, "temperature": 0.0}
            answer = gw.post("/v1/completions", body, headers={"x-kvcache-strategy": "round-robin"})
            with lock:
                results.append(answer.status)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    wait_for("requests to flow", lambda: len(results) >= 6, timeout=60)
    victim.kill()
    wait_for("more requests after the kill", lambda: len(results) >= 30, timeout=120)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert results and all(s == 200 for s in results), Counter(results)
    assert gw.metric("kvcache_gateway_backend_up", backend=victim.url) == 0
    # Taken out by whichever saw the death first: a request that failed on it (ejected, the
    # request retried elsewhere) or a probe (every 300 ms here), which can win the race.
    ejected = gw.metric("kvcache_gateway_ejections_total", backend=victim.url) >= 1
    probed_down = any(
        "backend probe failed" in line and f"backend={victim.url} " in line and "down=true" in line
        for line in gw.log.read_text().splitlines()
    )
    assert ejected or probed_down, "the killed backend was neither ejected nor probed down"
    # Its etcd record expires with its lease: the discovering gateway retires it.
    wait_for(
        "the discovering gateway to retire the killed engine",
        lambda: "retired from routing" in stack.discovering.log.read_text(),
        timeout=30,
    )
    # It comes back on the same port and the gateway takes it in again.
    victim.start()
    victim.wait_ready()
    wait_for(
        "the backend to be re-admitted",
        lambda: gw.metric("kvcache_gateway_backend_up", backend=victim.url) == 1,
        timeout=30,
    )
    wait_for(
        "the restarted engine to register again",
        lambda: stack.discovering.metric("kvcache_gateway_backend_up", backend=victim.url) == 1,
        timeout=30,
    )
    chosen = {
        gw.post(
            "/v1/completions",
            {"model": "tiny", "prompt": "hello", "max_tokens": 1},
            headers={"x-kvcache-strategy": "round-robin"},
        ).headers["x-kvcache-backend"]
        for _ in range(4)
    }
    assert victim.url in chosen
