"""The CPU backend's weight conversion while loading (``cpu/convert.cpp``), behind
``CpuKernels.dequantize`` and ``CpuKernels.quantize_into``: GGUF K-quant / IQ3_XXS blocks to float32,
and float weights to moekit's int8 / int4 layouts. Each gives its reference's values bit for bit
(``reference.dequantize``, gguf-py's; ``kernels.weights.quantize_into``), which the tests check
(tests/test_kernels_convert.py); anything the kernels do not take goes to the reference.

Shape legend: R rows, K values per row.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from moekit.kernels import reference
from moekit.kernels.weights import QUANT_PIECE, quantize_into as reference_quantize_into

DTYPES = (torch.bfloat16, torch.float32)  # rows the quantisation kernel reads


@lru_cache(maxsize=1)
def _iq3_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """IQ3_XXS's grid [256, 4] (float32 values) and sign bytes [128], as gguf-py holds them."""
    from gguf.quants import IQ2_XXS, IQ3_XXS

    IQ3_XXS.init_grid()
    return (torch.from_numpy(IQ3_XXS.grid.reshape(256, 4).copy()),
            torch.frombuffer(bytearray(IQ2_XXS.ksigns), dtype=torch.uint8))


@lru_cache(maxsize=None)
def kinds(ext) -> frozenset[str]:
    """The GGML types the extension dequantises."""
    return frozenset(ext.dequant_kinds())


def dequantize(ext, raw_RB: torch.Tensor, kind: str, K: int, out_RK: torch.Tensor | None = None) -> torch.Tensor:
    """GGUF blocks (uint8 [R, bytes]) as float32 [R, K] (into ``out_RK``, contiguous, if given): the kernels
    for the K-quants and IQ3_XXS (5-43x gguf-py's speed here, BENCHMARKS.md), gguf-py for any other type."""
    if kind not in kinds(ext):
        return reference.dequantize(raw_RB, kind, K, out_RK)
    return ext.dequant(raw_RB.contiguous(), kind, K, *_iq3_tables(), out_RK)


@torch.no_grad()
def quantize_into(ext, w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                  dtype: torch.dtype | None = None) -> None:
    """:func:`moekit.kernels.weights.quantize_into` in one pass without float32 temporaries, for float32 /
    bfloat16 rows (float16: a piece of rows at a time, made float32) rounded to float32 or bfloat16;
    anything else on the reference."""
    K = w.shape[-1]
    rows, d, s = w.reshape(-1, K), data.view(-1, data.shape[-1]), scale.view(-1, scale.shape[-1])
    if dtype not in (None, *DTYPES) or rows.stride(-1) != 1 or not w.is_floating_point():
        reference_quantize_into(w, data, scale, dtype)
        return
    bf = dtype == torch.bfloat16 and w.dtype != torch.bfloat16
    if w.dtype in DTYPES:
        ext.quantize(rows, d, s, bf)
        return
    step = max(1, QUANT_PIECE // (4 * K))
    for r in range(0, len(rows), step):
        ext.quantize(rows[r:r + step].float(), d[r:r + step], s[r:r + step], bf)
