"""Staging blocks between KV tensors outside host memory (CUDA) and pinned host memory.

The client moves bytes between the cache and host memory (TCP, shared memory, RDMA). A CUDA
engine's KV tensors are device memory, so each load lands in a pinned host buffer, one
contiguous run per block, and is then copied into the block's runs of the device tensor on a
side stream; each save waits for the layer's compute (an event recorded when vLLM hands the
layer over), copies the block's runs into the buffer on that stream, and puts from there. The
I/O thread waits for its stream before it returns, so a layer's load is in place when
`wait_for_layer_load` returns and a save's buffer is stable while the client reads it.

Host tensors can be staged too (`staging = "always"`): the same code with plain copies, which
is how the path is tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib

import torch


class Staging:
    """One worker's pinned buffer and the byte views of its KV tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.buffer = torch.empty(0, dtype=torch.uint8)
        # (first address, bytes, flat uint8 view) of every KV tensor's storage.
        self.storages: list[tuple[int, int, torch.Tensor]] = []

    def add_tensor(self, tensor: torch.Tensor) -> None:
        """Makes `tensor`'s memory addressable by the segments its layout hands out."""
        storage = tensor.untyped_storage()
        flat = torch.empty(0, dtype=torch.uint8, device=tensor.device)
        flat.set_(storage, 0, (storage.nbytes(),), (1,))
        self.storages.append((storage.data_ptr(), storage.nbytes(), flat))

    def mark(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on the current stream (None on the CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def host_segments(self, segments: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        """One contiguous host run per block, in the pinned buffer, of the block's length."""
        total = sum(length for segs in segments for _, length in segs)
        if self.buffer.numel() < total:
            size = 1 << max(20, (total - 1).bit_length())
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
        base = self.buffer.data_ptr()
        out, at = [], 0
        for segs in segments:
            n = sum(length for _, length in segs)
            out.append([(base + at, n)])
            at += n
        return out

    def to_device(self, segments, host_segments, landed: list[bool]) -> None:
        """Copies every block that landed from the buffer into its runs of the KV tensors."""
        self._copy(segments, host_segments, landed, into_device=True, after=None)

    def from_device(self, segments, host_segments, after: torch.cuda.Event | None) -> None:
        """Copies every block's runs of the KV tensors into the buffer, after `after`."""
        self._copy(segments, host_segments, [True] * len(segments), into_device=False, after=after)

    def _copy(self, segments, host_segments, which, *, into_device: bool, after) -> None:
        base = self.buffer.data_ptr()
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            if after is not None:
                self.stream.wait_event(after)
            for segs, host, do in zip(segments, host_segments, which, strict=True):
                if not do:
                    continue
                at = host[0][0] - base
                for addr, length in segs:
                    device = self._view(addr, length)
                    staged = self.buffer[at : at + length]
                    if into_device:
                        device.copy_(staged, non_blocking=self.cuda)
                    else:
                        staged.copy_(device, non_blocking=self.cuda)
                    at += length
        if self.cuda:
            self.stream.synchronize()

    def _view(self, addr: int, length: int) -> torch.Tensor:
        for first, nbytes, flat in self.storages:
            if first <= addr and addr + length <= first + nbytes:
                return flat[addr - first : addr - first + length]
        raise ValueError(f"no KV tensor holds {length} bytes at {addr:#x}")
