"""The fused MoE: routed experts plus shared experts in two GEMM launches (plus alignment for many tokens).

Shape legend: T tokens, D model width, E routed experts, K experts per token, F expert
width, Fs shared-expert width, C = ceil(Fs / F) shared chunks, KC = K + C slots per token.

The shared expert (a SwiGLU MLP of width Fs, optionally scaled by a per-token gate)
is split along its hidden width into C chunks of at most F columns. SwiGLU is a sum
over hidden units, so chunk outputs add up to the MLP's exactly, and each chunk is just
one more "expert" every token visits with weight gate[t] (or 1). Routed and shared
work then share one launch per projection.

Two paths, picked by ``pick_path`` from the token count and the slots per expert:

- ``decode``: GEMV-style kernels that read each slot's expert directly (``decode.py``);
- ``grouped``: align slots by expert (``align.py``), then tensor-core grouped GEMMs
  (``grouped.py``) and a sum over each token's KC slot outputs.
"""

from __future__ import annotations

import torch
import triton

from moekit.kernels.triton import decode, grouped
from moekit.kernels.triton.align import align

DECODE_MAX_TOKENS = 16  # above: always the grouped path (bench/gpu.py's block table shows both paths up to 64)
DECODE_SLOTS_PER_EXPERT = 1.0  # the GEMV path while T * K < E * this: experts mostly see one token each


def pick_path(T: int, K: int, E: int) -> str:
    """"decode" (GEMV) for one token, or a few tokens that mostly land on different experts; else "grouped".

    H100, 2026-11-27 (BENCHMARKS.md): GEMV wins at XVERSE 1-8 tokens (6 of 64 experts) and Mixtral 1-2
    (2 of 8); the tensor-core grouped GEMMs win from the point where experts start to see several tokens.
    """
    return "decode" if T == 1 or (T <= DECODE_MAX_TOKENS and T * K < E * DECODE_SLOTS_PER_EXPERT) else "grouped"


def shared_chunks(expert_width: int, shared_width: int) -> int:
    """C: how many chunks of at most ``expert_width`` columns the shared expert splits into."""
    return triton.cdiv(shared_width, expert_width) if shared_width else 0


def block_m(slots: int, experts: int) -> int:
    """Rows per grouped-GEMM tile from the mean slots per touched expert (16 .. 128)."""
    per_expert = slots / max(1, min(experts, slots))
    for bm in (16, 32, 64):
        if per_expert <= bm:
            return bm
    return 128


def check(x_TD, w13_EFD, w2_EDF, ids_TK, weights_TK, shared) -> None:
    """Raise ValueError naming the tensor whose shape or layout the kernels cannot take."""
    T, D = x_TD.shape
    E, F2, D1 = w13_EFD.shape
    problems = []
    if D1 != D or F2 % 2:
        problems.append(f"w13 {list(w13_EFD.shape)} must be [E, 2F, D={D}]")
    if tuple(w2_EDF.shape) != (E, D, F2 // 2):
        problems.append(f"w2 {list(w2_EDF.shape)} must be [E={E}, D={D}, F={F2 // 2}]")
    if ids_TK.shape != weights_TK.shape or ids_TK.shape[0] != T:
        problems.append(f"ids {list(ids_TK.shape)} and weights {list(weights_TK.shape)} must both be [T={T}, K]")
    if shared is not None:
        w13_s, w2_s, gate_T = shared
        Fs = w13_s.shape[0] // 2
        if w13_s.dim() != 2 or w13_s.shape[1] != D or w13_s.shape[0] % 2 or tuple(w2_s.shape) != (D, Fs):
            problems.append(f"shared w13 {list(w13_s.shape)} / w2 {list(w2_s.shape)} must be [2Fs, D={D}] / [D, Fs]")
        if gate_T is not None and gate_T.numel() != T:
            problems.append(f"shared gate has {gate_T.numel()} values for T={T} tokens")
    for name, w in (("w13", w13_EFD), ("w2", w2_EDF)) + (() if shared is None else (("shared w13", shared[0]),
                                                                                     ("shared w2", shared[1]))):
        if w.stride(-1) != 1:
            problems.append(f"{name} needs contiguous rows (stride {w.stride()})")
    if problems:
        raise ValueError("moe_experts (triton): " + "; ".join(problems))


def fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, ids_TK: torch.Tensor,
              weights_TK: torch.Tensor, shared=None, path: str | None = None, config: dict | None = None
              ) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) (+ gate[t] * shared(x[t])) as in the reference.

    path: "decode" or "grouped" (None: by token count); config: fixed kernel tiles
    (``{"BLOCK_N": .., "BLOCK_K": ..}``) instead of autotuning, for tests.
    """
    check(x_TD, w13_EFD, w2_EDF, ids_TK, weights_TK, shared)
    T, D = x_TD.shape
    E, F2, _ = w13_EFD.shape
    K = ids_TK.shape[1]
    w13_s, w2_s, gate_T = shared if shared is not None else (None, None, None)
    C = shared_chunks(F2 // 2, 0 if w13_s is None else w13_s.shape[0] // 2)
    if T == 0:
        return torch.zeros_like(x_TD)
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    ids_TK = ids_TK.contiguous()
    weights_TK = weights_TK.float().contiguous()
    gate_T = None if gate_T is None else gate_T.reshape(T).float().contiguous()
    if path is None:
        path = pick_path(T, K, E)
    if path == "decode":
        h_SF = decode.gate_up(x_TD, ids_TK, w13_EFD, w13_s, C, config)
        return decode.down(h_SF, ids_TK, weights_TK, gate_T, w2_EDF, w2_s, C, config)
    if path != "grouped":
        raise ValueError(f"fused_moe: path={path!r} must be 'decode', 'grouped' or None")
    KC = K + C
    S = T * KC
    bm = block_m(S, E + C)
    sorted_U, block_expert, total = align(ids_TK, E, C, bm)
    h_UF = grouped.gate_up(x_TD, w13_EFD, w13_s, sorted_U, block_expert, total, S, KC, bm, config)
    y_SD = grouped.down(h_UF, w2_EDF, w2_s, weights_TK, gate_T, sorted_U, block_expert, total, S, KC, bm, config)
    return y_SD.view(T, KC, D).sum(1)
