"""Layout descriptors and settings, with CPU tensors (no engine)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from kvcache_vllm.layout import LAYOUTS, BlockLayout, LayoutError, layout_spec
from kvcache_vllm.settings import Namespaces, Settings

NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE = 5, 2, 4, 8


def read(segments: list[tuple[int, int]]) -> bytes:
    return b"".join(ctypes.string_at(address, length) for address, length in segments)


def numbered(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.int32).to(torch.bfloat16).reshape(shape)


def block_bytes(tensor: torch.Tensor, block_dim: int, block: int) -> bytes:
    """The bytes of one block, gathered by torch: the outer dims in order, then the block."""
    return tensor.select(block_dim, block).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_segments_hold_exactly_each_blocks_bytes(name: str) -> None:
    spec = layout_spec(name)
    tensor = numbered(spec.expected_shape(NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE))
    layout = BlockLayout.of(tensor, spec, NUM_BLOCKS)
    assert layout.block_bytes == HEADS * BLOCK_SIZE * 2 * HEAD_SIZE * 2
    for block in range(NUM_BLOCKS):
        assert read(layout.segments(block)) == block_bytes(tensor, spec.block_dim, block)


def test_cpu_blocks_are_one_run_and_flash_attention_blocks_two() -> None:
    cpu = layout_spec("cpu")
    flash = layout_spec("flash_attn")
    cpu_layout = BlockLayout.of(numbered(cpu.expected_shape(NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE)), cpu, NUM_BLOCKS)
    flash_tensor = numbered(flash.expected_shape(NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE))
    flash_layout = BlockLayout.of(flash_tensor, flash, NUM_BLOCKS)
    assert len(cpu_layout.segments(3)) == 1
    k, v = flash_layout.segments(3)
    assert k[0] == flash_tensor[0, 3].data_ptr() and v[0] == flash_tensor[1, 3].data_ptr()
    assert k[1] == v[1] == BLOCK_SIZE * HEADS * HEAD_SIZE * 2


def test_writing_through_segments_fills_only_that_block() -> None:
    spec = layout_spec("flash_attn")
    tensor = torch.zeros(spec.expected_shape(NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE), dtype=torch.bfloat16)
    layout = BlockLayout.of(tensor, spec, NUM_BLOCKS)
    for address, length in layout.segments(2):
        ctypes.memset(address, 0x3F, length)
    filled = (tensor.view(torch.uint8) != 0).reshape(2, NUM_BLOCKS, -1).all(dim=2)
    assert filled[:, 2].all() and not filled[:, [0, 1, 3, 4]].any()


def test_a_tensor_of_another_layout_is_refused_with_its_shape() -> None:
    cpu_shaped = torch.zeros(layout_spec("cpu").expected_shape(NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE))
    with pytest.raises(LayoutError, match="expected 5 blocks in dimension 1"):
        BlockLayout.of(cpu_shaped, layout_spec("flash_attn"), NUM_BLOCKS)
    strided = torch.zeros(NUM_BLOCKS, HEADS, BLOCK_SIZE, 4 * HEAD_SIZE)[..., : 2 * HEAD_SIZE]
    with pytest.raises(LayoutError, match="not contiguous within a block"):
        BlockLayout.of(strided, layout_spec("cpu"), NUM_BLOCKS)
    with pytest.raises(LayoutError, match="unknown KV layout 'paged'; known layouts: cpu, flash_attn, flashinfer"):
        layout_spec("paged")
    with pytest.raises(IndexError):
        BlockLayout.of(cpu_shaped, layout_spec("cpu"), NUM_BLOCKS).segments(NUM_BLOCKS)


def test_settings_have_defaults_and_name_bad_keys() -> None:
    assert Settings.from_extra_config(None).servers == ("127.0.0.1:7400",)
    s = Settings.from_extra_config({"servers": "10.0.0.1:7400", "transport": "tcp", "load_async": True})
    assert (s.servers, s.transport, s.load_async, s.server_arg()) == (("10.0.0.1:7400",), "tcp", True, "10.0.0.1:7400")
    assert Settings.from_extra_config({"servers": ["a:1", "b:2"]}).server_arg() == ["a:1", "b:2"]
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config keys .*\['server'\]"):
        Settings.from_extra_config({"server": "x:1"})
    with pytest.raises(ValueError, match="transport must be auto, shm, rdma or tcp"):
        Settings.from_extra_config({"transport": "ib"})
    assert Settings.from_extra_config({"transport": "rdma"}).transport == "rdma"
    assert Settings.from_extra_config(None).staging == "auto"
    assert Settings.from_extra_config({"staging": "always"}).staging == "always"
    with pytest.raises(ValueError, match="staging must be auto, always or never"):
        Settings.from_extra_config({"staging": "pinned"})
    with pytest.raises(LayoutError, match="unknown KV layout"):
        Settings.from_extra_config({"layout": "nhd"})
    etcd = Settings.from_extra_config({"servers": "etcd://127.0.0.1:2379", "replicas": 2})
    assert (etcd.server_arg(), etcd.replicas, etcd.is_cluster()) == ("etcd://127.0.0.1:2379", 2, True)
    assert not Settings.from_extra_config(None).is_cluster()
    with pytest.raises(ValueError, match="replicas > 1 needs a cluster"):
        Settings.from_extra_config({"servers": "10.0.0.1:7400", "replicas": 2})


def test_namespaces_separate_layers_ranks_loras_and_salts() -> None:
    def ns(**kw: object) -> Namespaces:
        args = dict(model="m", kv_dtype="bfloat16", block_size=128, layout="cpu", num_kv_heads=2, head_size=64)
        return Namespaces(**(args | kw))  # type: ignore[arg-type]

    base = ns()
    ids = {
        base.get(0),
        base.get(1),
        base.get(0, lora="adapter"),
        base.get(0, salt="tenant"),
        ns(tp_size=2, tp_rank=1).get(0),
        ns(layout="flash_attn").get(0),
        ns(kv_dtype="fp8_e4m3").get(0),
    }
    assert len(ids) == 7
    assert ns().get(0) == base.get(0)
    tokens = list(range(300))
    assert base.keys(0, tokens, None, None) != base.keys(1, tokens, None, None)
    assert len(base.keys(0, tokens, None, None)) == 2


def test_a_token_comes_from_token_or_token_file_and_bad_files_fail_at_start(tmp_path) -> None:
    assert Settings.from_extra_config(None).token is None
    s = Settings.from_extra_config({"token": "secret-1"})
    assert s.token == "secret-1" and "secret-1" not in repr(s)
    token_file = tmp_path / "token"
    token_file.write_text("  secret-2\n")
    from_file = Settings.from_extra_config({"token_file": str(token_file)})
    assert (from_file.token, from_file.token_file) == ("secret-2", str(token_file))
    with pytest.raises(ValueError, match="set token or token_file, not both"):
        Settings.from_extra_config({"token": "a", "token_file": str(token_file)})
    with pytest.raises(ValueError, match=r"token_file '.*missing' cannot be read: .*No such file"):
        Settings.from_extra_config({"token_file": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="token_file '.*empty' is empty"):
        Settings.from_extra_config({"token_file": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="token must be a non-empty string"):
        Settings.from_extra_config({"token": ""})
