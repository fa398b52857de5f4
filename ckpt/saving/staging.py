"""Staging buffers: host copies of tensors that an asynchronous save writes from."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["StagingBuffers"]


class StagingBuffers:
    """Host buffers, one per tensor name, reused by every save whose tensor has the same layout.

    Copies from CUDA go into pinned memory without blocking; ``stage`` returns
    once every copy has finished, so the caller may change its tensors at once.
    Not thread-safe: stage again only after the previous save has finished.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def stage(
        self, files: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Copy every tensor into its buffer; return the same layout holding the buffers."""
        staged: dict[str, dict[str, torch.Tensor]] = {}
        cuda = False
        for file_name, tensors in files.items():
            staged[file_name] = {}
            for name, tensor in tensors.items():
                source = tensor.detach()
                if source.is_conj():
                    source = source.resolve_conj()
                if source.is_neg():
                    source = source.resolve_neg()
                buffer = self._buffer(name, source)
                on_cuda = source.device.type == "cuda"
                buffer.copy_(source, non_blocking=on_cuda)
                cuda |= on_cuda
                staged[file_name][name] = buffer
        if cuda:
            torch.cuda.synchronize()
        return staged

    def _buffer(self, name: str, source: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            pin = source.device.type == "cuda" and torch.cuda.is_available()
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=pin)
            self._buffers[name] = buffer
        return buffer
