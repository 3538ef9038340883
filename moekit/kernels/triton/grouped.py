"""Grouped GEMMs over expert-aligned slots (see ``align.py``): the many-token path of the fused MoE.

Shape legend: S slots (token, choice) pairs, U padded slot rows (``align``), D model
width, F expert width, Fs shared-expert width, E routed experts, BM/BN/BK tile sizes.

Each program computes one BM x BN tile for ONE expert: it reads BM slot ids from the
aligned order, gathers their token rows of ``x`` and multiplies them by that expert's
weights. "Expert" ``e >= E`` is chunk ``c = e - E`` of the shared expert: gate/up rows
``c*F .. c*F + width`` of ``w13_s`` and the same columns of ``w2_s`` (a SwiGLU MLP splits
exactly along its hidden width), so routed and shared experts run in the same launch.

- ``gate_up``: h[u] = silu(x[t] Wg_e^T) * (x[t] Wu_e^T), fp32 accumulate, written at the
  aligned row u (contiguous), in the activation dtype;
- ``down``: y[s] = weight[s] * (h[u] W2_e^T), written per slot; the caller sums each
  token's K + C slots (deterministic, no atomics, no zero-fill).

Tiles BN/BK, warps and stages are autotuned per (width, D, BM, slot-count bucket) over
the short list below; BM is chosen by the caller from the tokens per expert, because the
alignment must be built for it before the GEMM runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.triton.interpret import interpreted
from moekit.kernels.triton.tuning import autotuned, pick

CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
           for bn, bk, w, st in ((64, 64, 4, 4), (128, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3),
                                 (128, 128, 8, 3))]
SMALL = {"BLOCK_N": 32, "BLOCK_K": 64}  # the interpreter's config: few, large programs run fastest there


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, ws_ptr, h_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                    S, D, F, Fs, E, stride_x, stride_we, stride_wn, stride_sn, M_BUCKET,
                    KC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m)
    if e < E:  # w13 [E, 2F, D]: gate rows 0..F, up rows F..2F of expert e
        g_base = w_ptr + e.to(tl.int64) * stride_we
        u_base = g_base + F * stride_wn
        row = stride_wn
        width = F
    else:  # w13_s [2Fs, D]: gate rows c*F.., up rows Fs + c*F.. of shared chunk c
        g_base = ws_ptr + ((e - E) * F).to(tl.int64) * stride_sn
        u_base = g_base + Fs * stride_sn
        row = stride_sn
        width = tl.minimum(F, Fs - (e - E) * F)
    if pid_n * BLOCK_N >= width:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + rows)
    valid = slot < S
    tok = (slot // KC).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < width
    k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = k0 + k < D
        a = tl.load(x_ptr + tok[:, None] * stride_x + (k0 + k)[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        w_off = n[None, :].to(tl.int64) * row + (k0 + k)[:, None]  # [BK, BN]: W^T tile
        w_ok = n_ok[None, :] & k_ok[:, None]
        bg = tl.load(g_base + w_off, mask=w_ok, other=0.0)
        bu = tl.load(u_base + w_off, mask=w_ok, other=0.0)
        if UPCAST:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rows[:, None].to(tl.int64) * F + n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, ws_ptr, y_ptr, weights_ptr, gate_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                 S, D, F, Fs, E, stride_we, stride_wn, stride_sn, M_BUCKET,
                 K: tl.constexpr, KC: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m)
    if e < E:  # w2 [E, D, F]: row n of expert e, columns 0..F
        base = w_ptr + e.to(tl.int64) * stride_we
        row = stride_wn
        width = F
    else:  # w2_s [D, Fs]: columns c*F .. c*F + width of chunk c
        base = ws_ptr + (e - E) * F
        row = stride_sn
        width = tl.minimum(F, Fs - (e - E) * F)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + rows)
    valid = slot < S
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k_ok = k0 + k < width
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * F + (k0 + k)[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(base + n[None, :].to(tl.int64) * row + (k0 + k)[:, None], mask=n_ok[None, :] & k_ok[:, None],
                    other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tok = slot // KC
    j = slot % KC
    w = tl.load(weights_ptr + tok.to(tl.int64) * K + j, mask=valid & (j < K), other=0.0)
    if HAS_GATE:
        w = tl.where(j < K, w, tl.load(gate_ptr + tok, mask=valid & (j >= K), other=0.0))
    else:
        w = tl.where(j < K, w, 1.0)
    tl.store(y_ptr + slot[:, None].to(tl.int64) * D + n[None, :], (acc * w[:, None]).to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


_gate_up_tuned = autotuned(_gate_up_kernel, CONFIGS, ["F", "D", "BLOCK_M", "M_BUCKET"])
_down_tuned = autotuned(_down_kernel, CONFIGS, ["F", "D", "BLOCK_M", "M_BUCKET"])


def _dot_options(x: torch.Tensor) -> dict:
    """fp32 inputs: exact (ieee) products, not tf32. UPCAST: the interpreter multiplies bf16 tiles as raw
    16-bit integers (numpy has no bf16), so under it bf16 tiles go through tl.dot as fp32."""
    return {"PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
            "UPCAST": interpreted(_gate_up_kernel) and x.dtype == torch.bfloat16}


def gate_up(x_TD, w13_EFD, w13_s, sorted_U, block_expert, total, slots: int, KC: int, block_m: int,
            config: dict | None = None) -> torch.Tensor:
    """h [U, F]: silu(gate) * up for every aligned slot row (pad rows left unwritten)."""
    E, F2, D = w13_EFD.shape
    F = F2 // 2
    ws = w13_EFD if w13_s is None else w13_s
    Fs = 0 if w13_s is None else w13_s.shape[0] // 2
    h = torch.empty(sorted_U.shape[0], F, dtype=x_TD.dtype, device=x_TD.device)
    kernel, meta = pick(_gate_up_kernel, _gate_up_tuned, config, SMALL)
    grid = lambda m: (block_expert.shape[0], triton.cdiv(F, m["BLOCK_N"]))  # noqa: E731
    kernel[grid](x_TD, w13_EFD, ws, h, sorted_U, block_expert, total, slots, D, F, Fs, E, x_TD.stride(0),
                 w13_EFD.stride(0), w13_EFD.stride(1), ws.stride(-2), triton.next_power_of_2(slots),
                 KC=KC, BLOCK_M=block_m, **_dot_options(x_TD), **meta)
    return h


def down(h_UF, w2_EDF, w2_s, weights_TK, gate_T, sorted_U, block_expert, total, slots: int, KC: int,
         block_m: int, config: dict | None = None) -> torch.Tensor:
    """y [S, D]: each slot's expert output times its routing weight (shared chunks: gate or 1)."""
    E, D, F = w2_EDF.shape
    ws = w2_EDF if w2_s is None else w2_s
    Fs = 0 if w2_s is None else w2_s.shape[1]
    y = torch.empty(slots, D, dtype=h_UF.dtype, device=h_UF.device)
    K = weights_TK.shape[1]
    kernel, meta = pick(_down_kernel, _down_tuned, config, SMALL)
    grid = lambda m: (block_expert.shape[0], triton.cdiv(D, m["BLOCK_N"]))  # noqa: E731
    kernel[grid](h_UF, w2_EDF, ws, y, weights_TK, weights_TK if gate_T is None else gate_T, sorted_U, block_expert,
                 total, slots, D, F, Fs, E, w2_EDF.stride(0), w2_EDF.stride(1), ws.stride(-2),
                 triton.next_power_of_2(slots), K=K, KC=KC, HAS_GATE=gate_T is not None, BLOCK_M=block_m,
                 **_dot_options(h_UF), **meta)
    return y
