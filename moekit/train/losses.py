"""Training losses: the router balance losses (the next-token loss is :func:`moekit.models.loss.next_token_nll`).

Shape legend: T tokens of one layer, N routed tokens (all layers for concatenated losses),
E experts, K experts per token.

- switch: transformers' Mixtral ``load_balancing_loss_func``, layers concatenated:
  E * sum_{k,e} f_{k,e} P_e with f the fraction of tokens whose k-th choice is e and P the
  mean router probability. Perfect balance gives K.
- cv2: LLaMA-MoE's TopKBalancedNoisyGate loss per layer, summed over layers:
  cv^2(importance) + cv^2(load), importance = summed top-k scores, load = the smooth
  normal-CDF estimate of the noisy gate in training (hard counts otherwise). LLaMA-MoE's
  quirk of comparing the noise term alone against the threshold is not reproduced.
- z: ST-MoE router z-loss, mean over all routed tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.models.moe import Routing


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def switch_loss(routing: list[Routing], num_experts: int, red=_same) -> torch.Tensor:
    """transformers' Mixtral balance loss over all layers (perfect balance = top_k).

    ``red`` sums a tensor over all processes (global-batch statistics); identity in one process.
    """
    logits_NE = torch.cat([r.logits_TE for r in routing]).float()
    ids_NK = torch.cat([r.ids_TK for r in routing])
    n = red(torch.tensor(float(ids_NK.shape[0]), device=logits_NE.device))
    f_KE = red(F.one_hot(ids_NK, num_experts).float().sum(0)) / n
    p_E = red(logits_NE.softmax(-1).sum(0)) / n
    return num_experts * (f_KE * p_E[None]).sum()


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / mean^2), 0 for a single expert."""
    x = x.float()
    if x.numel() == 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def smooth_load(r: Routing, k: int) -> torch.Tensor:
    """Expected number of tokens per expert under the gate noise (Shazeer et al. 2017), [E]."""
    noisy, clean, std = r.logits_TE, r.clean_logits_TE.float(), r.noise_std_TE.float()
    top = torch.topk(noisy, k + 1, dim=-1).values
    if_in, if_out = top[:, k:k + 1], top[:, k - 1:k]  # thresholds for experts inside / outside the top k
    normal = torch.distributions.Normal(0.0, 1.0)
    return torch.where(noisy > if_in, normal.cdf((clean - if_in) / std), normal.cdf((clean - if_out) / std)).sum(0)


def cv2_loss(routing: list[Routing], num_experts: int, k: int, red=_same) -> torch.Tensor:
    """LLaMA-MoE balance loss, summed over layers."""
    total = torch.zeros((), device=routing[0].logits_TE.device)
    for r in routing:
        importance = torch.zeros(num_experts, device=total.device).scatter_add(0, r.ids_TK.reshape(-1), r.weights_TK.reshape(-1).float())
        if r.clean_logits_TE is not None and k < num_experts:
            load = smooth_load(r, k)
        else:
            load = torch.bincount(r.ids_TK.reshape(-1), minlength=num_experts).float()
        total = total + cv_squared(red(importance)) + cv_squared(red(load))
    return total


def z_loss(routing: list[Routing], red=_same) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(logits)^2 over every routed token of every layer."""
    logits_NE = torch.cat([r.logits_TE for r in routing]).float()
    n = torch.tensor(float(logits_NE.shape[0]), device=logits_NE.device)
    return red(torch.logsumexp(logits_NE, dim=-1).pow(2).sum()) / red(n)


def router_losses(routing: list[Routing], m: MoEConfig, red=_same) -> dict[str, torch.Tensor]:
    """The weighted balance and z losses the config asks for (empty when there is nothing to add)."""
    out = {}
    if routing and m.aux_loss != "none" and m.aux_loss_coef > 0:
        raw = (switch_loss(routing, m.num_experts, red) if m.aux_loss == "switch"
               else cv2_loss(routing, m.num_experts, m.top_k, red))
        out["aux_loss"] = m.aux_loss_coef * raw
    if routing and m.z_loss_coef > 0:
        out["z_loss"] = m.z_loss_coef * z_loss(routing, red)
    return out


def expert_load(routing: list[Routing], num_experts: int) -> torch.Tensor:
    """Routed (token, slot) counts per layer and expert [L, E] (dropped slots included)."""
    return torch.stack([torch.bincount(r.ids_TK.reshape(-1), minlength=num_experts) for r in routing]).float()


def bias_update(load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3 auxiliary-loss-free step: +rate for under-loaded experts, -rate for over-loaded ones,
    mean-centred (as torchtitan does)."""
    delta = rate * torch.sign(load_E.float().mean() - load_E.float())
    return delta - delta.mean()
