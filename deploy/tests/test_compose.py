"""deploy/compose: the Compose cluster, run with images built on this machine
(deploy/images/local.sh): etcd, three cache nodes, the gateway and two vLLM CPU engines with the
connector, each container a host of its own on the project's private network.

Requests go through the gateway while a cache node is killed (`docker kill`) and brought back,
and another is cut off (`docker network disconnect`) and reconnected: every answer equals the
one an engine gave before any fault, no request fails, and every full block a prompt stored
before a loss still loads, on the other engine, from the surviving copy (the connectors write
each block to two nodes). A real Prometheus (Debian's) then scrapes the cluster and answers the
dashboard's queries that need vLLM engines and a gateway with backends that answer: the
Prometheus of the Compose file's `monitoring` profile, with deploy/prometheus's configuration.

Needs Docker with docker-compose, the images (KVCACHE_IMAGE, KVCACHE_VLLM_IMAGE, ETCD_IMAGE and
PROMETHEUS_IMAGE, as
deploy/images/local.sh prints them) and the test model (KVCACHE_VLLM_MODELS, from
scripts/setup-vllm.sh); skips without them, unless KVCACHE_REQUIRE_DOCKER=1 (scripts/test.sh),
where it fails. The cluster is started once for the module (two vLLM starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from components import REPO, free_port, prometheus_query, queries, sample_sum

COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
IMAGES = ("KVCACHE_IMAGE", "KVCACHE_VLLM_IMAGE", "ETCD_IMAGE", "PROMETHEUS_IMAGE")
ENGINES = ("vllm-1", "vllm-2")
CACHES = ("cache-1", "cache-2", "cache-3")
BLOCK = 128  # vLLM's block size on CPU
READY_S = 420


def require() -> Path:
    """The test model's directory, or a skip (a failure under KVCACHE_REQUIRE_DOCKER=1)."""
    models = Path(os.environ.get("KVCACHE_VLLM_MODELS", "/nonexistent"))
    missing = [f"{v} (deploy/images/local.sh prints it)" for v in IMAGES if not os.environ.get(v)]
    if shutil.which("docker-compose") is None:
        missing.append("docker-compose")
    if not (models / "tiny" / "config.json").exists():
        missing.append(f"the test model at {models}/tiny (scripts/setup-vllm.sh, KVCACHE_VLLM_MODELS)")
    if missing:
        message = "the Compose test needs " + ", ".join(missing)
        if os.environ.get("KVCACHE_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return models


def http(method: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers) of one request; connection errors raise."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw, status, headers = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, headers = e.read(), e.code, dict(e.headers)
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, {}, headers


def wait_for(what: str, ok: Callable[[], bool], timeout: float, diagnose: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{diagnose()}")


def prompt(blocks: int, seed: int) -> list[int]:
    """Token ids inside the tiny model's vocabulary: `blocks` full blocks and 20 more."""
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(blocks * BLOCK + 20)]


@dataclass
class Cluster:
    models: Path
    work: Path
    project: str = field(default_factory=lambda: f"kvcache-test-{os.getpid()}")
    ports: dict[str, int] = field(
        default_factory=lambda: {n: free_port() for n in ("gateway", "prometheus", *ENGINES, *CACHES)}
    )

    def __post_init__(self) -> None:
        # The engines run as uid 10001: they get a copy of the model they may read (the test
        # model's weights are private to the user who made them).
        shared = self.work / "models"
        shutil.copytree(self.models / "tiny", shared / "tiny")
        for path in [self.work, shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.env = {
            **os.environ,
            "MODEL_DIR": str(shared),
            "MODEL": "tiny",
            "GATEWAY_PORT": str(self.ports["gateway"]),
            "PROMETHEUS_PORT": str(self.ports["prometheus"]),
            "CACHE_MEMORY": "256MiB",
        }
        self.layers = json.loads((shared / "tiny" / "config.json").read_text())["num_hidden_layers"]
        self.override = self.work / "compose.test.json"
        self.files = ["--profile", "monitoring", "-f", str(COMPOSE)]
        # The engines as compose.yaml starts them, plus what CPU tests add: eager mode (no
        # compilation at start), each engine's threads on a core of its own, ports published
        # on loopback for direct requests and for Prometheus.
        resolved = yaml.safe_load(self.compose("config"))["services"]
        services: dict[str, dict] = {}
        for i, name in enumerate(ENGINES):
            services[name] = {
                "command": [*resolved[name]["command"], "--enforce-eager", "--dtype=bfloat16"],
                "ports": [f"127.0.0.1:{self.ports[name]}:8000"],
                "environment": {
                    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
                    "VLLM_CPU_OMP_THREADS_BIND": str(i % (os.cpu_count() or 1)),
                },
            }
        for name in CACHES:
            services[name] = {"ports": [f"127.0.0.1:{self.ports[name]}:7401"]}
        self.override.write_text(json.dumps({"services": services}))
        self.files += ["-f", str(self.override)]

    def compose(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            ["docker-compose", "-p", self.project, *self.files, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"docker-compose {' '.join(args)}: {done.stderr[-3000:]}"
        return done.stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--no-color", "--tail=40", *services)[-6000:]

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def metric(self, service: str, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.url(service)}/metrics", timeout=10) as r:
            return sample_sum(r.read().decode(), name, **labels)

    def stored(self, up: tuple[str, ...] = CACHES) -> float:
        return sum(self.metric(c, "kvcache_blocks_stored") for c in up)

    def settled(self, up: tuple[str, ...] = CACHES) -> float:
        """`stored` once it holds still for two seconds (the connectors save after answering)."""
        last = self.stored(up)
        for _ in range(30):
            time.sleep(2)
            now = self.stored(up)
            if now == last:
                return now
            last = now
        raise AssertionError(f"the nodes' block count never settled: {last}")

    def members(self, cache: str) -> float:
        return self.metric(cache, "kvcache_cluster_members")

    def wait_members(self, count: int, nodes: tuple[str, ...], why: str, timeout: float = 90) -> None:
        """Waits until each of `nodes` sees `count` members in its ring."""
        for n in nodes:
            wait_for(f"{n} {why}", lambda n=n: self.members(n) == count, timeout, lambda: self.logs(*CACHES))

    def healthy(self, service: str) -> bool:
        """Whether `service` answers /health; a container that exited fails the test at once."""
        state = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Status}}", self.container(service)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        assert state == "running", f"{service} is {state}:\n{self.logs(service)}"
        return http("GET", self.url(service) + "/health", timeout=5)[0] == 200

    def complete(self, service: str, tokens: list[int], **extra) -> tuple[int, dict, dict]:
        body = {"model": "tiny", "prompt": tokens, "max_tokens": 8, "temperature": 0, **extra}
        return http("POST", f"{self.url(service)}/v1/completions", body)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(require(), tmp_path_factory.mktemp("compose"))
    try:
        c.compose("up", "-d", timeout=600)
        for e in ENGINES:
            wait_for(f"{e} healthy", lambda e=e: c.healthy(e), READY_S, lambda e=e: c.logs(e))
        c.wait_members(3, CACHES, "sees three members")
        wait_for(
            "the gateway with both engines",
            lambda: (
                c.metric("gateway", "kvcache_gateway_backend_up") == 2
                and http("GET", c.url("gateway") + "/health", timeout=5)[0] == 200
            ),
            60,
            lambda: c.logs("gateway"),
        )
        yield c
    finally:
        # The whole cluster's logs stay with the test's files; then everything goes.
        try:
            (c.work / "compose.log").write_text(c.compose("logs", "--no-color", timeout=120))
        finally:
            c.compose("down", "--volumes", "--timeout", "5", timeout=300)


@dataclass
class Load:
    """Requests through the gateway on a thread, bounded in count and time, each checked
    against the answer an engine gave before any fault."""

    cluster: Cluster
    expected: dict[int, str]
    results: list[tuple[int, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    running: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.running.set()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        deadline = time.monotonic() + 300
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline and i < 400:
            if not self.running.wait(timeout=1):
                continue
            self.idle.clear()
            seed = list(self.expected)[i % len(self.expected)]
            try:
                status, body, _ = self.cluster.complete("gateway", prompt(3, seed))
                ok = status == 200 and body["choices"][0]["text"] == self.expected[seed]
            except OSError:
                status, ok = 0, False
            self.idle.set()
            self.results.append((status, ok))
            i += 1
        self.idle.set()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No request of this load in flight inside (an engine's counters are its alone)."""
        self.running.clear()
        assert self.idle.wait(timeout=150)
        try:
            yield
        finally:
            self.running.set()

    def finish(self) -> list[tuple[int, bool]]:
        self.stop.set()
        self.running.set()
        self.thread.join(timeout=150)
        assert not self.thread.is_alive()
        return self.results


def answers(c: Cluster, seeds: range, blocks: int = 3) -> dict[int, str]:
    """Each prompt's greedy answer from vllm-1 directly (storing its blocks in the cache)."""
    out = {}
    for s in seeds:
        status, body, _ = c.complete("vllm-1", prompt(blocks, s))
        assert status == 200, body
        out[s] = body["choices"][0]["text"]
    return out


def store(c: Cluster, engine: str, tokens: list[int], up: tuple[str, ...]) -> str:
    """Sends `tokens` to `engine` and waits until the nodes in `up` hold two copies of each of its
    full blocks (an entry per block and layer); the answer's text."""
    before = c.settled(up)
    status, body, _ = c.complete(engine, tokens)
    assert status == 200, body
    copies = 2 * (len(tokens) // BLOCK) * c.layers
    wait_for(f"{copies} block copies on {up}", lambda: c.stored(up) - before >= copies, 30, lambda: c.logs(engine))
    assert c.stored(up) - before == copies, "each full block on exactly two nodes"
    return body["choices"][0]["text"]


def assert_loads_every_block(c: Cluster, engine: str, tokens: list[int], expected: str) -> None:
    """`engine`, which never saw `tokens`, loads every full block but the last token's from the
    cache tier and answers as the engine that computed them did."""
    hits = c.metric(engine, "vllm:external_prefix_cache_hits_total")
    status, body, _ = c.complete(engine, tokens)
    assert status == 200, body
    assert body["choices"][0]["text"] == expected
    loaded = c.metric(engine, "vllm:external_prefix_cache_hits_total") - hits
    assert loaded == (len(tokens) - 1) // BLOCK * BLOCK, f"{engine} loaded {loaded} of {len(tokens)} tokens"


def test_the_gateway_answers_as_the_engines_do_and_names_one(cluster: Cluster):
    expected = answers(cluster, range(1, 4))
    for seed, text in expected.items():
        status, body, headers = cluster.complete("gateway", prompt(3, seed))
        assert status == 200, body
        assert body["choices"][0]["text"] == text
        assert headers["x-kvcache-backend"] in ("http://vllm-1:8000", "http://vllm-2:8000")
    status, models, _ = http("GET", cluster.url("gateway") + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]


def test_a_killed_cache_node_costs_no_request_and_no_block(cluster: Cluster):
    expected = answers(cluster, range(10, 14))
    tokens = prompt(5, 100)
    text = store(cluster, "vllm-1", tokens, CACHES)
    load = Load(cluster, expected)
    cluster.compose("kill", "cache-2")
    with load.paused():
        assert_loads_every_block(cluster, "vllm-2", tokens, text)
    survivors = ("cache-1", "cache-3")
    cluster.wait_members(2, survivors, "drops the killed node")
    # Back: the node registers again, copies the blocks it owns from its peers, takes new ones.
    cluster.compose("start", "cache-2")
    cluster.wait_members(3, CACHES, "sees cache-2 again")
    again = prompt(5, 101)
    store(cluster, "vllm-2", again, CACHES)
    assert cluster.metric("cache-2", "kvcache_blocks_stored") > 0
    results = load.finish()
    assert results and all(ok for _, ok in results), [r for r in results if not r[1]]


def test_a_node_cut_off_and_reconnected_costs_no_request_and_no_block(cluster: Cluster):
    expected = answers(cluster, range(20, 24))
    tokens = prompt(5, 200)
    text = store(cluster, "vllm-2", tokens, CACHES)
    load = Load(cluster, expected)
    network = f"{cluster.project}_kvcache"
    cut = cluster.container("cache-3")
    subprocess.run(["docker", "network", "disconnect", network, cut], check=True, timeout=60)
    try:
        with load.paused():
            assert_loads_every_block(cluster, "vllm-1", tokens, text)
        cluster.wait_members(2, ("cache-1", "cache-2"), "drops the cut-off node")
    finally:
        subprocess.run(["docker", "network", "connect", "--alias", "cache-3", network, cut], check=True, timeout=60)
    cluster.wait_members(3, CACHES, "sees cache-3 again")
    results = load.finish()
    assert results and all(ok for _, ok in results), [r for r in results if not r[1]]


# The dashboard's metrics this cluster produces (the LoRA manager, the autoscaler, P/D and the
# lower tiers are the other deploy tests' or absent here).
FROM_THIS_CLUSTER = (
    "vllm:",
    "kvcache_gateway_requests",
    "kvcache_gateway_time_to_first_byte",
    "kvcache_gateway_predicted_",
    "kvcache_gateway_prompt_blocks",
    "kvcache_gateway_backend_up",
    "kvcache_hit_blocks",
    "kvcache_cluster_members",
)


def test_the_shipped_prometheus_config_answers_the_dashboards_engine_and_gateway_queries(cluster: Cluster):
    prometheus = cluster.url("prometheus")
    wanted = [(t, e) for t, e in queries() if any(p in e for p in FROM_THIS_CLUSTER)]
    assert any("vllm:" in e for _, e in wanted), "the dashboard has vLLM panels"
    pending = wanted
    deadline = time.monotonic() + 120
    seed = 1000
    while pending and time.monotonic() < deadline:
        seed += 1
        status, body, _ = cluster.complete("gateway", prompt(2, seed))
        assert status == 200, body
        time.sleep(1)
        still = []
        for title, expr in pending:
            # deploy/prometheus scrapes every 15 s: rates over a minute.
            answer = prometheus_query(prometheus, expr, rate_interval="1m")
            assert answer.get("status") == "success", f"{title}: {expr}: {answer}"
            if not answer["data"]["result"]:
                still.append((title, expr))
        pending = still
    assert not pending, f"queries without data after 120 s: {pending}"


def test_the_shipped_alerting_rules_load_and_evaluate_against_the_cluster(cluster: Cluster):
    """deploy/prometheus/rules.yml, loaded by the Compose Prometheus: every rule evaluates
    without error against the live cluster's series (firing or not)."""

    def rules() -> list[dict]:
        status, body, _ = http("GET", cluster.url("prometheus") + "/api/v1/rules")
        assert status == 200, body
        return [r for g in body["data"]["groups"] for r in g["rules"]]

    wait_for(
        "every rule evaluated once", lambda: all(r.get("lastEvaluation", "0001").startswith("20") for r in rules()), 60
    )
    loaded = rules()
    assert len([r for r in loaded if r["type"] == "alerting"]) == 7, [r["name"] for r in loaded]
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad, bad
