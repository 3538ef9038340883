"""Plain PyTorch expert computation: the CPU path and the numerical spec for every fast path.

Shape legend: T tokens, D model width, E experts, K experts per token, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), computing only the experts that were selected.

    ``w13_EFD`` stacks each expert's gate rows then up rows ([E, 2F, D]); ``w2_EDF`` is the
    down projection. Tokens are grouped by expert with one stable sort, so each selected
    expert runs one matmul over all of its tokens; nothing is copied per token.
    """
    T, K = ids_TK.shape
    E, F2, _ = w13_EFD.shape
    flat_ids = ids_TK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    token_of = order // K
    w_flat = weights_TK.reshape(-1)
    y_TD = torch.zeros_like(x_TD)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        gate, up = F.linear(x_TD[rows], w13_EFD[e]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, w2_EDF[e])
        y_TD.index_add_(0, rows, (out * w_flat[order[start:start + n], None]).to(y_TD.dtype))
        start += n
    return y_TD
