"""What the connector folds into block namespaces (`kvcache_vllm/identity.py`): real vLLM engine
configs (built, not started) that differ in one thing that changes KV bytes get different
namespaces, and ones that differ only in where the same weights live get the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ENGINE_TIMEOUT_S, HERE, engine_config, engine_env
from kvcache_vllm.fingerprint import FileDigests
from kvcache_vllm.identity import LORA_TAG, MODEL_TAG, NAMESPACE_VERSION, lora_identity, model_identity
from kvcache_vllm.settings import Namespaces, Settings

HUB_REPO = "kvtest/tiny"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_other_weights(src: Path, dst: Path) -> Path:
    """A copy of the model at `src` whose last weight byte differs."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    return dst


def hub_cache(root: Path, snapshots: dict[str, Path], main: str) -> Path:
    """A Hugging Face hub cache holding `HUB_REPO` at the given commits, laid out as
    huggingface_hub lays it out: content-named blobs, snapshot links, refs/main."""
    repo = root / ("models--" + HUB_REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    for commit, src in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            blob = repo / "blobs" / sha256_file(f)
            if not blob.exists():
                shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return root


@pytest.fixture(scope="module")
def variants(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each variant's model identity and layer-0 namespace, from one subprocess."""
    tmp = tmp_path_factory.mktemp("identity")
    a = Path(shutil.copytree(tiny_model, tmp / "a"))
    a_copy = Path(shutil.copytree(tiny_model, tmp / "elsewhere" / "a"))
    b = with_other_weights(tiny_model, tmp / "b")
    hub = hub_cache(tmp / "hub", {COMMIT_A: a, COMMIT_B: b}, main=COMMIT_A)
    rope = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    specs = {
        "base": {"model": str(a)},
        "copy": {"model": str(a_copy)},
        "shorter_max_model_len": {"model": str(a), "max_model_len": 1024},
        "other_weights": {"model": str(b)},
        "hub_a": {"model": HUB_REPO, "revision": COMMIT_A},
        "hub_main": {"model": HUB_REPO, "revision": "main"},
        "hub_b": {"model": HUB_REPO, "revision": COMMIT_B},
        "quantization_fp8": {"model": str(a), "quantization": "fp8"},
        "kv_cache_fp8": {"model": str(a), "kv_cache_dtype": "fp8_e4m3"},
        "hf_overrides_rope": {"model": str(a), "hf_overrides": rope},
    }
    spec = {"variants": {name: {"engine_args": args} for name, args in specs.items()}}
    spec["variants"]["model_id_a"] = {"engine_args": {"model": str(a)}, "model_id": "tiny@1"}
    spec["variants"]["model_id_b"] = {"engine_args": {"model": str(b)}, "model_id": "tiny@1"}
    spec_path, out_path = tmp / "spec.json", tmp / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**engine_env(), "HF_HUB_CACHE": str(hub), "XDG_CACHE_HOME": str(tmp / "xdg")}
    proc = subprocess.run(
        [sys.executable, str(HERE / "identity_run.py"), str(spec_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(out_path.read_text())
    out["_weights"] = {"a": a / "model.safetensors"}
    return out


def test_the_same_weights_at_another_path_or_from_the_hub_share_a_namespace(variants: dict) -> None:
    base = variants["base"]["namespace"]
    for name in ("copy", "shorter_max_model_len", "hub_a", "hub_main"):
        assert variants[name]["namespace"] == base, name


def test_namespaces_differ_for_weights_revision_quantization_kv_dtype_and_hf_overrides(variants: dict) -> None:
    names = ["base", "other_weights", "quantization_fp8", "kv_cache_fp8", "hf_overrides_rope"]
    ids = {variants[n]["namespace"] for n in names}
    assert len(ids) == len(names), {n: variants[n]["namespace"] for n in names}
    # Revisions of one hub model: commit B holds other weights than commit A (and main, = A).
    assert variants["hub_b"]["namespace"] != variants["hub_a"]["namespace"]
    assert variants["hub_b"]["namespace"] == variants["other_weights"]["namespace"]
    # The fp8 KV cache changes the identity too, not only the namespace's dtype field.
    assert variants["kv_cache_fp8"]["identity"] != variants["base"]["identity"]


def test_model_id_vouches_for_the_weights_and_keeps_the_rest(variants: dict) -> None:
    assert variants["model_id_a"]["namespace"] == variants["model_id_b"]["namespace"]
    assert variants["model_id_a"]["namespace"] != variants["base"]["namespace"]
    fields = json.loads(variants["model_id_a"]["identity"].split(" ", 1)[1])
    assert fields["weights"] == {"model_id": "tiny@1"}
    assert fields["hf_config"] == json.loads(variants["base"]["identity"].split(" ", 1)[1])["hf_config"]


def test_the_model_identity_is_versioned_canonical_json_with_an_independent_weight_hash(variants: dict) -> None:
    identity = variants["base"]["identity"]
    assert NAMESPACE_VERSION == 2 and MODEL_TAG == "kvcache_vllm/model/v2"
    tag, body = identity.split(" ", 1)
    assert tag == MODEL_TAG
    fields = json.loads(body)
    assert body == json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert set(fields) == {
        "weights",
        "dtype",
        "quantization",
        "quantization_config",
        "load_format",
        "hf_config",
        "model_impl",
        "convert",
        "disable_sliding_window",
        "kv_cache",
    }
    assert (fields["dtype"], fields["quantization"], fields["kv_cache"]["dtype"]) == ("bfloat16", None, "auto")
    # The weight fingerprint, recomputed here with hashlib: sha256 of the canonical list of
    # [relative path, size, sha256 of content] of the weight files.
    weights = variants["_weights"]["a"]
    entries = [["model.safetensors", weights.stat().st_size, sha256_file(weights)]]
    expected = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()
    assert fields["weights"] == {"sha256": expected}
    assert len(fields["hf_config"]) == 64


def test_namespace_ids_of_a_fixed_identity_are_pinned() -> None:
    """Golden vector: the namespace id the connector derives from a fixed model identity (the
    Rust core's encoding plus the connector's layout string). A change here changes every key."""
    ns = Namespaces(
        model=MODEL_TAG + ' {"weights":{"sha256":"00"}}',
        kv_dtype="bfloat16",
        block_size=128,
        layout="cpu",
        num_kv_heads=2,
        head_size=64,
    )
    assert ns.get(0).hex() == GOLDEN_LAYER0
    assert ns.get(1, lora=LORA_TAG + " {}", salt="s").hex() == GOLDEN_LAYER1_LORA_SALT


GOLDEN_LAYER0 = "0d663ef936cff56e1632266d874b975b"
GOLDEN_LAYER1_LORA_SALT = "a66c64bbf35c70581155daf3b31e6b1e"


# -- LoRA adapters -------------------------------------------------------------------------------


def make_adapter(path: Path, seed: int) -> Path:
    """A LoRA adapter directory as PEFT writes one (config and safetensors weights)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    )
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 256, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(256, 8, generator=g),
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_lora_namespaces_differ_by_adapter_path_and_content_not_by_name(tiny_model: Path, tmp_path: Path) -> None:
    from vllm.lora.request import LoRARequest

    config = engine_config(tiny_model, enable_lora=True, max_lora_rank=8)
    digests = FileDigests(tmp_path / "digests")
    ns = Namespaces.for_engine(Settings(), config, 0, "cpu", model=model_identity(config, digests=digests))
    first = make_adapter(tmp_path / "adapters" / "sql", seed=1)
    moved = Path(shutil.copytree(first, tmp_path / "elsewhere" / "sql"))

    def identity(path: Path, name: str = "sql", int_id: int = 1) -> str:
        found = lora_identity(LoRARequest(name, int_id, str(path)), config, digests)
        assert found is not None and found.startswith(LORA_TAG + " ")
        return found

    original = identity(first)
    assert identity(first, name="other-label", int_id=7) == original  # a name is a label
    at_another_path = identity(moved)
    make_adapter(tmp_path / "retrained", seed=2)
    shutil.copyfile(tmp_path / "retrained" / "adapter_model.safetensors", first / "adapter_model.safetensors")
    retrained = identity(first)
    ids = {ns.get(0, lora=lora) for lora in (original, at_another_path, retrained)} | {ns.get(0)}
    assert len(ids) == 4
    fields = json.loads(retrained.split(" ", 1)[1])
    assert fields["path"] == str(first) and fields["dtype"] == "torch.bfloat16"


def test_a_lora_adapter_whose_files_are_not_here_has_no_identity(tiny_model: Path, tmp_path: Path) -> None:
    """Such a request bypasses the cache (scheduler.py): its bytes cannot be named."""
    from vllm.lora.request import LoRARequest

    config = engine_config(tiny_model, enable_lora=True, max_lora_rank=8)
    digests = FileDigests(tmp_path / "digests")
    assert lora_identity(LoRARequest("x", 1, str(tmp_path / "missing")), config, digests) is None
    assert lora_identity(LoRARequest("x", 1, "no-such-org/no-such-adapter"), config, digests) is None


# -- file digests --------------------------------------------------------------------------------


def test_a_rewritten_file_gets_a_new_digest_even_with_its_old_size_and_mtime(tmp_path: Path) -> None:
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"\x01" * 4096)
    digests = FileDigests(tmp_path / "digests")
    before = digests.fingerprint(weights.parent)
    st = weights.stat()
    weights.write_bytes(b"\x02" * 4096)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    assert digests.fingerprint(weights.parent) != before
    assert FileDigests(tmp_path / "digests").digests([weights]) == [sha256_file(weights)]


def test_digests_are_remembered_across_processes_by_file_identity(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(1 << 16))
    FileDigests(tmp_path / "digests").digests([weights])
    remembered_file = tmp_path / "digests" / "file-digests-v1.json"
    remembered = json.loads(remembered_file.read_text())
    assert list(remembered.values()) == [sha256_file(weights)]
    # A new instance (another process) takes the remembered digest instead of reading the file:
    # replace it with a marker and see the marker come back.
    remembered_file.write_text(json.dumps({k: "marker" for k in remembered}))
    assert FileDigests(tmp_path / "digests").digests([weights]) == ["marker"]


def test_a_hub_cache_link_is_digested_by_its_blob_name_without_reading(tmp_path: Path) -> None:
    content = os.urandom(1 << 16)
    blobs = tmp_path / "models--o--m" / "blobs"
    blobs.mkdir(parents=True)
    blob = blobs / hashlib.sha256(content).hexdigest()
    blob.write_bytes(content)
    link = tmp_path / "models--o--m" / "model.safetensors"
    link.symlink_to(blob)
    digests = FileDigests(tmp_path / "digests")
    assert digests.digests([link]) == [blob.name]
    # The name is trusted as the hub's content address: a blob named for other bytes is not read.
    other = blobs / ("0" * 64)
    other.write_bytes(content)
    link.unlink()
    link.symlink_to(other)
    assert digests.digests([link]) == ["0" * 64]
