"""Where one block's bytes sit inside one layer's KV tensor.

vLLM allocates each attention layer's paged KV cache as one tensor whose shape depends on the
attention backend. The connector never hard-codes a shape: a `LayoutSpec` names which dimension
indexes blocks, and `BlockLayout.of` reads the tensor's real strides to produce, for any block
id, the list of `(address, length)` runs that hold that block. Those runs are what
`kvcache.Client.put_many` and `get_many_into` take, so blocks move between the cache and the KV
tensor without a copy through Python.

Known layouts (per layer):

- ``cpu``: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (vLLM's CPU backend). A
  block is one contiguous run.
- ``flash_attn``: ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (FlashAttention on
  CUDA). A block is two runs, its K and its V.
- ``flashinfer``: ``[num_blocks, 2, block_size, num_kv_heads, head_size]``. One run.

Other backends are described by adding a `LayoutSpec`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class LayoutError(ValueError):
    """A KV tensor does not have the layout the connector was configured for."""


@dataclass(frozen=True)
class LayoutSpec:
    """A backend's per-layer KV tensor layout: its name and the dimension that indexes blocks."""

    name: str
    block_dim: int
    shape: str

    def expected_shape(self, num_blocks: int, num_kv_heads: int, block_size: int, head_size: int) -> tuple[int, ...]:
        """The full tensor shape this layout has for the given model and cache sizes."""
        sizes = {
            "B": num_blocks,
            "H": num_kv_heads,
            "N": block_size,
            "D": head_size,
            "2D": 2 * head_size,
            "2": 2,
        }
        return tuple(sizes[dim] for dim in self.shape.split(","))


LAYOUTS: dict[str, LayoutSpec] = {
    spec.name: spec
    for spec in (
        LayoutSpec("cpu", block_dim=0, shape="B,H,N,2D"),
        LayoutSpec("flash_attn", block_dim=1, shape="2,B,N,H,D"),
        LayoutSpec("flashinfer", block_dim=0, shape="B,2,N,H,D"),
    )
}


def layout_spec(name: str) -> LayoutSpec:
    """The spec called `name`, or a LayoutError listing the known ones."""
    try:
        return LAYOUTS[name]
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise LayoutError(f"unknown KV layout {name!r}; known layouts: {known}") from None


def default_layout_name(device_type: str) -> str:
    """The layout vLLM uses by default on a device type (`cpu`, `cuda`)."""
    return "cpu" if device_type == "cpu" else "flash_attn"


@dataclass(frozen=True)
class BlockLayout:
    """The byte runs of every block of one layer's KV tensor."""

    spec: LayoutSpec
    base: int
    num_blocks: int
    block_stride: int
    run_bytes: int
    run_offsets: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor, spec: LayoutSpec, num_blocks: int) -> BlockLayout:
        """Describes `tensor` as laid out by `spec`, from its real strides.

        Raises LayoutError if the block dimension does not have `num_blocks` entries or if the
        dimensions after it are not contiguous (a block would then not be a few runs).
        """
        shape = tuple(tensor.shape)
        dim = spec.block_dim
        if len(shape) <= dim or shape[dim] != num_blocks:
            raise LayoutError(
                f"KV tensor of shape {list(shape)} does not match layout {spec.name!r} "
                f"({spec.shape}): expected {num_blocks} blocks in dimension {dim}"
            )
        element = tensor.element_size()
        strides = tensor.stride()
        run_bytes = element
        for d in reversed(range(dim + 1, len(shape))):
            if shape[d] > 1 and strides[d] * element != run_bytes:
                raise LayoutError(
                    f"KV tensor of shape {list(shape)} and strides {list(strides)} is not "
                    f"contiguous within a block (layout {spec.name!r})"
                )
            run_bytes *= shape[d]
        outer = [range(n) for n in shape[:dim]]
        offsets = tuple(
            sum(i * strides[d] * element for d, i in enumerate(index)) for index in itertools.product(*outer)
        )
        return cls(
            spec=spec,
            base=tensor.data_ptr(),
            num_blocks=num_blocks,
            block_stride=strides[dim] * element,
            run_bytes=run_bytes,
            run_offsets=offsets,
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of this layer."""
        return self.run_bytes * len(self.run_offsets)

    def segments(self, block_id: int) -> list[tuple[int, int]]:
        """The `(address, length)` runs holding block `block_id`, in a fixed order."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} out of range 0..{self.num_blocks}")
        start = self.base + block_id * self.block_stride
        return [(start + offset, self.run_bytes) for offset in self.run_offsets]
