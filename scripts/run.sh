#!/usr/bin/env bash
# Builds and runs a single-node kvcache server on the embedded defaults: data plane on
# 127.0.0.1:7400, /metrics and /health on 127.0.0.1:7401, a 1 GiB pool, no etcd, no GPU.
# Extra arguments go to kvcache-server (see `scripts/run.sh --help`). KVCACHE_FEATURES=disk
# builds the optional disk tier in (it needs clang and g++; see DEVELOPERS.md).
cd "$(dirname "$0")/.."
. scripts/env.sh
features=()
if [ -n "${KVCACHE_FEATURES:-}" ]; then
    ensure_libraries clang libclang-dev g++
    features=(--features "$KVCACHE_FEATURES")
fi
cargo build --release --locked -p kvcache-server "${features[@]}" >&2
exec "$CARGO_TARGET_DIR/release/kvcache-server" "$@"
