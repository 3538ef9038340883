"""The Triton backend: fused MoE, routing, RMSNorm, RoPE and SiLU-and-multiply kernels for CUDA tensors.

Every function has the signature of its twin in :mod:`moekit.kernels.reference` and
falls back to it where the kernels do not apply: CPU tensors (unless the kernels were
built for the interpreter, ``TRITON_INTERPRET=1``), autograd, other dtypes.
Dense matmuls stay with cuBLAS (``linear``) and attention over a contiguous cache
with PyTorch's SDPA (flash / memory-efficient kernels); attention over a paged cache
is ``paged.py``. Design notes: docs/gpu.md.

    moe.py       routed + shared experts: the decode (GEMV) and grouped (aligned GEMM) paths
    routing.py   softmax / sigmoid scores, selection bias, top-k, renormalisation
    align.py     slots grouped by expert and padded to the GEMM tile
    grouped.py   grouped GEMMs: gate+up with SiLU-and-multiply; down with the routing weight
    decode.py    GEMV-style gate+up and down (weighted top-k sum fused) for a few tokens
    elementwise.py  RMSNorm, SiLU-and-multiply, RoPE
    paged.py     attention over a paged KV cache (online softmax through the block table)
    tuning.py    autotuning over short config lists (no tuning files)
    interpret.py running on CPU under TRITON_INTERPRET=1 (tests, bench smoke runs)
"""

from __future__ import annotations

import torch

from moekit.kernels import reference
from moekit.kernels.weights import ExpertWeights
from moekit.kernels.triton import elementwise, paged, routing
from moekit.kernels.triton.interpret import interpreted
from moekit.kernels.triton.moe import fused_moe

INTERPRETED = interpreted(routing._route_kernel)  # fixed when the kernels were decorated (at import)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _applies(*ts: torch.Tensor) -> bool:
    """The kernels apply: CUDA tensors (or CPU ones under the interpreter) of one float dtype, no autograd."""
    x = ts[0]
    where = x.is_cuda or (INTERPRETED and x.device.type == "cpu")
    return (where and x.dtype in DTYPES and all(t.dtype == x.dtype and t.device == x.device for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    return reference.linear(x, w, b)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    return elementwise.silu_mul(h) if _applies(h) else reference.silu_mul(h)


def mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return reference.mlp(x, w13, w2, act=silu_mul)


def moe_experts(x_TD, experts: ExpertWeights, ids_TK, weights_TK) -> torch.Tensor:
    """The fused Triton MoE for plain CUDA weights; quantised weights take the reference path."""
    if experts.is_quantized() or not (_applies(x_TD, *experts.tensors()) and x_TD.dim() == 2
                                      and ids_TK.device == x_TD.device):
        return reference.moe_experts(x_TD, experts, ids_TK, weights_TK, act=silu_mul)
    shared = (experts.shared_w13, experts.shared_w2, experts.shared_gate_T) if experts.has_shared else None
    return fused_moe(x_TD, experts.w13, experts.w2, ids_TK, weights_TK, shared)


def route(logits_TE, k, score_func="softmax", renormalize=True, eps=0.0, bias_E=None):
    if _applies(logits_TE) and logits_TE.dim() == 2:
        return routing.route(logits_TE, k, score_func, renormalize, eps, bias_E)
    return reference.route(logits_TE, k, score_func, renormalize, eps, bias_E)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if _applies(x, w) and w.is_contiguous() and w.shape == x.shape[-1:]:
        return elementwise.rms_norm(x, w, eps)
    return reference.rms_norm(x, w, eps)


def rotary(x_BNTA: torch.Tensor, cos_BTA: torch.Tensor, sin_BTA: torch.Tensor) -> torch.Tensor:
    if _applies(x_BNTA, cos_BTA, sin_BTA) and x_BNTA.dim() == 4 and x_BNTA.shape[-1] % 2 == 0:
        return elementwise.rotary(x_BNTA, cos_BTA, sin_BTA)
    return reference.rotary(x_BNTA, cos_BTA, sin_BTA)


def attention(q_BHTA, k_BGSA, v_BGSA, mask_BTS=None) -> torch.Tensor:
    return reference.attention(q_BHTA, k_BGSA, v_BGSA, mask_BTS)


def paged_attention(q_NHA, k_PGCA, v_PGCA, table_RM, starts_R1, lens_R, scale=None) -> torch.Tensor:
    ints = (table_RM, starts_R1, lens_R)
    if (_applies(q_NHA, k_PGCA, v_PGCA) and q_NHA.dim() == 3 and k_PGCA.dim() == 4 and k_PGCA.shape == v_PGCA.shape
            and k_PGCA.stride(-1) == v_PGCA.stride(-1) == 1 and all(t.device == q_NHA.device for t in ints)):
        return paged.paged_attention(q_NHA if q_NHA.stride(-1) == 1 else q_NHA.contiguous(), k_PGCA, v_PGCA,
                                     table_RM, starts_R1, lens_R, scale)
    return reference.paged_attention(q_NHA, k_PGCA, v_PGCA, table_RM, starts_R1, lens_R, scale)
