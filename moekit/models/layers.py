"""Norms, rotary embedding, attention and the dense SwiGLU MLP.

Shape legend: B batch, T new tokens, S cached + new positions, D model width,
H query heads, G key/value heads, A head width, F FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig


class Norm(nn.Module):
    """RMSNorm (weight only, computed in float32, LLaMA style) or LayerNorm with bias."""

    def __init__(self, dim: int, eps: float, kind: str = "rms"):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x_BTD, (x_BTD.shape[-1],), self.weight, self.bias, self.eps)
        x32 = x_BTD.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x_BTD.dtype)


class Rotary(nn.Module):
    """Rotate-half (NeoX) RoPE over the full head width, with linear or dynamic-NTK scaling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.scaling, self.max_pos = cfg.rope_scaling, cfg.max_position_embeddings
        self.register_buffer("inv_freq", self._inv_freq(self.theta), persistent=False)

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim)

    def reset(self) -> None:
        """Recompute the frequency buffer (after materialising a meta-device model)."""
        self.inv_freq = self._inv_freq(self.theta).to(self.inv_freq.device)

    def forward(self, pos_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, A] for integer positions ``pos_BT``."""
        inv, pos = self.inv_freq, pos_BT.float()
        if self.scaling is not None and self.scaling.kind == "linear":
            pos = pos / self.scaling.factor
        elif self.scaling is not None:  # dynamic NTK: grow the base once the sequence outgrows training
            seq = int(pos_BT.max()) + 1
            if seq > self.max_pos:
                f = self.scaling.factor
                base = self.theta * ((f * seq / self.max_pos) - (f - 1)) ** (self.dim / (self.dim - 2))
                inv = self._inv_freq(base).to(pos.device)
        ang_BTA = torch.einsum("bt,a->bta", pos, inv)
        ang_BTA = torch.cat((ang_BTA, ang_BTA), dim=-1)
        return ang_BTA.cos().to(dtype), ang_BTA.sin().to(dtype)


def apply_rotary(x_BHTA: torch.Tensor, cos_BTA: torch.Tensor, sin_BTA: torch.Tensor) -> torch.Tensor:
    """Rotate query or key heads by their positions."""
    cos, sin = cos_BTA[:, None], sin_BTA[:, None]
    x1, x2 = x_BHTA.chunk(2, dim=-1)
    return x_BHTA * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, a = cfg.hidden_size, cfg.head_dim
        self.h, self.g, self.a = cfg.num_heads, cfg.num_kv_heads, a
        self.q = nn.Linear(d, self.h * a, bias=cfg.attention_bias)
        self.k = nn.Linear(d, self.g * a, bias=cfg.attention_bias)
        self.v = nn.Linear(d, self.g * a, bias=cfg.attention_bias)
        self.o = nn.Linear(self.h * a, d, bias=False)

    def forward(self, x_BTD, cos_BTA, sin_BTA, cache=None, layer: int = 0) -> torch.Tensor:
        """``cache`` (optional) stores this step's keys/values and returns the whole history with a mask."""
        B, T, _ = x_BTD.shape
        q_BHTA = self.q(x_BTD).view(B, T, self.h, self.a).transpose(1, 2)
        k_BGTA = self.k(x_BTD).view(B, T, self.g, self.a).transpose(1, 2)
        v_BGTA = self.v(x_BTD).view(B, T, self.g, self.a).transpose(1, 2)
        q_BHTA = apply_rotary(q_BHTA, cos_BTA, sin_BTA)
        k_BGTA = apply_rotary(k_BGTA, cos_BTA, sin_BTA)
        if cache is None:
            o_BHTA = F.scaled_dot_product_attention(q_BHTA, k_BGTA, v_BGTA, is_causal=True,
                                                    enable_gqa=self.g != self.h)
        else:
            k_BGSA, v_BGSA, mask_BTS = cache.update(layer, k_BGTA, v_BGTA)
            o_BHTA = F.scaled_dot_product_attention(q_BHTA, k_BGSA, v_BGSA, attn_mask=mask_BTS[:, None],
                                                    enable_gqa=self.g != self.h)
        return self.o(o_BHTA.transpose(1, 2).reshape(B, T, self.h * self.a))


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate x) * up x), with gate and up stacked in one ``w13`` [2F, D]."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        self.w13 = nn.Parameter(torch.empty(2 * width, dim))
        self.w2 = nn.Parameter(torch.empty(dim, width))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate_TF, up_TF = F.linear(x_TD, self.w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate_TF) * up_TF, self.w2)

    def views(self) -> dict[str, torch.Tensor]:
        """Per-projection views in the [out, in] layout checkpoints store."""
        f = self.width
        return {"gate": self.w13[:f], "up": self.w13[f:], "down": self.w2}
