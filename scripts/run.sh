#!/usr/bin/env bash
# Builds and runs a single-node kvcache server on the embedded defaults: data plane on
# 127.0.0.1:7400, /metrics and /health on 127.0.0.1:7401, a 1 GiB pool, no etcd, no GPU.
# Extra arguments go to kvcache-server (see `scripts/run.sh --help`).
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release --locked -p kvcache-server >&2
exec "$CARGO_TARGET_DIR/release/kvcache-server" "$@"
