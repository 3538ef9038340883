"""GGUF tensors as moekit weights: the byte layouts, and :class:`GGUFSlice`, which reads one tensor (or
one expert of a stacked one) from its byte range in the file into the model.

GGUF dims are reversed against numpy (gguf-py's reader undoes that). F32 / F16 / BF16 are copied;
Q8_0 and Q4_0 blocks are moekit's int8 / int4 :class:`QuantWeight` layouts with group 32 (the same
bytes, :func:`copy_blocks`); every other type is dequantised by the model's kernel backend
(``Backend.dequantize``: the CPU backend's C++ kernels for K-quants and IQ3_XXS, gguf-py otherwise).
``llama``, ``deepseek`` and ``bailingmoe`` store the Q/K rows permuted for llama.cpp's rotary layout
(:func:`unpermute`).

Reads are ``preadv`` calls at the tensor's offset, not a memory map: the mapped pages of a file
count in the process's resident set while mapped, so loading through the map took the file's size
on top of the model's (bench/offload.py, the Q4_0 bench file with 421 MiB of weights: peak RSS
1359 MiB through the map, 884 MiB with these reads). The model load (:func:`moekit.weights.gguf_import.load_gguf`) and
expert offload (:mod:`moekit.weights.offload`) use the same reads:

- F32 / F16 / BF16 into a CPU view of the same dtype: straight into the model's memory;
- Q8_0 / Q4_0 the model keeps: through a buffer of the bytes, split into data and scales;
- anything else: through that buffer, converted in pieces of rows (dequantised, and
  quantised again when the model's matrix is int8 / int4 in another format or group: loading with
  ``quantize=``), so the float32 temporaries stay near :data:`PIECE` bytes whatever the tensor's size.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.kernels import reference
from moekit.kernels.weights import QuantWeight
from moekit.weights.expert_cache import pread_exact, read_buffer

FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NUMPY = {"F32": np.float32, "F16": np.float16}  # gguf-py's array types (BF16 and blocks: raw bytes)
PIECE = 1 << 20  # float32 bytes of one dequantised piece (the budget allows 16x for its temporaries)
KEPT = {"Q8_0": torch.int8, "Q4_0": torch.uint8}  # blocks that are moekit's int8 / int4 data with group 32


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # gguf-py's memory-mapped arrays are read-only; they are only ever read
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(a)


def copy_blocks(raw: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> None:
    """Q8_0 / Q4_0 blocks (bytes [..., N, K / 32 * block]) into moekit's int8 / int4 ``data`` [..., N, K]
    (int4: [..., N, K / 2]) and ``scale`` [..., N, K / 32]: each 32-column block is a float16 scale then
    32 int8 values (Q8_0) or 16 bytes of nibbles, column j low and j + 16 high, stored as q + 8 (Q4_0) --
    moekit's layouts with group 32, the same bytes."""
    blocks = raw.reshape(*scale.shape, -1)  # [.., N, G, bytes]
    scale.copy_(blocks[..., :2].view(torch.float16).squeeze(-1))
    data.view(*scale.shape, -1).copy_(blocks[..., 2:].view(data.dtype))


