#!/usr/bin/env bash
# Runs every test: formatting, lints, docs, and the whole workspace's unit and integration tests
# with the hardware features built in (disk tier, RDMA, CUDA; tests needing a device skip)
# (real server processes on loopback, Redis for the benchmark's smoke test), the Python
# module's tests against a real server, and the vLLM connector's tests against a real vLLM on
# CPU (installed by scripts/setup-vllm.sh), and a short run of every fuzz target
# (scripts/fuzz.sh), the gateway's end-to-end tests (gateway/tests/e2e: two real vLLM
# instances behind the gateway binary) and the LoRA manager's (lora/tests/e2e: two vLLM
# instances with runtime LoRA loading, the kvcache-lora binary and the gateway) and the
# autoscaler's (autoscaler/tests/e2e: cache nodes under eviction pressure, and a vLLM pool
# scaled through the gateway by the command actuator), and the Compose cluster of images built
# here (deploy/tests/test_compose.py, where a Docker daemon answers). Installs what it needs. Build outputs and the vLLM
# venv are cached in $KVCACHE_CACHE_DIR (default /var/tmp/kvcache-cache).
cd "$(dirname "$0")/.."
. scripts/env.sh
ensure_packages redis-server:redis-server etcd:etcd-server prometheus:prometheus
# The Compose test (deploy/tests/test_compose.py) needs a running Docker daemon; without one it
# is skipped, and the run says so at its start and its end.
docker_skip=""
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ensure_packages docker-compose:docker-compose debootstrap:debootstrap
else
    docker_skip="no Docker daemon answers here (docker info failed)"
    echo "note: the Compose test will be skipped: $docker_skip" >&2
fi
# The feature build (disk tier, RDMA, CUDA): RocksDB's C++ and the verbs headers. See
# DEVELOPERS.md; the default build needs none of these.
ensure_libraries libibverbs-dev librdmacm-dev libnl-3-dev libnl-route-3-dev clang libclang-dev cmake g++
FEATURES=kvcache-server/disk,kvcache-server/rdma,kvcache-server/cuda,kvcache-bench/disk,kvcache-bench/cuda,kvcache-bench/gateway,kvcache-py/rdma,kvcache-py/cuda
export KVCACHE_REQUIRE_ETCD=1
rustup component add rustfmt clippy >/dev/null 2>&1 || true
started=$(date +%s)
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
# Clippy and rustdoc run under the test profile, as `cargo test` does: their build scripts
# (RocksDB's C++ above all) are then the very ones the tests use, built once, not once per
# profile (a fresh machine spent 25 minutes building RocksDB a second time).
echo "== cargo clippy" >&2
cargo clippy --profile test --workspace --all-targets --locked --features "$FEATURES" -- -D warnings
echo "== cargo doc" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --profile test --workspace --no-deps --locked --quiet --features "$FEATURES"
echo "== cargo test" >&2
cargo test --workspace --locked --features "$FEATURES"
# The autoscaler's Kubernetes actuator is built apart: kube's TLS stack changes the features of
# crates the workspace build shares (and with them RocksDB's build script, 15 minutes of C++).
echo "== autoscaler with its Kubernetes actuator (feature kubernetes)" >&2
cargo clippy --profile test -p kvcache-autoscaler --all-targets --locked --features kubernetes -- -D warnings
cargo test -p kvcache-autoscaler --locked --features kubernetes
echo "== fuzz: every cargo-fuzz target for a few seconds (scripts/fuzz.sh)" >&2
./scripts/fuzz.sh "${KVCACHE_FUZZ_SECONDS:-5}"
echo "== python: the wheels (pyo3-bindings, vllm-connector), ruff, pytest" >&2
python_venv
# Built once, installed in both venvs and in the vLLM image of the Compose test.
WHEELS="$KVCACHE_CACHE_DIR/wheels"
rm -rf "$WHEELS"
"$KVCACHE_VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$WHEELS" ./pyo3-bindings ./vllm-connector
"$KVCACHE_VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$WHEELS"/kvcache-*.whl
"$KVCACHE_VENV/bin/ruff" check pyo3-bindings/python pyo3-bindings/tests pyo3-bindings/benches benches/mooncake
"$KVCACHE_VENV/bin/ruff" format --check pyo3-bindings/python pyo3-bindings/tests pyo3-bindings/benches benches/mooncake
KVCACHE_SERVER_BIN="$CARGO_TARGET_DIR/debug/kvcache-server" "$KVCACHE_VENV/bin/pytest" -q pyo3-bindings/tests
echo "== deploy: Kustomize overlays render and validate strictly; promtool checks and tests the rules (deploy/tests)" >&2
"$KVCACHE_VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0
"$KVCACHE_VENV/bin/ruff" check deploy/tests
"$KVCACHE_VENV/bin/ruff" format --check deploy/tests
KVCACHE_REQUIRE_PROMETHEUS=1 KVCACHE_SERVER_BIN="$CARGO_TARGET_DIR/debug/kvcache-server" \
    KVCACHE_GATEWAY_BIN="$CARGO_TARGET_DIR/debug/kvcache-gateway" \
    KVCACHE_LORA_BIN="$CARGO_TARGET_DIR/debug/kvcache-lora" \
    KVCACHE_AUTOSCALER_BIN="$CARGO_TARGET_DIR/debug/kvcache-autoscaler" "$KVCACHE_VENV/bin/pytest" -q deploy/tests \
    --ignore=deploy/tests/test_compose.py
