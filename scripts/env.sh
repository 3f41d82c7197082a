# Sourced by the other scripts: a Rust toolchain, a few Debian packages, and build outputs cached
# outside the clone so a fresh clone (CI) reuses them. Works on a fresh Debian as root or with sudo.

set -euo pipefail

# Build outputs live outside the clone; override with KVCACHE_CACHE_DIR.
export KVCACHE_CACHE_DIR="${KVCACHE_CACHE_DIR:-/var/tmp/kvcache-cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KVCACHE_CACHE_DIR/target}"
mkdir -p "$CARGO_TARGET_DIR"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

# Installs Debian packages that are missing; $1.. are "command:package" pairs.
ensure_packages() {
    local missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] || install_packages "${missing[@]}"
}

# Installs Debian library packages that are missing (checked with dpkg, not by a command).
ensure_libraries() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] || install_packages "${missing[@]}"
}

# Installs Debian packages.
install_packages() {
    local missing=("$@")
    echo "installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    # Some images delete .deb files in a post-invoke hook that then breaks dpkg; clear it.
    local conf; conf=$(mktemp); printf '#clear DPkg::Post-Invoke;\n' >"$conf"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -c "$conf" install -y -qq --no-install-recommends "${missing[@]}" >&2
    rm -f "$conf"
}

# A Rust toolchain (edition 2024 needs Rust >= 1.85; Debian's packaged cargo is older).
if ! command -v cargo >/dev/null; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null; then
    ensure_packages curl:curl gcc:gcc
    echo "installing Rust with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >&2
    . "$HOME/.cargo/env"
fi
ensure_packages gcc:gcc

# A Python virtual environment outside the clone, with the tools the Python tests use.
python_venv() {
    ensure_packages python3:python3
    python3 -c 'import ensurepip, venv' 2>/dev/null || install_packages python3-venv python3-pip
    export KVCACHE_VENV="$KVCACHE_CACHE_DIR/venv"
    [ -x "$KVCACHE_VENV/bin/python" ] || python3 -m venv "$KVCACHE_VENV"
    "$KVCACHE_VENV/bin/pip" install -q --disable-pip-version-check maturin pytest numpy ruff >&2
}
