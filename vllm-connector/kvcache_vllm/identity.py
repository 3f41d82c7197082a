"""What makes KV bytes differ for the same token ids: the model and LoRA identity strings.

Block keys are chained from token ids inside a namespace (`settings.Namespaces`). The Rust
core's namespace has a `model` and a `lora` field; this module fills them with versioned,
canonical strings that name everything in the engine that changes the KV of a token:

    kvcache_vllm/model/v2 {canonical JSON}
    kvcache_vllm/lora/v2 {canonical JSON}

The model JSON (keys sorted, no spaces, ASCII) holds:
- `weights`: `{"sha256": F}`, the content fingerprint of the weight files vLLM loads
  (`fingerprint.py`; the same files at another path give the same F); `{"hub": NAME,
  "revision": COMMIT}` when no local files are found and the revision is a commit hash;
  `{"model_id": ID}` when the operator vouches for the weights with the `model_id` setting;
  `{"dummy_seed": N}` for `load_format=dummy`.
- `dtype`, `quantization`, `quantization_config` (vLLM's model config) and `load_format`.
- `hf_config`: the sha256 of the effective Hugging Face config as canonical JSON (after
  `hf_overrides`: rope scaling, attention settings, the checkpoint's quantization config and
  its KV scales scheme), without the entries that name where it was read from.
- `model_impl`, `convert` and `disable_sliding_window`: which code computes the KV.
- `kv_cache`: the KV cache dtype, the layers it skips, and `calculate_kv_scales` where this
  vLLM has it. Fixed k/v scales come from the checkpoint, so the weights and `hf_config`
  cover them.

Not folded in, on purpose: the model's name or path (weights at two paths share blocks), the
tokenizer and its revision (keys are token ids, and the KV of a token id does not depend on
how text became ids), and anything that only sizes the engine (max_model_len, memory).

The LoRA JSON holds the adapter's resolved path, the content fingerprint of its directory
(weights and adapter_config.json), its weight format flag and vLLM's LoRA dtype. Its name and
integer id are labels and are left out.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fingerprint import FileDigests, canonical_json

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.lora.request import LoRARequest

logger = logging.getLogger("vllm.kvcache")

# Bump when the strings below change shape: every key changes with it.
NAMESPACE_VERSION = 2
MODEL_TAG = f"kvcache_vllm/model/v{NAMESPACE_VERSION}"
LORA_TAG = f"kvcache_vllm/lora/v{NAMESPACE_VERSION}"

# Files vLLM may load weights from; config and tokenizer files are covered elsewhere.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".npz", ".msgpack", ".h5")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def plain(value: Any) -> Any:
    """`value` as JSON-able data that is the same in every process (no object addresses)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((plain(v) for v in value), key=canonical_json)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__qualname__, **fields}
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return {"__type__": type(value).__qualname__, **plain(model_dump())}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return _ADDRESS.sub("", repr(value))


def _without_origin(value: Any) -> Any:
    """A config dict without the entries that say where and by what it was read
    (`_name_or_path`, `_commit_hash`, `transformers_version`, ...)."""
    if isinstance(value, dict):
        return {
            k: _without_origin(v)
            for k, v in value.items()
            if not str(k).startswith("_") and k != "transformers_version"
        }
    if isinstance(value, list):
        return [_without_origin(v) for v in value]
    return value


def hf_config_digest(hf_config: Any) -> str:
    """The sha256 of the effective Hugging Face config (see the module doc)."""
    data = hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config)
    return hashlib.sha256(canonical_json(_without_origin(plain(data))).encode()).hexdigest()


