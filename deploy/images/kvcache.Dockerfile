# The kvcache binaries (kvcache-server, kvcache-gateway, kvcache-lora, kvcache-autoscaler) on a
# slim Debian, run as uid 10001. Two stages: the binaries come from an image that holds them
# under /out/bin (BINARIES), the one build.Dockerfile makes from source or one made from
# binaries you built (deploy/images/local.sh does that here).
#
#   docker build -f deploy/images/build.Dockerfile -t kvcache-build .
#   docker build -f deploy/images/kvcache.Dockerfile -t kvcache deploy/images
#
# Docker's classic builder builds every stage of a file, so the Rust build lives in its own file:
# a machine without BuildKit (or without a Rust image) can still make this one.
ARG BINARIES=kvcache-build
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BINARIES} AS binaries

FROM ${BASE_IMAGE}
# ca-certificates for TLS to etcd or Prometheus; libstdc++ for RocksDB (feature disk);
# libibverbs and librdmacm for RDMA (feature rdma: without a device the node says so and uses TCP).
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        ca-certificates libstdc++6 libibverbs1 librdmacm1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 kvcache \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kvcache
COPY --from=binaries /out/bin/ /usr/local/bin/
USER 10001:10001
# 7400 data, 7401 the node's /metrics and /health, 8080 the gateway, 9300 the LoRA manager,
# 9400 the autoscaler.
EXPOSE 7400 7401 8080 9300 9400
ENV KVCACHE_LOG=info
CMD ["kvcache-server", "--listen", "0.0.0.0:7400", "--metrics-listen", "0.0.0.0:7401"]
