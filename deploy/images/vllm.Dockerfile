# A vLLM image with the kvcache connector and the `kvcache` Python module added: the image the
# Kubernetes engine manifests and the Compose cluster run. VLLM_IMAGE is any vLLM image (the
# project's own GPU image, a CPU build); PIP is how that image's Python installs a wheel.
#
#   docker build -f deploy/images/vllm.Dockerfile --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.11.0 \
#       -t kvcache-vllm deploy/images
#
# The wheels come from BINARIES (/out/wheels), as kvcache.Dockerfile's binaries do.
ARG BINARIES=kvcache-build
ARG VLLM_IMAGE=vllm/vllm-openai:latest
FROM ${BINARIES} AS binaries

FROM ${VLLM_IMAGE}
ARG PIP="python3 -m pip"
COPY --from=binaries /out/wheels/ /tmp/kvcache-wheels/
# --no-deps: the connector needs only vLLM (there already) and the module beside it.
RUN ${PIP} install --no-cache-dir --no-deps --force-reinstall --disable-pip-version-check /tmp/kvcache-wheels/*.whl \
    && rm -rf /tmp/kvcache-wheels
# The LoRA manager loads and unloads adapters at run time through vLLM's endpoints.
ENV VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
