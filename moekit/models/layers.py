"""Norms, rotary embedding, attention and the dense SwiGLU MLP.

Shape legend: B batch, T new tokens, S cached + new positions, D model width,
H query heads, G key/value heads, A head width, F FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.kernels import get_backend
from moekit.kernels.weights import weight_views


class Norm(nn.Module):
    """RMSNorm (weight only, computed in float32, LLaMA style) or LayerNorm with bias."""

    def __init__(self, dim: int, eps: float, kind: str = "rms", kernels=None):
        super().__init__()
        self.kind, self.eps, self.kernels = kind, eps, kernels or get_backend()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x_BTD, (x_BTD.shape[-1],), self.weight, self.bias, self.eps)
        return self.kernels.rms_norm(x_BTD, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotate-half (NeoX) RoPE over the full head width, with linear or dynamic-NTK scaling.

    Without dynamic scaling the cos/sin of every position are cached in a table that
    grows on demand, so a decode step only gathers its rows.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.scaling, self.max_pos = cfg.rope_scaling, cfg.max_position_embeddings
        self.register_buffer("inv_freq", self._inv_freq(self.theta), persistent=False)
        self._table: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim)

    def reset(self) -> None:
        """Recompute the frequency buffer (after materialising a meta-device model)."""
        self.inv_freq = self._inv_freq(self.theta).to(self.inv_freq.device)
        self._table = {}

    def _angles(self, pos: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scaling is not None and self.scaling.kind == "linear":
            pos = pos / self.scaling.factor
        ang = torch.einsum("...t,a->...ta", pos, inv)
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos(), ang.sin()

    def forward(self, pos_BT: torch.Tensor, dtype: torch.dtype, limit: int | None = None,
                seq_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, A] for integer positions ``pos_BT``.

        limit: a bound on max(pos_BT) + 1 known on the host; without it the table size comes
        from the positions themselves (a device sync, which a CUDA-graph capture forbids).
        seq_BT: dynamic NTK only: each token's sequence length in this forward (requests of an
        engine step differ); default: max(pos_BT) + 1 for all, as transformers computes it.
        """
        if self.scaling is not None and self.scaling.kind == "dynamic":  # NTK: base grows with the sequence
            if seq_BT is None:
                seq_BT = torch.full_like(pos_BT, int(pos_BT.max()) + 1)
            f, seq = self.scaling.factor, seq_BT.double()
            grown = self.theta * ((f * seq / self.max_pos) - (f - 1)) ** (self.dim / (self.dim - 2))
            base = torch.where(seq > self.max_pos, grown, torch.full_like(seq, self.theta))
            exps = torch.arange(0, self.dim, 2, dtype=torch.int64, device=pos_BT.device).float() / self.dim
            inv = 1.0 / base.float()[..., None] ** exps  # [B, T, A/2], in float32 as _inv_freq computes it
            ang = pos_BT.float()[..., None] * inv
            ang = torch.cat((ang, ang), dim=-1)
            return ang.cos().to(dtype), ang.sin().to(dtype)
        cos, sin = self.table(dtype, int(pos_BT.max()) + 1 if limit is None else limit, pos_BT.device)
        return cos[pos_BT], sin[pos_BT]

    def table(self, dtype: torch.dtype, need: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, A] of positions 0 .. n - 1 for some n >= ``need``, cached (not for dynamic NTK, whose
        angles depend on the sequence length)."""
        cos, sin = self._table.get(dtype, (None, None))
        if cos is None or cos.shape[0] < need or cos.device != torch.device(device):
            n = max(need, 2 * (0 if cos is None else cos.shape[0]), 256)
            cos, sin = self._angles(torch.arange(n, device=device).float(), self.inv_freq.to(device))
            cos, sin = cos.to(dtype), sin.to(dtype)
            self._table[dtype] = (cos, sin)
        return cos, sin


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention with RoPE; q, k, v stacked in one ``wqkv``."""

    def __init__(self, cfg: ModelConfig, kernels=None):
        super().__init__()
        d, a = cfg.hidden_size, cfg.head_dim
        self.h, self.g, self.a, self.kernels = cfg.num_heads, cfg.num_kv_heads, a, kernels or get_backend()
        self.wqkv = nn.Parameter(torch.empty((self.h + 2 * self.g) * a, d))
        self.bqkv = nn.Parameter(torch.zeros((self.h + 2 * self.g) * a)) if cfg.attention_bias else None
        self.wo = nn.Parameter(torch.empty(d, self.h * a))

    def views(self) -> dict[str, torch.Tensor]:
        """q/k/v/o projections in the [out, in] layout checkpoints store."""
        q, k = self.h * self.a, self.g * self.a
        out = {**weight_views(self.wqkv, "q.weight", rows=(0, q)),
               **weight_views(self.wqkv, "k.weight", rows=(q, q + k)),
               **weight_views(self.wqkv, "v.weight", rows=(q + k, q + 2 * k)), **weight_views(self.wo, "o.weight")}
        if self.bqkv is not None:
            out.update({"q.bias": self.bqkv[:q], "k.bias": self.bqkv[q:q + k], "v.bias": self.bqkv[q + k:]})
        return out

    def forward(self, x_BTD, cos_BTA, sin_BTA, cache=None, layer: int = 0) -> torch.Tensor:
        """``cache`` (optional) stores this step's keys/values and attends over the whole history
        (see :mod:`moekit.engine.kv_cache`)."""
        B, T, _ = x_BTD.shape
        qkv = self.kernels.linear(x_BTD, self.wqkv, self.bqkv)
        q_BHTA, k_BGTA, v_BGTA = qkv.view(B, T, self.h + 2 * self.g, self.a).transpose(1, 2).split(
            (self.h, self.g, self.g), dim=1)
        q_BHTA = self.kernels.rotary(q_BHTA, cos_BTA, sin_BTA)
        k_BGTA = self.kernels.rotary(k_BGTA, cos_BTA, sin_BTA)
        if cache is None:
            o_BTX = self.kernels.attention(q_BHTA, k_BGTA, v_BGTA).transpose(1, 2).reshape(B, T, self.h * self.a)
        else:
            o_BTX = cache.attend(layer, q_BHTA, k_BGTA, v_BGTA, self.kernels)
        return self.kernels.linear(o_BTX, self.wo)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate x) * up x), with gate and up stacked in one ``w13`` [2F, D]."""

    def __init__(self, dim: int, width: int, kernels=None):
        super().__init__()
        self.width, self.kernels = width, kernels or get_backend()
        self.w13 = nn.Parameter(torch.empty(2 * width, dim))
        self.w2 = nn.Parameter(torch.empty(dim, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D]."""
        return self.kernels.mlp(x.reshape(-1, x.shape[-1]), self.w13, self.w2).view(x.shape)

    def views(self) -> dict[str, torch.Tensor]:
        """Per-projection views in the [out, in] layout checkpoints store."""
        f = self.width
        return {**weight_views(self.w13, "gate", rows=(0, f)), **weight_views(self.w13, "up", rows=(f, 2 * f)),
                **weight_views(self.w2, "down")}
