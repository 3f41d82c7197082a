# Builds the kvcache binaries and the Python wheels (the `kvcache` module and the vLLM connector)
# from source, into /out/bin and /out/wheels, for kvcache.Dockerfile and vllm.Dockerfile.
#
#   docker build -f deploy/images/build.Dockerfile -t kvcache-build .
#   docker build -f deploy/images/build.Dockerfile --build-arg FEATURES=kvcache-server/disk,kvcache-server/rdma -t kvcache-build .
#
# FEATURES: cargo features, as in scripts/test.sh (default: none, the build with no C++ and no
# device libraries). The wheel is built against this image's glibc: pick a RUST_IMAGE whose
# Debian is no newer than the vLLM image's distribution (bookworm's glibc 2.36 for vLLM images
# on Ubuntu 24.04; bullseye's for older ones).
ARG RUST_IMAGE=rust:1-slim-bookworm
FROM ${RUST_IMAGE}
ARG FEATURES=
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-pip pkg-config libibverbs-dev librdmacm-dev \
        libnl-3-dev libnl-route-3-dev clang libclang-dev cmake g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kvcache-server -p kvcache-gateway -p kvcache-lora \
        -p kvcache-autoscaler ${FEATURES:+--features "$FEATURES"} \
    && mkdir -p /out/bin \
    && cp target/release/kvcache-server target/release/kvcache-gateway target/release/kvcache-lora \
        target/release/kvcache-autoscaler /out/bin/ \
    && python3 -m venv /tmp/wheel-venv \
    && /tmp/wheel-venv/bin/pip install -q maturin \
    && /tmp/wheel-venv/bin/pip wheel -q --no-deps -w /out/wheels ./pyo3-bindings ./vllm-connector \
    && rm -rf target /tmp/wheel-venv