def quant_weight(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> QuantWeight:
    """A Q8_0 / Q4_0 block array as moekit's int8 / int4 weight (:func:`copy_blocks`)."""
    w = QuantWeight("int8" if kind == "Q8_0" else "int4", shape, 32, device="meta")
    w.data, w.scale = torch.empty_like(w.data, device="cpu"), torch.empty_like(w.scale, device="cpu")
    copy_blocks(_from_numpy(raw), w.data, w.scale)
    return w


def tensor_value(raw: np.ndarray, kind: str, shape: tuple[int, ...], dequantize: Callable = reference.dequantize,
                 out: torch.Tensor | None = None) -> torch.Tensor | QuantWeight:
    """One GGUF matrix (or vector) as a torch tensor over the given bytes, or a QuantWeight; other block
    types through ``dequantize`` (a kernel backend's), into float32 ``out`` if given."""
    if kind in ("F32", "F16"):
        return _from_numpy(raw).reshape(shape)
    if kind == "BF16":  # gguf-py gives the raw bytes
        return _from_numpy(raw).view(torch.bfloat16).reshape(shape)
    if kind in ("Q8_0", "Q4_0") and len(shape) >= 2 and shape[-1] % 32 == 0:
        return quant_weight(raw, kind, shape)
    rows = _from_numpy(np.asarray(raw)).reshape(math.prod(shape[:-1]), -1)
    return dequantize(rows, kind, shape[-1], out).reshape(shape)


def _aligned(n: int) -> int:
    """``n`` rounded up to a multiple of 64 bytes."""
    return -(-n // 64) * 64


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [heads * A, ...] from llama.cpp's rotary order (pairs interleaved) back to Hugging Face's
    (halves): the inverse of convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute_value(v, heads: int):
    if isinstance(v, QuantWeight):  # quantisation is along rows: permuting rows permutes data and scales alike
        out = QuantWeight(v.format, v.shape, v.group, device="meta")
        out.data, out.scale = unpermute(v.data, heads), unpermute(v.scale, heads)
        return out
    return unpermute(v, heads)


def store(view: torch.Tensor, scale: torch.Tensor | None, value) -> None:
    """Copy one GGUF matrix into the model. A Q8_0 / Q4_0 source (a QuantWeight) fills a quantised weight
    byte for byte (``view`` its data, ``scale`` its scales) and is dequantised into a floating-point one
    (``scale`` None)."""
    if scale is not None:
        view.copy_(value.data)
        scale.copy_(value.scale)
    else:
        view.copy_(value.dequantize(view.dtype) if isinstance(value, QuantWeight) else value.reshape(view.shape))


def store_into(views, value, dtype: torch.dtype, quantize_into: Callable = reference.quantize_into) -> None:
    """One matrix (a tensor, or a Q8_0 / Q4_0 QuantWeight) into (weight,), or into (data, scales): byte for
    byte when it is already in their format (int8 data, or int4 packed in uint8) and group (columns per
    scale), else rounded to ``dtype`` and quantised to it (by ``quantize_into``, a kernel backend's), as
    loading in ``dtype`` and then quantising would."""
    if len(views) == 1:
        store(views[0], None, value)
        return
    data, scale = views
    K = value.shape[-1]
    fmt, group = "int8" if data.dtype == torch.int8 else "int4", K // scale.shape[-1]
    if isinstance(value, QuantWeight):
        if (value.format, value.group) == (fmt, group):
            store(data, scale, value)
            return
        value = value.dequantize()
    quantize_into(value.reshape(*data.shape[:-1], K), data, scale, dtype)


@dataclass(frozen=True)
class GGUFSlice:
    """One GGUF tensor, or one expert of a stacked one: file, absolute byte offset and size, GGML
    type, logical shape, the head count whose Q/K rows to unpermute (0: none), the model's compute
    dtype (values quantised on the way in are rounded to it first), and its kernel backend, whose
    ``dequantize`` and ``quantize_into`` convert the values (or the reference module's)."""

    path: Path
    name: str
    offset: int
    nbytes: int
    kind: str
    shape: tuple[int, ...]
    heads: int = 0
    dtype: torch.dtype = torch.float32
    kernels: Any = reference

    def direct(self, views: tuple[torch.Tensor, ...]) -> bool:
        """Whether the bytes can be read straight into the one view (same dtype, contiguous, in order; in
        CPU memory, or a meta-device view that will be)."""
        v = views[0]
        return (len(views) == 1 and not self.heads and FLOAT.get(self.kind) == v.dtype and v.is_contiguous()
                and v.numel() * v.element_size() == self.nbytes and v.device.type in ("cpu", "meta"))

    def scratch(self, views: tuple[torch.Tensor, ...]) -> int:
        """Bytes a read takes beyond its views: the file's bytes, and when converted in pieces the
        float32 values of a piece of rows and the temporaries of dequantising and quantising it."""
        if self.direct(views):
            return 0
        if self.kept(views) or (self.kind in FLOAT and len(views) == 1):
            return self.nbytes
        if self.heads:
            return self.nbytes + 8 * math.prod(self.shape)
        return self.nbytes + 16 * min(PIECE, 4 * math.prod(self.shape))

    def pieces(self, views: tuple[torch.Tensor, ...]) -> int:
        """Rows converted at once (float32 values of at most PIECE bytes); 0 when converted whole or not at all."""
        if self.direct(views) or self.kept(views) or (self.kind in FLOAT and len(views) == 1) or self.heads:
            return 0
        return min(math.prod(self.shape[:-1]), max(1, PIECE // (4 * self.shape[-1])))

    def buffer_bytes(self, views: tuple[torch.Tensor, ...]) -> int:
        """The reusable buffer a fill uses: the file's bytes, then one piece's float32 values (0: read in place)."""
        if self.direct(views):
            return 0
        return _aligned(self.nbytes) + 4 * self.pieces(views) * self.shape[-1]

    def fill(self, fd: int, views: tuple[torch.Tensor, ...], drop_page_cache: bool = False,
             buffer: torch.Tensor | None = None) -> None:
        """Read the slice and write it into ``views``: (weight,) or, for an int8 / int4 matrix, (data, scales);
        through ``buffer`` (uint8 of :meth:`buffer_bytes`; else a temporary one) unless read in place. The
        pieces' float32 values go to the buffer's tail: a fresh 1 MiB tensor per piece raised glibc's mmap
        threshold and fragmented the heap (an offloaded Q4_K_M file decoding 64 tokens: 158 MiB against
        144 with the values in the buffer, bench/offload.py at 0.15 GiB)."""
        if self.direct(views):
            pread_exact(fd, views[0].data_ptr(), self.nbytes, self.offset, self.path, self.name)
        else:
            buf = read_buffer(buffer, self.nbytes)
            pread_exact(fd, buf.data_ptr(), self.nbytes, self.offset, self.path, self.name)
            with torch.no_grad():
                if self.kept(views):  # Q8_0 / Q4_0 as int8 / int4 with group 32: straight into data and scales
                    copy_blocks(buf, *views)
                elif (self.kind in FLOAT and len(views) == 1) or self.heads:  # whole (small, or no temporary)
                    value = tensor_value(self._raw(buf.numpy()), self.kind, self.shape, self.kernels.dequantize)
                    store_into(views, _unpermute_value(value, self.heads) if self.heads else value, self.dtype,
                               self.kernels.quantize_into)
                else:  # converted a piece of rows at a time
                    raw, K, step = self._raw(buf.numpy()), self.shape[-1], self.pieces(views)
                    out = [v.view(len(raw), -1) for v in views]
                    at, n = _aligned(self.nbytes), 4 * step * K
                    values = (buffer[at:at + n] if buffer is not None and len(buffer) >= at + n
                              else torch.empty(n, dtype=torch.uint8)).view(torch.float32).view(step, K)
                    for r in range(0, len(raw), step):
                        piece = raw[r:r + step]
                        value = tensor_value(piece, self.kind, (len(piece), K), self.kernels.dequantize,
                                             values[:len(piece)])
                        store_into([v[r:r + len(piece)] for v in out], value, self.dtype, self.kernels.quantize_into)
        if drop_page_cache:
            os.posix_fadvise(fd, self.offset, self.nbytes, os.POSIX_FADV_DONTNEED)

    def kept(self, views: tuple[torch.Tensor, ...]) -> bool:
        """Whether the model keeps these blocks as they are: int8 (Q8_0) or int4 (Q4_0) with group 32."""
        if len(views) != 2 or self.heads or self.kind not in KEPT:
            return False
        data, scale = views
        return data.dtype == KEPT[self.kind] and scale.shape[-1] * 32 == self.shape[-1]

    def _raw(self, buf: np.ndarray) -> np.ndarray:
        """The bytes in rows as gguf-py's reader gives them: values for F32 / F16, else bytes."""
        rows = math.prod(self.shape[:-1])
        return (buf.view(NUMPY[self.kind]) if self.kind in NUMPY else buf).reshape(rows, -1)