echo "== vLLM connector: scripts/setup-vllm.sh, pip install, ruff, pytest (a real vLLM on CPU)" >&2
vllm_venv=$(./scripts/setup-vllm.sh)
"$vllm_venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$WHEELS"/*.whl
"$KVCACHE_VENV/bin/ruff" check vllm-connector
"$KVCACHE_VENV/bin/ruff" format --check vllm-connector
KVCACHE_REQUIRE_VLLM=1 KVCACHE_VLLM_MODELS="$(dirname "$vllm_venv")/models" \
    KVCACHE_SERVER_BIN="$CARGO_TARGET_DIR/debug/kvcache-server" "$vllm_venv/bin/pytest" -q vllm-connector/tests
echo "== gateway: end to end against real vllm serve instances (gateway/tests/e2e)" >&2
"$KVCACHE_VENV/bin/ruff" check gateway/tests/e2e
"$KVCACHE_VENV/bin/ruff" format --check gateway/tests/e2e
KVCACHE_REQUIRE_VLLM=1 KVCACHE_VLLM_MODELS="$(dirname "$vllm_venv")/models" \
    KVCACHE_SERVER_BIN="$CARGO_TARGET_DIR/debug/kvcache-server" \
    KVCACHE_GATEWAY_BIN="$CARGO_TARGET_DIR/debug/kvcache-gateway" "$vllm_venv/bin/pytest" -q gateway/tests/e2e
echo "== LoRA manager: end to end against real vllm serve instances (lora/tests/e2e)" >&2
"$KVCACHE_VENV/bin/ruff" check lora/tests/e2e
"$KVCACHE_VENV/bin/ruff" format --check lora/tests/e2e
KVCACHE_REQUIRE_VLLM=1 KVCACHE_VLLM_MODELS="$(dirname "$vllm_venv")/models" \
    KVCACHE_SERVER_BIN="$CARGO_TARGET_DIR/debug/kvcache-server" \
    KVCACHE_GATEWAY_BIN="$CARGO_TARGET_DIR/debug/kvcache-gateway" \
    KVCACHE_LORA_BIN="$CARGO_TARGET_DIR/debug/kvcache-lora" "$vllm_venv/bin/pytest" -q lora/tests/e2e
echo "== autoscaler: end to end (cache nodes under eviction pressure; vllm serve scaled through the gateway)" >&2
"$KVCACHE_VENV/bin/ruff" check autoscaler/tests/e2e autoscaler/tests/traces
"$KVCACHE_VENV/bin/ruff" format --check autoscaler/tests/e2e autoscaler/tests/traces
KVCACHE_REQUIRE_VLLM=1 KVCACHE_VLLM_MODELS="$(dirname "$vllm_venv")/models" \
    KVCACHE_SERVER_BIN="$CARGO_TARGET_DIR/debug/kvcache-server" \
    KVCACHE_GATEWAY_BIN="$CARGO_TARGET_DIR/debug/kvcache-gateway" \
    KVCACHE_AUTOSCALER_BIN="$CARGO_TARGET_DIR/debug/kvcache-autoscaler" "$vllm_venv/bin/pytest" -q autoscaler/tests/e2e
echo "== deploy: images built here (deploy/images/local.sh), the Compose cluster under faults (deploy/tests/test_compose.py)" >&2
if [ -z "$docker_skip" ]; then
    images=$(deploy/images/local.sh "$CARGO_TARGET_DIR/debug" "$WHEELS")
    env $images KVCACHE_REQUIRE_DOCKER=1 KVCACHE_VLLM_MODELS="$(dirname "$vllm_venv")/models" \
        "$KVCACHE_VENV/bin/pytest" -q deploy/tests/test_compose.py
else
    echo "SKIPPED the Compose test: $docker_skip" >&2
fi
echo "all tests passed in $(( $(date +%s) - started )) s" >&2
