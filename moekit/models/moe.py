"""The MoE FFN: router, stacked routed experts, optional shared expert.

Shape legend: T tokens, D model width, E routed experts, K experts per token,
F (padded) expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig, MoEConfig
from moekit.kernels import get_backend
from moekit.kernels.reference import capacity_drop
from moekit.kernels.weights import ExpertWeights, QuantWeight, weight_views
from moekit.models.layers import MLP


@dataclass
class Routing:
    """What a router decided for a batch of tokens (kept for balance losses and statistics)."""

    logits_TE: torch.Tensor  # router logits, float32 (noise included in training)
    ids_TK: torch.Tensor  # chosen experts, best first
    weights_TK: torch.Tensor  # float32 combine weights (before the layer's routed_scale)
    clean_logits_TE: torch.Tensor | None = None  # logits without training noise (noisy gates only)
    noise_std_TE: torch.Tensor | None = None  # per-logit noise std (noisy gates only)
    dropped: int = 0  # (token, expert) slots over capacity, dropped (capacity-factor routing only)


class Router(nn.Module):
    """Linear(d->E), or LLaMA-MoE's Linear(d->E) -> Tanh -> Linear(E->E); optional noise projection."""

    def __init__(self, dim: int, m: MoEConfig, kernels=None):
        super().__init__()
        self.m, self.kernels = m, kernels or get_backend()
        self.proj = nn.Linear(dim, m.num_experts, bias=False)
        self.proj2 = nn.Linear(m.num_experts, m.num_experts, bias=False) if m.router == "mlp" else None
        self.noise = nn.Linear(dim, m.num_experts, bias=False) if m.router_noise else None
        if m.bias_balance:  # selection-only expert bias, updated by the trainer (not by gradients)
            self.register_buffer("bias", torch.zeros(m.num_experts))
        else:
            self.bias = None

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] (float32 when ``router_fp32``)."""
        if not self.m.router_fp32:
            return self._logits(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):  # float32 even under bf16 autocast
            return self._logits(x_TD.float())

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        h_TE = self.kernels.linear(x_TD, w if w.dtype == x_TD.dtype else w.to(x_TD.dtype))
        if self.proj2 is not None:
            h_TE = F.linear(torch.tanh(h_TE), self.proj2.weight.to(h_TE.dtype))
        return h_TE

    def forward(self, x_TD: torch.Tensor) -> Routing:
        m = self.m
        if self.training and m.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - m.jitter, 1 + m.jitter)
        logits = self.logits(x_TD)
        clean = std = None
        if self.training and self.noise is not None:  # Shazeer-style noisy top-k gate
            clean = logits
            std = F.softplus(F.linear(x_TD.to(logits.dtype), self.noise.weight.to(logits.dtype))) + m.noise_eps
            logits = clean + torch.randn_like(clean) * std
        weights, ids = self.kernels.route(logits, m.top_k, m.score_func, m.renormalize, m.renormalize_eps, self.bias)
        return Routing(logits.float(), ids, weights, clean, std)


class Experts(nn.Module):
    """E SwiGLU experts stacked as w13 [E, 2F, D] (gate rows, then up rows) and w2 [E, D, F].

    Experts narrower than the layer's widest one are zero-padded, which is exact:
    a zero gate row gives silu(0) * up = 0 and a zero down column adds nothing.
    """

    def __init__(self, dim: int, widths: list[int]):
        super().__init__()
        self.widths = list(widths)
        f = max(widths)
        self.w13 = nn.Parameter(torch.empty(len(widths), 2 * f, dim))
        self.w2 = nn.Parameter(torch.empty(len(widths), dim, f))

    @property
    def padded(self) -> bool:
        return min(self.widths) != max(self.widths)

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Zero the rows/columns beyond each expert's own width (a quantised stack: their scales)."""
        f = self.w2.shape[-1]
        w13, w2 = (t.scale if isinstance(t, QuantWeight) else t for t in (self.w13, self.w2))
        g = self.w2.group if isinstance(self.w2, QuantWeight) else 1
        for e, w in enumerate(self.widths):
            w13[e, w:f].zero_()
            w13[e, f + w:].zero_()
            w2[e, :, -(-w // g):].zero_()

    def views(self) -> dict[str, torch.Tensor]:
        """Per-expert projection views ("{e}.gate" etc.) in the [out, in] layout checkpoints store."""
        f = self.w2.shape[-1]
        out = {}
        for e, w in enumerate(self.widths):
            out.update(weight_views(self.w13, f"{e}.gate", e, rows=(0, w)))
            out.update(weight_views(self.w13, f"{e}.up", e, rows=(f, f + w)))
            out.update(weight_views(self.w2, f"{e}.down", e, width=w))
        return out


class MoE(nn.Module):
    """Routed experts plus an optional (optionally sigmoid-gated) shared expert."""

    def __init__(self, cfg: ModelConfig, layer: int, kernels):
        super().__init__()
        m, d = cfg.moe, cfg.hidden_size
        self.kernels, self.scale = kernels, m.scale(layer)
        self.router = Router(d, m, kernels)
        self.experts = Experts(d, [m.width(layer, e) for e in range(m.num_experts)])
        self.shared = MLP(d, m.shared_width, kernels) if m.shared_width else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if m.shared_gate else None
        self.sink: list | None = None  # set by MoEDecoder.record_routing: where this layer's Routing goes

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        r = self.router(x_TD)
        w_TK = r.weights_TK
        m = self.router.m
        if self.training and m.capacity_factor is not None:
            capacity = max(1, int(m.capacity_factor * B * T * m.top_k / m.num_experts))
            w_TK, r.dropped = capacity_drop(r.ids_TK, w_TK, m.num_experts, capacity)
        if self.sink is not None:
            self.sink.append(r)
        if self.scale != 1.0:
            w_TK = w_TK * self.scale
        experts = ExpertWeights(self.experts.w13, self.experts.w2)
        if self.shared is not None:
            gate_T = None if self.shared_gate is None else torch.sigmoid(
                self.kernels.linear(x_TD, self.shared_gate.weight)).view(-1)
            experts = ExpertWeights(self.experts.w13, self.experts.w2, self.shared.w13, self.shared.w2, gate_T)
        y_TD = self.kernels.moe_experts(x_TD, experts, r.ids_TK, w_TK)
        return y_TD.view(B, T, D)