def _hub_snapshot(repo: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The local snapshot of a hub model that is already downloaded, without the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # not in the local cache, or not a hub name
        return None


def local_files(name: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The local file or directory that `name` (a path or a hub model) was loaded from."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        return path
    return _hub_snapshot(name, revision, cache_dir)


def weights_identity(vllm_config: VllmConfig, model_id: str | None, digests: FileDigests) -> dict[str, Any]:
    """The `weights` entry of the model identity (see the module doc); raises ValueError when
    nothing identifies the weights."""
    if model_id:
        return {"model_id": model_id}
    model_config, load_config = vllm_config.model_config, vllm_config.load_config
    if str(load_config.load_format) == "dummy":
        return {"dummy_seed": model_config.seed}
    root = local_files(model_config.model, model_config.revision, load_config.download_dir)
    if root is not None:
        fingerprint = digests.fingerprint(root, WEIGHT_SUFFIXES)
        if fingerprint is not None:
            return {"sha256": fingerprint}
    revision = model_config.revision or ""
    if root is None and _COMMIT.fullmatch(revision):
        return {"hub": model_config.model, "revision": revision}
    where = f"in {root}" if root is not None else "on this machine"
    raise ValueError(
        f"kvcache: cannot identify the weights of {model_config.model!r}: no weight files "
        f"({', '.join(WEIGHT_SUFFIXES)}) {where}, and the revision {model_config.revision!r} is not a "
        "commit hash. Block keys must name the exact weights; set kv_connector_extra_config.model_id "
        "to a name that does (e.g. 'org/model@<commit>'), or pass a commit hash as --revision."
    )


def model_identity(vllm_config: VllmConfig, model_id: str | None = None, digests: FileDigests | None = None) -> str:
    """The namespace `model` string of this engine (see the module doc)."""
    model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
    kv_cache: dict[str, Any] = {
        "dtype": str(cache_config.cache_dtype),
        "skip_layers": plain(list(getattr(cache_config, "kv_cache_dtype_skip_layers", None) or [])),
    }
    if hasattr(cache_config, "calculate_kv_scales"):
        kv_cache["calculate_kv_scales"] = bool(cache_config.calculate_kv_scales)
    fields = {
        "weights": weights_identity(vllm_config, model_id, digests or FileDigests()),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "quantization": plain(model_config.quantization),
        "quantization_config": plain(getattr(model_config, "quantization_config", None)),
        "load_format": plain(vllm_config.load_config.load_format),
        "hf_config": hf_config_digest(model_config.hf_config),
        "model_impl": plain(model_config.model_impl),
        "convert": plain(getattr(model_config, "convert", None)),
        "disable_sliding_window": bool(model_config.disable_sliding_window),
        "kv_cache": kv_cache,
    }
    return f"{MODEL_TAG} {canonical_json(fields)}"


def check_kv_scales(vllm_config: VllmConfig) -> None:
    """Refuses KV scales computed per instance: two engines would store different bytes under
    the same keys."""
    cache_config = vllm_config.cache_config
    if getattr(cache_config, "calculate_kv_scales", False) and str(cache_config.cache_dtype).startswith("fp8"):
        raise ValueError(
            "kvcache: calculate_kv_scales computes fp8 KV scales from each instance's first batch, so "
            "two instances store different KV bytes for the same tokens; KVCacheConnector cannot share "
            "them. Use the checkpoint's scales (calculate_kv_scales off) or an unquantized KV cache."
        )


def adapter_path(lora_path: str, cache_dir: str | None = None) -> Path | None:
    """Where vLLM finds the adapter `lora_path` names, if it is on this machine already."""
    if os.path.isabs(lora_path) or lora_path.startswith("~"):
        path = Path(os.path.expanduser(lora_path))
        return path if path.exists() else None
    if os.path.exists(lora_path):
        return Path(os.path.abspath(lora_path))
    return _hub_snapshot(lora_path, None, cache_dir)


def lora_identity(lora: LoRARequest, vllm_config: VllmConfig, digests: FileDigests) -> str | None:
    """The namespace `lora` string of a request's adapter, or None if its files are not on this
    machine (yet): such a request bypasses the cache."""
    path = adapter_path(lora.lora_path, vllm_config.load_config.download_dir)
    fingerprint = digests.fingerprint(path) if path is not None else None
    if path is None or fingerprint is None:
        return None
    lora_config = vllm_config.lora_config
    fields = {
        "path": str(path),
        "sha256": fingerprint,
        "is_3d_lora_weight": bool(getattr(lora, "is_3d_lora_weight", False)),
        "dtype": plain(str(lora_config.lora_dtype) if lora_config is not None else None),
    }
    return f"{LORA_TAG} {canonical_json(fields)}"
