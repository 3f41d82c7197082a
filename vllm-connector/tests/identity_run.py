"""Builds real vLLM engine configs (no engine is started) and writes what the connector keys them by.

    python identity_run.py SPEC.json OUT.json

SPEC: {"variants": {NAME: {"engine_args": {...EngineArgs keywords...}, "model_id": ID or null}}}.
OUT: {NAME: {"identity": the model identity string, "namespace": layer 0's namespace id (hex),
"kv_dtype": the namespace's KV dtype}}. A subprocess of the tests, so that each set of variants
runs with its own Hugging Face cache (HF_HUB_CACHE is read when huggingface_hub is imported).
"""

import json
import sys


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    from vllm.engine.arg_utils import EngineArgs

    from kvcache_vllm.fingerprint import FileDigests
    from kvcache_vllm.identity import model_identity
    from kvcache_vllm.settings import Namespaces, Settings

    digests = FileDigests()
    out = {}
    for name, variant in spec["variants"].items():
        args = dict(max_model_len=2048, enforce_eager=True, dtype="bfloat16", seed=0, enable_prefix_caching=True)
        config = EngineArgs(**(args | variant["engine_args"])).create_engine_config()
        identity = model_identity(config, variant.get("model_id"), digests)
        ns = Namespaces.for_engine(Settings(), config, 0, "cpu", model=identity)
        out[name] = {"identity": identity, "namespace": ns.get(0).hex(), "kv_dtype": ns.kv_dtype}
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
