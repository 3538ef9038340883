"""Plain PyTorch expert computation: the CPU path and the numerical spec for every fast path.

Shape legend: T tokens, D model width, E experts, K experts per token, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.kernels.weights import ExpertWeights, QuantWeight, Weight, dense, quantize_into  # noqa: F401 (spec)


def silu_mul(h_TF2: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up]."""
    gate, up = h_TF2.chunk(2, dim=-1)
    return F.silu(gate) * up


def route(logits_TE: torch.Tensor, k: int, score_func: str = "softmax", renormalize: bool = True,
          eps: float = 0.0, bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights_TK float32, ids_TK). Ties go to the lower expert index.

    softmax: probabilities over all E experts, keep the k largest, optionally divide
    them by their sum (+eps). That equals softmax over the k largest logits when
    eps is 0 (LLaMA-MoE's form). sigmoid: independent scores, same selection.
    bias_E (DeepSeek-V3 balancing) shifts the scores for the selection only; the
    weights are the unshifted scores of the chosen experts.
    """
    logits32 = logits_TE.float()
    scores = logits32.softmax(-1) if score_func == "softmax" else logits32.sigmoid()
    pick = scores if bias_E is None else scores + bias_E.float()
    order = torch.sort(pick, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = scores.gather(-1, order)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    return weights, order


def capacity_drop(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                  capacity: int) -> tuple[torch.Tensor, int]:
    """Capacity-factor routing: each expert keeps its first ``capacity`` slots in token order
    (first choices before second choices); the rest get weight 0. Returns (weights, dropped)."""
    T, K = ids_TK.shape
    flat = ids_TK.t().reshape(-1)  # slot order: every token's 1st choice, then every 2nd choice, ...
    onehot = torch.nn.functional.one_hot(flat, num_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of this slot within its expert
    keep = (position < capacity).reshape(K, T).t()
    return weights_TK * keep, int((~keep).sum())


def moe_experts(x_TD: torch.Tensor, experts: ExpertWeights, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                act=silu_mul) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) (+ shared), computing only the selected experts.

    ``experts.w13`` [E, 2F, D] stacks each expert's gate rows then up rows; ``experts.w2`` [E, D, F]
    is the down projection (quantised weights are dequantised, expert by expert: the spec of the
    low-bit kernels). Tokens are grouped by expert with one stable sort, so each selected expert
    runs one matmul over all of its tokens; nothing is copied per token. The shared expert, if
    any, is added with weight ``experts.shared_gate_T[t]`` (1 when None).
    """
    weights_TK = weights_TK.to(x_TD.dtype)
    T, K = ids_TK.shape
    E = experts.num_experts
    flat_ids = ids_TK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    token_of = order // K
    w_flat = weights_TK.reshape(-1)
    y_TD = torch.zeros_like(x_TD)
    w13s, w2s = _unbind(experts.w13), _unbind(experts.w2)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        out = F.linear(act(F.linear(x_TD[rows], _expert(w13s, e, x_TD.dtype))), _expert(w2s, e, x_TD.dtype))
        y_TD.index_add_(0, rows, (out * w_flat[order[start:start + n], None]).to(y_TD.dtype))
        start += n
    if experts.has_shared:
        s_TD = mlp(x_TD, experts.shared_w13, experts.shared_w2, act)
        gate_T = experts.shared_gate_T
        y_TD = y_TD + (s_TD if gate_T is None else gate_T.to(s_TD.dtype)[:, None] * s_TD)
    return y_TD


def _unbind(w: Weight):
    """A stack's per-expert slices (one backward stack, not a zero-filled [E, ...] per expert); a
    quantised stack as is (see :func:`_expert`)."""
    return w if isinstance(w, QuantWeight) else w.unbind(0)


def _expert(ws, e: int, dtype: torch.dtype) -> torch.Tensor:
    return ws.dequantize(dtype, index=e) if isinstance(ws, QuantWeight) else ws[e]


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b); a quantised W is dequantised first."""
    return F.linear(x, dense(w, x.dtype), b)


def mlp(x_TD: torch.Tensor, w13_FD: Weight, w2_DF: Weight, act=silu_mul) -> torch.Tensor:
    """SwiGLU: down(silu(gate x) * up x), gate and up stacked in ``w13`` [2F, D]."""
    return F.linear(act(F.linear(x_TD, dense(w13_FD, x_TD.dtype))), dense(w2_DF, x_TD.dtype))


def rotary(x_BNTA: torch.Tensor, cos_BTA: torch.Tensor, sin_BTA: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + [-x2, x1] * sin."""
    x1, x2 = x_BNTA.chunk(2, dim=-1)
    return x_BNTA * cos_BTA[:, None] + torch.cat((-x2, x1), dim=-1) * sin_BTA[:, None]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA-style RMSNorm: normalise in float32, cast back, then scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def attention(q_BHTA: torch.Tensor, k_BGSA: torch.Tensor, v_BGSA: torch.Tensor,
              mask_BTS: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention; causal when no mask is given, else ``mask`` (True = attend), GQA by head groups."""
    gqa = q_BHTA.shape[1] != k_BGSA.shape[1]
    if mask_BTS is None:
        return F.scaled_dot_product_attention(q_BHTA, k_BGSA, v_BGSA, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q_BHTA, k_BGSA, v_BGSA, attn_mask=mask_BTS[:, None], enable_gqa=gqa)


def paged_attention(q_NHA: torch.Tensor, k_PGCA: torch.Tensor, v_PGCA: torch.Tensor, table_RM: torch.Tensor,
                    starts_R1: torch.Tensor, lens_R: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of many requests' new tokens over a paged KV cache (the oracle of the fast twins).

    Shapes: N new query tokens of all requests, back to back; H query heads; A head width;
    P blocks in the pool; G key/value heads; C tokens per block; R requests; M block-table width.
    Request r's queries are ``q[starts[r]:starts[r + 1]]`` (n_r of them); its keys/values are the
    first ``lens[r]`` tokens of blocks ``table[r, 0], table[r, 1], ...`` (its new tokens already
    stored), so its query i sits at position lens[r] - n_r + i and sees keys 0 .. that position.
    Slots past ``lens[r]`` may hold anything (they are never read). Head h reads key/value head
    h // (H / G). Returns o [N, H, A] in q's dtype.
    """
    N, H, A = q_NHA.shape
    G, C = k_PGCA.shape[1], k_PGCA.shape[2]
    scale = A ** -0.5 if scale is None else scale
    out = torch.empty_like(q_NHA)
    starts, lens = starts_R1.tolist(), lens_R.tolist()
    for r, S in enumerate(lens):
        q0, q1 = starts[r], starts[r + 1]
        if q1 == q0:
            continue
        blocks = table_RM[r, :(S + C - 1) // C].long()
        k_GSA = k_PGCA[blocks].transpose(0, 1).reshape(G, -1, A)[:, :S]
        v_GSA = v_PGCA[blocks].transpose(0, 1).reshape(G, -1, A)[:, :S]
        n = q1 - q0
        pos = torch.arange(S - n, S, device=q_NHA.device)[:, None]
        mask_TS = torch.arange(S, device=q_NHA.device)[None, :] <= pos
        o = F.scaled_dot_product_attention(q_NHA[q0:q1].transpose(0, 1)[None], k_GSA[None], v_GSA[None],
                                           attn_mask=mask_TS, scale=scale, enable_gqa=H != G)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def dequantize(raw: torch.Tensor, kind: str, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """GGUF blocks of GGML type ``kind`` (uint8 [R, bytes]) as float32 [R, K] (into ``out`` if given):
    gguf-py's numpy dequantisation, the spec of the CPU backend's kernels for K-quants and IQ3_XXS."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    values = torch.from_numpy(gguf_dequantize(raw.numpy(), GGMLQuantizationType[kind])).reshape(len(raw), K)
    return values if out is None else out.copy_(values)
