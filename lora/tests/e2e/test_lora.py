"""kvcache-lora end to end: real `vllm serve` instances on CPU with runtime LoRA loading, the
manager placing and loading two locally made adapters, and the gateway routing each adapter's
requests where the manager says it is Ready. The tests share one stack (conftest) and run in
file order: declare, route, keep KV apart, fail a broken adapter, restart an instance, delete.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from urllib.parse import urlparse

from conftest import BLOCK_SIZE, LAYERS, LoraStack, manager_config
from gwstack import KEY, Answer, call, wait_for
from lorastack import listed_adapters

ADAPTERS = ("sql-lora", "chat-lora")


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


def via_gateway(stack: LoraStack, model: str, tokens: list[int], max_tokens: int = 12) -> Answer:
    body = {"model": model, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0.0}
    return stack.gateway.post("/v1/completions", body)


def direct(url: str, model: str, tokens: list[int], max_tokens: int = 12) -> str:
    body = {"model": model, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0.0}
    answer = call("POST", f"{url}/v1/completions", body)
    assert answer.status == 200, answer.body
    return answer.json()["choices"][0]["text"]


def text(answer: Answer) -> str:
    assert answer.status == 200, answer.body
    return answer.json()["choices"][0]["text"]


def ready_on(stack: LoraStack, name: str) -> list[str]:
    adapter = stack.manager.adapters().get(name)
    return [i["url"] for i in adapter["instances"] if i["state"] == "Ready"] if adapter else []


def consistent(stack: LoraStack) -> bool:
    """The manager's view equals what every instance's /v1/models lists: an adapter is loaded
    (Ready, or Draining before its unload) exactly where the engine lists it."""
    managed = stack.manager.adapters()
    listed = {e.url: listed_adapters(e.url) for e in stack.engines}
    for name in set(managed) | {a for names in listed.values() for a in names}:
        held = {i["url"] for i in managed.get(name, {}).get("instances", []) if i["state"] in ("Ready", "Draining")}
        if held != {url for url, names in listed.items() if name in names}:
            return False
    return True


def assert_consistent(stack: LoraStack) -> None:
    # A load the engine just finished shows in /v1/models a pass before the manager's view.
    wait_for("the manager's view to match every /v1/models", lambda: consistent(stack), timeout=10)


def test_each_declared_adapter_is_loaded_on_one_instance(stack: LoraStack):
    # sql-lora comes from the config file; chat-lora through the API.
    created = stack.manager.post({"name": "chat-lora", "base_model": "tiny", "path": str(stack.adapters["chat-lora"])})
    assert created.status == 201, created.body
    assert created.json()["phase"] in ("Pending", "Loading")
    again = stack.manager.post({"name": "chat-lora", "base_model": "tiny", "path": str(stack.adapters["chat-lora"])})
    assert again.status == 200, "declaring the same adapter again changes nothing"
    other = stack.manager.post({"name": "chat-lora", "base_model": "tiny", "path": str(stack.adapters["sql-lora"])})
    assert other.status == 409 and "DELETE it first" in other.json()["error"]["message"]
    bad = stack.manager.post({"name": "x", "base_model": "tiny", "path": "relative/dir"})
    assert bad.status == 400 and "absolute" in bad.json()["error"]["message"]
    wait_for("both adapters Ready", lambda: all(stack.manager.adapters()[a]["phase"] == "Ready" for a in ADAPTERS))
    places = {a: ready_on(stack, a) for a in ADAPTERS}
    assert all(len(p) == 1 for p in places.values()), places
    assert places["sql-lora"] != places["chat-lora"], f"least-loaded spreads one-replica adapters: {places}"
    assert_consistent(stack)
    assert stack.manager.metric("kvcache_lora_adapters", phase="Ready") == 2
    assert stack.manager.metric("kvcache_lora_operations_total", op="load", outcome="ok") == 2


def test_an_adapters_requests_go_only_where_it_is_ready_with_that_instances_tokens(stack: LoraStack):
    for name in ADAPTERS:
        (home,) = ready_on(stack, name)
        wait_for(f"the gateway to route {name}", lambda n=name: via_gateway(stack, n, [5, 6, 7]).status == 200)
        for i in range(4):
            tokens = prompt(BLOCK_SIZE + 20, 100 + i)
            answer = via_gateway(stack, name, tokens)
            assert answer.headers["x-kvcache-backend"] == home, f"{name} went to {answer.headers['x-kvcache-backend']}"
            assert text(answer) == direct(home, name, tokens), "the same tokens as the instance itself gives"
    tokens = prompt(BLOCK_SIZE + 20, 100)
    outputs = {m: text(via_gateway(stack, m, tokens)) for m in ("tiny", *ADAPTERS)}
    assert len(set(outputs.values())) == 3, f"each adapter changes the model's tokens: {outputs}"
    # The base model goes anywhere: a burst of distinct prompts, sent before any answer is read,
    # lands on both instances.
    url = urlparse(stack.gateway.url)
    conns = [http.client.HTTPConnection(url.hostname, url.port, timeout=120) for _ in range(6)]
    for i, c in enumerate(conns):
        body = {"model": "tiny", "prompt": prompt(2 * BLOCK_SIZE, 300 + i), "max_tokens": 4}
        c.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    backends = set()
    for c in conns:
        r = c.getresponse()
        r.read()
        assert r.status == 200
        backends.add(r.getheader("x-kvcache-backend"))
        c.close()
    assert backends == {e.url for e in stack.engines}


def test_two_adapters_never_load_each_others_kv_from_the_cache(stack: LoraStack):
    (sql_home,) = ready_on(stack, "sql-lora")
    (chat_home,) = ready_on(stack, "chat-lora")
    sql_engine, chat_engine = stack.engine(sql_home), stack.engine(chat_home)
    tokens = prompt(3 * BLOCK_SIZE + 5, 777)
    per_prompt = 3 * LAYERS

    def stored() -> float:
        return stack.cache.metric("kvcache_blocks_stored")

    def loaded(engine) -> float:
        return engine.metric("vllm:kvcache_loaded_blocks_total")

    before = stored()
    base_text = direct(sql_home, "tiny", tokens)
    wait_for("the base model's blocks saved", lambda: stored() == before + per_prompt)
    loaded_sql, loaded_chat = loaded(sql_engine), loaded(chat_engine)
    # sql-lora on the instance that just computed the base model's blocks: nothing to load
    # (another namespace), and its own blocks are saved beside them.
    sql_text = text(via_gateway(stack, "sql-lora", tokens))
    wait_for("sql-lora's blocks saved under its own keys", lambda: stored() == before + 2 * per_prompt)
    # chat-lora on the other instance: sql-lora's blocks are in the cache, and are not its own.
    chat_text = text(via_gateway(stack, "chat-lora", tokens))
    wait_for("chat-lora's blocks saved under its own keys", lambda: stored() == before + 3 * per_prompt)
    assert (loaded(sql_engine), loaded(chat_engine)) == (loaded_sql, loaded_chat), "no adapter loaded a block"
    assert len({base_text, sql_text, chat_text}) == 3
    # The control: the base model on the other instance loads the base model's blocks.
    assert direct(chat_home, "tiny", tokens) == base_text
    wait_for("the base model's blocks loaded", lambda: loaded(chat_engine) >= loaded_chat + per_prompt)
    # And an adapter's answer is its own, cache or not: asked again on its instance.
    assert direct(chat_home, "chat-lora", tokens) == chat_text


def test_a_broken_adapter_ends_failed_with_the_engines_error_and_the_others_are_unaffected(stack: LoraStack):
    broken_dir = str(stack.adapters["broken-lora"])
    answer = stack.manager.post({"name": "broken-lora", "base_model": "tiny", "path": broken_dir})
    assert answer.status == 201, answer.body
    wait_for("broken-lora Failed", lambda: stack.manager.adapters()["broken-lora"]["phase"] == "Failed", timeout=60)
    broken = stack.manager.adapters()["broken-lora"]
    assert broken["retries"] == 3, broken
    assert "deserializing" in broken["error"], broken["error"]

    def refusals() -> float:
        return stack.manager.metric("kvcache_lora_operations_total", op="load", outcome="refused")

    assert refusals() == 3
    time.sleep(2)
    assert refusals() == 3, "no retry after Failed"
    assert all(stack.manager.adapters()[a]["phase"] == "Ready" for a in ADAPTERS)
    wait_for("the gateway to see it Failed", lambda: via_gateway(stack, "broken-lora", [5]).status == 503)
    refused = via_gateway(stack, "broken-lora", [5])
    assert "failed to load" in refused.json()["error"]["message"]
    assert via_gateway(stack, "sql-lora", [5, 6]).status == 200
    assert stack.manager.delete("broken-lora").status == 202
    wait_for("broken-lora gone", lambda: stack.manager.adapter("broken-lora").status == 404)
    assert_consistent(stack)


def test_a_killed_instance_gets_its_adapters_back_untouched(stack: LoraStack):
    (home,) = ready_on(stack, "sql-lora")
    engine = stack.engine(home)
    tokens = prompt(BLOCK_SIZE, 55)
    before = text(via_gateway(stack, "sql-lora", tokens))
    lost = stack.manager.metric("kvcache_lora_lost_total")
    engine.kill()
    wait_for("sql-lora not Ready", lambda: not ready_on(stack, "sql-lora"))
    assert stack.manager.adapters()["sql-lora"]["phase"] == "Loading"
    # The gateway sees its backend down at once, and the manager's Loading at its next read.
    refused = wait_for(
        "the gateway to say sql-lora is loading",
        lambda: (a := via_gateway(stack, "sql-lora", [5])).status == 503 and "Loading" in a.body.decode() and a,
    )
    assert refused.headers.get("retry-after") == "2"
    engine.start()
    engine.wait_ready()
    wait_for("sql-lora Ready again", lambda: ready_on(stack, "sql-lora") == [home], timeout=60)
    assert "sql-lora" in listed_adapters(home)
    assert stack.manager.metric("kvcache_lora_lost_total") >= lost + 1
    wait_for("the gateway to route sql-lora again", lambda: via_gateway(stack, "sql-lora", [5]).status == 200)
    assert text(via_gateway(stack, "sql-lora", tokens)) == before
    assert_consistent(stack)


def test_deleting_adapters_unloads_them_everywhere_after_their_requests_finish(stack: LoraStack):
    (chat_home,) = ready_on(stack, "chat-lora")
    engine = stack.engine(chat_home)
    result: dict[str, object] = {}

    def long_request() -> None:
        # A thousand tokens: seconds of decoding on CPU, well past the drain grace.
        body = {"model": "chat-lora", "prompt": [5, 6, 7], "max_tokens": 1000, "ignore_eos": True, "temperature": 0.0}
        result["answer"] = stack.gateway.post("/v1/completions", body)

    worker = threading.Thread(target=long_request)
    worker.start()
    wait_for("the long request running", lambda: engine.metric("vllm:num_requests_running") >= 1)
    deleted = stack.manager.delete("chat-lora")
    assert deleted.status == 202 and deleted.json()["phase"] == "Unloading"
    wait_for("the gateway to stop routing chat-lora", lambda: via_gateway(stack, "chat-lora", [5]).status == 404)
    # Past the drain grace, the request still runs: the adapter stays loaded under it.
    time.sleep(1.5)
    assert worker.is_alive(), "the request ended before the drain grace did: the test proves nothing"
    assert "chat-lora" in listed_adapters(chat_home), "unloaded under a running request"
    assert stack.manager.adapters()["chat-lora"]["instances"][0]["state"] == "Draining"
    worker.join(timeout=120)
    answer = result["answer"]
    assert isinstance(answer, Answer) and answer.status == 200, answer
    assert answer.json()["usage"]["completion_tokens"] == 1000
    wait_for("chat-lora unloaded", lambda: "chat-lora" not in listed_adapters(chat_home))
    wait_for("chat-lora forgotten", lambda: stack.manager.adapter("chat-lora").status == 404)
    assert_consistent(stack)
    # sql-lora is the file's: the API refuses to delete it, the file can.
    refused = stack.manager.delete("sql-lora")
    assert refused.status == 409 and "config file" in refused.json()["error"]["message"]
    stack.manager.config.write_text(manager_config(stack.engines, stack.adapters, []))
    wait_for(
        "sql-lora unloaded everywhere", lambda: not any("sql-lora" in listed_adapters(e.url) for e in stack.engines)
    )
    wait_for("sql-lora forgotten", lambda: stack.manager.adapters() == {})
    assert_consistent(stack)
    assert via_gateway(stack, "sql-lora", [5]).status in (404, 503)
    wait_for("the gateway to forget sql-lora", lambda: via_gateway(stack, "sql-lora", [5]).status == 404)
    assert stack.manager.metric("kvcache_lora_operations_total", op="unload", outcome="ok") == 2
