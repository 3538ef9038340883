"""The few-token path of the fused MoE: GEMV-style kernels over the selected experts, no alignment.

Shape legend: T tokens, K routed slots per token, C shared-expert chunks, KC = K + C,
S = T * KC slots, D model width, F expert width, Fs shared width, BN/BK tile sizes.

With a handful of tokens every selected expert sees about one token, so padding to a
tensor-core tile and sorting by expert only add launches. Here each program reads its
expert straight from ``ids`` (gpt-fast's weight gather, done in a kernel instead of
materialised) and streams a BN x BK weight tile per step with fp32 FMAs:

- ``gate_up``: grid (S, F / BN), slots fastest, so the programs that run together read
  the same weight rows of each expert (two tokens on one expert hit L2, not HBM);
- ``down``: grid (T, D / BN); one program walks its token's KC slots and accumulates
  weight * (h W2^T) in fp32 registers: the routing-weight multiply and the top-k sum
  are fused, in a fixed order (deterministic, no atomics, no zero-fill).

Shared-expert chunks are the virtual experts E.. of ``grouped.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.triton.tuning import autotuned, pick

# memory-bound: what matters is bytes in flight per SM, so wide BK tiles and enough programs (narrow BN)
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
           for bn, bk, w, st in ((8, 512, 4, 2), (16, 256, 4, 3), (16, 512, 8, 2), (32, 256, 8, 2),
                                 (8, 1024, 8, 1), (32, 128, 4, 3), (64, 128, 8, 2))]
SMALL = {"BLOCK_N": 32, "BLOCK_K": 64}  # the interpreter's config: few, large programs run fastest there


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, w_ptr, ws_ptr, h_ptr, D, F, Fs, stride_x, stride_we, stride_wn, stride_sn,
                    TOKENS, K: tl.constexpr, KC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = s // KC
    j = s % KC
    if j < K:
        e = tl.load(ids_ptr + t * K + j).to(tl.int64)
        g_base = w_ptr + e * stride_we
        u_base = g_base + F * stride_wn
        row = stride_wn
        width = F
    else:
        g_base = ws_ptr + ((j - K) * F).to(tl.int64) * stride_sn
        u_base = g_base + Fs * stride_sn
        row = stride_sn
        width = tl.minimum(F, Fs - (j - K) * F)
    if pid_n * BLOCK_N >= width:
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < width
    k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = k0 + k < D
        xk = tl.load(x_ptr + t.to(tl.int64) * stride_x + k0 + k, mask=k_ok, other=0.0).to(tl.float32)
        off = n[:, None].to(tl.int64) * row + (k0 + k)[None, :]
        ok = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(g_base + off, mask=ok, other=0.0).to(tl.float32) * xk[None, :]
        acc_u += tl.load(u_base + off, mask=ok, other=0.0).to(tl.float32) * xk[None, :]
    g = tl.sum(acc_g, axis=1)
    h = g * tl.sigmoid(g) * tl.sum(acc_u, axis=1)
    tl.store(h_ptr + s.to(tl.int64) * F + n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, weights_ptr, gate_ptr, w_ptr, ws_ptr, y_ptr, D, F, Fs, stride_we, stride_wn,
                 stride_sn, TOKENS, K: tl.constexpr, KC: tl.constexpr, HAS_GATE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    k = tl.arange(0, BLOCK_K)
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(KC):
        if j < K:
            e = tl.load(ids_ptr + t * K + j).to(tl.int64)
            base = w_ptr + e * stride_we
            row = stride_wn
            width = F
            w = tl.load(weights_ptr + t * K + j)
        else:
            base = ws_ptr + (j - K) * F
            row = stride_sn
            width = tl.minimum(F, Fs - (j - K) * F)
            if HAS_GATE:
                w = tl.load(gate_ptr + t)
            else:
                w = 1.0
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        h_row = h_ptr + (t * KC + j).to(tl.int64) * F
        for k0 in range(0, width, BLOCK_K):
            k_ok = k0 + k < width
            hk = tl.load(h_row + k0 + k, mask=k_ok, other=0.0).to(tl.float32)
            wt = tl.load(base + n[:, None].to(tl.int64) * row + (k0 + k)[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += wt.to(tl.float32) * hk[None, :]
        out += w * tl.sum(acc, axis=1)
    tl.store(y_ptr + t.to(tl.int64) * D + n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


_gate_up_tuned = autotuned(_gate_up_kernel, CONFIGS, ["F", "D", "TOKENS"])
_down_tuned = autotuned(_down_kernel, CONFIGS, ["F", "D", "TOKENS"])


def gate_up(x_TD, ids_TK, w13_EFD, w13_s, C: int, config: dict | None = None) -> torch.Tensor:
    """h [S, F]: silu(gate) * up for every (token, slot), slots in token order."""
    T, K = ids_TK.shape
    _, F2, D = w13_EFD.shape
    F = F2 // 2
    ws = w13_EFD if w13_s is None else w13_s
    Fs = 0 if w13_s is None else w13_s.shape[0] // 2
    S = T * (K + C)
    h = torch.empty(S, F, dtype=x_TD.dtype, device=x_TD.device)
    kernel, meta = pick(_gate_up_kernel, _gate_up_tuned, config, SMALL)
    grid = lambda m: (S, triton.cdiv(F, m["BLOCK_N"]))  # noqa: E731
    kernel[grid](x_TD, ids_TK, w13_EFD, ws, h, D, F, Fs, x_TD.stride(0), w13_EFD.stride(0), w13_EFD.stride(1),
                 ws.stride(0), T, K=K, KC=K + C, **meta)
    return h


def down(h_SF, ids_TK, weights_TK, gate_T, w2_EDF, w2_s, C: int, config: dict | None = None) -> torch.Tensor:
    """y [T, D]: sum over each token's slots of weight * expert output (shared chunks: gate or 1)."""
    T, K = ids_TK.shape
    _, D, F = w2_EDF.shape
    ws = w2_EDF if w2_s is None else w2_s
    Fs = 0 if w2_s is None else w2_s.shape[1]
    y = torch.empty(T, D, dtype=h_SF.dtype, device=h_SF.device)
    kernel, meta = pick(_down_kernel, _down_tuned, config, SMALL)
    grid = lambda m: (T, triton.cdiv(D, m["BLOCK_N"]))  # noqa: E731
    kernel[grid](h_SF, ids_TK, weights_TK, weights_TK if gate_T is None else gate_T, w2_EDF, ws, y, D, F, Fs,
                 w2_EDF.stride(0), w2_EDF.stride(1), ws.stride(0), T, K=K, KC=K + C, HAS_GATE=gate_T is not None,
                 **meta)
    return y
