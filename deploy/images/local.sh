#!/usr/bin/env bash
# Builds, on a machine with no image registry, every image the Compose cluster runs, from the
# binaries and wheels this machine built: the Debian base (base.sh), an image holding the
# binaries and wheels (what build.Dockerfile makes from source elsewhere), the kvcache image
# (kvcache.Dockerfile), a vLLM CPU image (vllm-cpu.sh) with the connector added
# (vllm.Dockerfile), and etcd and Prometheus from Debian's packages.
#
# Usage: deploy/images/local.sh BIN_DIR WHEEL_DIR
#   BIN_DIR holds kvcache-server, kvcache-gateway, kvcache-lora and kvcache-autoscaler
#   (e.g. $CARGO_TARGET_DIR/release); WHEEL_DIR the wheels of pyo3-bindings and vllm-connector
#   (pip wheel --no-deps -w WHEEL_DIR ./pyo3-bindings ./vllm-connector).
# Prints, on stdout, the images as the Compose file's variables:
#   KVCACHE_IMAGE=... KVCACHE_VLLM_IMAGE=... ETCD_IMAGE=... PROMETHEUS_IMAGE=...
# The base and vLLM CPU images are made once and kept; the others are rebuilt (seconds).
cd "$(dirname "$0")/../.."
. scripts/env.sh

[ $# -eq 2 ] || { sed -n '8,15p' "$0" >&2; exit 2; }
bin_dir=$1 wheel_dir=$2
binaries=(kvcache-server kvcache-gateway kvcache-lora kvcache-autoscaler)
for b in "${binaries[@]}"; do
    [ -x "$bin_dir/$b" ] || { echo "error: no $b in $bin_dir: build it first" >&2; exit 1; }
done
ls "$wheel_dir"/kvcache-*.whl "$wheel_dir"/kvcache_vllm-*.whl >/dev/null ||
    { echo "error: $wheel_dir lacks the kvcache and kvcache_vllm wheels" >&2; exit 1; }

base=$(deploy/images/base.sh)
vllm_cpu=$(deploy/images/vllm-cpu.sh)
ctx=$(mktemp -d "${TMPDIR:-/var/tmp}/kvcache-images.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
build() {  # build IMAGE DOCKER-BUILD-ARGS...: quiet unless it fails
    local image=$1; shift
    echo "docker build $image" >&2
    docker build -q -t "$image" "$@" >"$ctx/build.log" 2>&1 || { cat "$ctx/build.log" >&2; exit 1; }
}

mkdir -p "$ctx/prebuilt/bin" "$ctx/prebuilt/wheels"
for b in "${binaries[@]}"; do
    # Debug builds carry hundreds of MB of symbols a container has no use for.
    objcopy --strip-debug "$bin_dir/$b" "$ctx/prebuilt/bin/$b"
done
cp "$wheel_dir"/kvcache-*.whl "$wheel_dir"/kvcache_vllm-*.whl "$ctx/prebuilt/wheels/"
printf 'FROM scratch\nCOPY bin/ /out/bin/\nCOPY wheels/ /out/wheels/\n' >"$ctx/prebuilt/Dockerfile"
build kvcache-local/binaries:dev "$ctx/prebuilt"

build kvcache-local/kvcache:dev -f deploy/images/kvcache.Dockerfile \
    --build-arg BINARIES=kvcache-local/binaries:dev --build-arg BASE_IMAGE="$base" deploy/images
build kvcache-local/vllm:dev -f deploy/images/vllm.Dockerfile \
    --build-arg BINARIES=kvcache-local/binaries:dev --build-arg VLLM_IMAGE="$vllm_cpu" \
    --build-arg PIP="/opt/vllm/bin/python -m pip" deploy/images

# package_image IMAGE PACKAGE LAST-LINE: one Debian package on the base, run as uid 10001.
package_image() {
    mkdir -p "$ctx/$2"
    printf '%s\n' "FROM $base" \
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $2 >/dev/null && rm -rf /var/lib/apt/lists/*" \
        'USER 10001:10001' "$3" >"$ctx/$2/Dockerfile"
    build "$1" "$ctx/$2"
}
package_image kvcache-local/etcd:dev etcd-server 'CMD ["etcd"]'
package_image kvcache-local/prometheus:dev prometheus 'ENTRYPOINT ["prometheus"]'

echo "KVCACHE_IMAGE=kvcache-local/kvcache:dev KVCACHE_VLLM_IMAGE=kvcache-local/vllm:dev" \
    "ETCD_IMAGE=kvcache-local/etcd:dev PROMETHEUS_IMAGE=kvcache-local/prometheus:dev"
