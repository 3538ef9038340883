"""The language-model loss: summed next-token negative log-likelihood and the number of tokens counted.

Training, the trainer's held-out evaluation, upcycling calibration, evaluation and the recipes all
score text with these functions, so a loss or perplexity means the same thing everywhere:
cross-entropy of the float32 log-softmax of the logits, in nats, summed over the counted positions;
loss = sum / count and perplexity = exp(loss).

Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def next_token_nll(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the counted positions, number of counted positions).

    logits_BTV[b, t] predicts targets_BT[b, t]; mask_BT (bool or 0/1) picks the counted positions
    (all when None). Differentiable: training backpropagates through the sum.
    """
    nll = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), targets_BT.reshape(-1),
                          reduction="none")
    if mask_BT is None:
        return nll.sum(), torch.tensor(nll.numel(), device=nll.device)
    m = mask_BT.reshape(-1).to(nll.dtype)
    return (nll * m).sum(), m.sum()


def window_nll(model, tokens_BT: torch.Tensor, mask_BT: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`next_token_nll` of ``model`` on windows: tokens 1..T-1 predicted from the tokens before them.

    ``model(ids_BT) -> logits_BTV``; mask_BT covers the whole window (its first column is ignored).
    """
    logits_BTV = model(tokens_BT[:, :-1])
    return next_token_nll(logits_BTV, tokens_BT[:, 1:], None if mask_BT is None else mask_BT[:, 1:])


def perplexity(nll_sum: float, count: float) -> float:
    """exp(nll_sum / count), the mean loss capped at 50 nats so that an untrained model cannot overflow."""
    return math.exp(min(nll_sum / count, 50.0))
