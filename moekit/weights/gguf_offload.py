"""Expert offload from a GGUF file: ``moekit.load("model.gguf", max_memory=GiB)``.

The sources of :mod:`moekit.weights.offload` for a llama.cpp file. Every tensor, or for a stacked
expert tensor (``blk.N.ffn_gate_exps.weight [E, F, D]``) every expert's contiguous slice of it, is
a :class:`GGUFSlice`: its byte range in the file and GGML type. Reads are ``preadv`` calls, as for
safetensors (no memory map, so the process's resident set stays within the budget):

- F32 / F16 / BF16 into a view of the same dtype: straight into the model's memory;
- otherwise through a buffer of the slice's bytes, converted as :func:`moekit.load` converts the
  memory-mapped file (:func:`moekit.weights.gguf_import.tensor_value`): Q8_0 / Q4_0 blocks split
  into moekit's int8 / int4 data and scales when the file keeps them, other types dequantised by
  gguf-py. The cache's read buffer (the budget's "read buffer") is the largest such conversion.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit.families.base import SCALE
from moekit.models import MoEDecoder
from moekit.weights.expert_cache import pread_exact
from moekit.weights.gguf_import import _unpermute_value, copy_blocks, plan_gguf, store, tensor_value

FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NUMPY = {"F32": np.float32, "F16": np.float16}  # gguf-py's array types (BF16 and blocks: raw bytes)


@dataclass(frozen=True)
class GGUFSlice:
    """One GGUF tensor, or one expert of a stacked one: file, absolute byte offset and size, GGML
    type, logical shape, and the head count whose Q/K rows to unpermute (0: none)."""

    path: Path
    name: str
    offset: int
    nbytes: int
    kind: str
    shape: tuple[int, ...]
    heads: int = 0

    def direct(self, views: tuple[torch.Tensor, ...]) -> bool:
        """Whether the bytes can be read straight into the one view (same dtype, contiguous, in order)."""
        v = views[0]
        return (len(views) == 1 and not self.heads and FLOAT.get(self.kind) == v.dtype and v.is_contiguous()
                and v.numel() * v.element_size() == self.nbytes)

    def scratch(self, views: tuple[torch.Tensor, ...]) -> int:
        """Bytes a read takes beyond its views: the file's bytes, and for a dequantised type its
        float32 values and gguf-py's temporaries."""
        if self.direct(views):
            return 0
        if self.kind in FLOAT or len(views) == 2:
            return self.nbytes
        return self.nbytes + 8 * math.prod(self.shape)

    def fill(self, fd: int, views: tuple[torch.Tensor, ...], drop_page_cache: bool = False) -> None:
        """Read the slice and write it into ``views``: (weight,) or, kept quantised, (data, scales)."""
        if self.direct(views):
            pread_exact(fd, views[0].data_ptr(), self.nbytes, self.offset, self.path, self.name)
        else:
            buf = torch.empty(self.nbytes, dtype=torch.uint8)
            pread_exact(fd, buf.data_ptr(), self.nbytes, self.offset, self.path, self.name)
            with torch.no_grad():
                if len(views) == 2 and not self.heads:  # kept Q8_0 / Q4_0: straight into data and scales
                    copy_blocks(buf, *views)
                else:
                    value = tensor_value(self._raw(buf.numpy()), self.kind, self.shape)
                    if self.heads:
                        value = _unpermute_value(value, self.heads)
                    store(views[0], views[1] if len(views) == 2 else None, value)
        if drop_page_cache:
            os.posix_fadvise(fd, self.offset, self.nbytes, os.POSIX_FADV_DONTNEED)

    def _raw(self, buf: np.ndarray) -> np.ndarray:
        """The bytes as gguf-py's reader gives them: typed for F32 / F16, else rows of bytes."""
        if self.kind in NUMPY:
            return buf.view(NUMPY[self.kind])
        rows = math.prod(self.shape[:-1])
        return buf.reshape(rows, self.nbytes // rows)


def gguf_sources(path: Path, dtype, device, kernels: str) -> tuple[MoEDecoder, torch.dtype, list]:
    """The model on the meta device, its dtype, and [(GGUFSlice, names of the views it fills)] for
    every tensor of a GGUF file (each expert of a stacked tensor its own slice)."""
    plan = plan_gguf(path, dtype)
    meta = plan.on_meta(device, kernels)
    names = set(meta.named_views())
    reads = []
    for g, targets in plan.sources.items():
        t = plan.tensors[g]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        for name, index in targets:
            fills = (name, name + SCALE) if name + SCALE in names else (name,)
            if index is None:
                reads.append((GGUFSlice(path, g, t.data_offset, t.n_bytes, t.tensor_type.name, shape,
                                        plan.heads(g)), fills))
            else:
                each = t.n_bytes // shape[0]
                reads.append((GGUFSlice(path, g, t.data_offset + index * each, each, t.tensor_type.name, shape[1:]),
                              fills))
    return meta, plan.dtype, reads
