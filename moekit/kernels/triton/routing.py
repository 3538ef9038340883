"""Top-k routing in one kernel: score (softmax or sigmoid), optional selection bias, top-k, renormalise.

Shape legend: T tokens, E experts (padded to EP, a power of two), K experts per token
(padded to KP).

Matches :func:`moekit.kernels.reference.route`: ties go to the lower expert index;
``bias_E`` shifts the scores for the selection only; the weights are the chosen
experts' unshifted scores, divided by their sum (+ eps) when ``renormalize``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, stride_t, eps,
                  K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, BLOCK_T: tl.constexpr,
                  SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, EP)
    row_ok = rows < T
    col_ok = cols < E
    safe = tl.minimum(rows, T - 1).to(tl.int64)  # rows past T reread the last one; their results are not stored
    x = tl.load(logits_ptr + safe[:, None] * stride_t + cols[None, :], mask=col_ok[None, :],
                other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        score = p / tl.sum(p, axis=1)[:, None]
    else:
        score = tl.sigmoid(x)
    pick = score
    if HAS_BIAS:
        pick = score + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, EP))  # [BLOCK_T, EP]: a real expert, not yet chosen
    kcols = tl.arange(0, KP)
    w_tile = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    id_tile = tl.zeros((BLOCK_T, KP), dtype=tl.int64)
    for k in tl.static_range(K):
        cand = tl.where(avail, pick, float("-inf"))
        best = tl.max(cand, axis=1)
        hit = avail & (cand == best[:, None])
        idx = tl.min(tl.where(hit, cols[None, :], EP), axis=1)  # lowest index among the best
        chosen = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(chosen, score, 0.0), axis=1)
        w_tile = tl.where(kcols[None, :] == k, w[:, None], w_tile)
        id_tile = tl.where(kcols[None, :] == k, idx[:, None].to(tl.int64), id_tile)
        avail = avail & (cols[None, :] != idx[:, None])
    if RENORM:
        w_tile = w_tile / (tl.sum(w_tile, axis=1)[:, None] + eps)
    out = rows[:, None].to(tl.int64) * K + kcols[None, :]
    ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(w_ptr + out, w_tile, mask=ok)
    tl.store(ids_ptr + out, id_tile, mask=ok)


def route(logits_TE: torch.Tensor, k: int, score_func: str = "softmax", renormalize: bool = True,
          eps: float = 0.0, bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK float32, ids_TK int64) for 2-D logits [T, E]."""
    T, E = logits_TE.shape
    if not 0 < k <= E:
        raise ValueError(f"route: k={k} must be in 1..E={E}")
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"route: score_func={score_func!r} must be 'softmax' or 'sigmoid'")
    logits = logits_TE if logits_TE.stride(-1) == 1 else logits_TE.contiguous()
    w_TK = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids_TK = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return w_TK, ids_TK
    EP = triton.next_power_of_2(E)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // EP, 64))
    bias = logits if bias_E is None else bias_E.float().contiguous()
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits, bias, w_TK, ids_TK, T, E, logits.stride(0), float(eps),
        K=k, KP=triton.next_power_of_2(k), EP=EP, BLOCK_T=block_t, SOFTMAX=score_func == "softmax",
        RENORM=bool(renormalize), HAS_BIAS=bias_E is not None)
    return w_TK, ids_TK
