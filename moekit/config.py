"""One documented configuration for every MoE family moekit reads.

A family never gets its own model code: its Hugging Face ``config.json`` is
translated into a :class:`ModelConfig` (see ``moekit/weights/families``), and
the single decoder in ``moekit/models`` builds from that.

Layer indices run over all ``num_layers`` decoder layers. The first
``moe.first_dense_layers`` of them use a dense FFN of width ``intermediate_size``;
the rest are MoE layers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from moekit.errors import MoekitError

NormKind = Literal["rms", "layer"]
RouterKind = Literal["linear", "mlp"]
ScoreFunc = Literal["softmax", "sigmoid"]
AuxLoss = Literal["switch", "cv2", "none"]


class ConfigError(MoekitError):
    """A configuration field is missing or out of range; the message names it."""


@dataclass(frozen=True)
class RopeScaling:
    """Position interpolation for RoPE, as in Hugging Face's ``rope_scaling``."""

    kind: Literal["linear", "dynamic"]  # linear: positions / factor; dynamic: NTK base growth past max positions
    factor: float  # scaling factor (> 1 stretches the usable context)


@dataclass(frozen=True)
class MoEConfig:
    """The routed-expert part of a decoder layer."""

    num_experts: int  # E: routed experts per MoE layer
    top_k: int  # K: routed experts each token is sent to
    expert_width: int | tuple[tuple[int, ...], ...]  # F: per-expert FFN width, or [layer][expert] widths (LLaMA-MoE size_experts)
    shared_width: int = 0  # width of the always-on shared expert MLP (all shared experts fused); 0 = none
    shared_gate: bool = False  # scale the shared expert by sigmoid(Linear(d->1) x) (Qwen2-MoE)
    router: RouterKind = "linear"  # linear: Linear(d->E); mlp: Linear(d->E), Tanh, Linear(E->E) (LLaMA-MoE)
    router_noise: bool = False  # router carries a noise projection Linear(d->E) used in training (LLaMA-MoE)
    score_func: ScoreFunc = "softmax"  # how router logits become expert scores
    renormalize: bool = True  # divide the top-k scores by their sum
    renormalize_eps: float = 0.0  # added to that sum (XVERSE adds 1e-6)
    routed_scale: float | tuple[float, ...] = 1.0  # routed output multiplier, or one per layer (LLaMA-MoE score_scale_factor)
    router_fp32: bool = True  # compute router logits in float32 whatever the activation dtype
    first_dense_layers: int = 0  # leading layers that use a dense FFN instead of experts
    aux_loss: AuxLoss = "switch"  # balance loss: switch (E * sum f_i P_i) or cv2 (cv^2 importance + cv^2 load)
    aux_loss_coef: float = 0.01  # weight of the balance loss
    z_loss_coef: float = 0.0  # weight of the router z-loss (mean logsumexp^2)
    noise_eps: float = 0.01  # LLaMA-MoE noisy gate: std = softplus(W_noise x) + noise_eps (training only)
    jitter: float = 0.0  # multiply router input by U(1-j, 1+j) in training (Mixtral router_jitter_noise)
    bias_balance: bool = False  # DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias used for selection only
    bias_update_rate: float = 1e-3  # bias step per optimizer step: +rate if an expert is under-loaded, -rate if over
    capacity_factor: float | None = None  # training only: keep at most cf * tokens * k / E slots per expert; None = dropless

    def width(self, layer: int, expert: int) -> int:
        """Width of ``expert`` in ``layer``."""
        if isinstance(self.expert_width, int):
            return self.expert_width
        return self.expert_width[layer][expert]

    def max_width(self, layer: int) -> int:
        """Stacked (padded) expert width of ``layer``: the widest expert."""
        if isinstance(self.expert_width, int):
            return self.expert_width
        return max(self.expert_width[layer])

    def scale(self, layer: int) -> float:
        """Routed output multiplier of ``layer``."""
        s = self.routed_scale
        return float(s) if isinstance(s, (int, float)) else float(s[layer])


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer whose FFNs are dense or mixtures of experts."""

    vocab_size: int  # V: token vocabulary size
    hidden_size: int  # D: residual stream width
    num_layers: int  # L: decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    head_dim: int  # per-head width (usually hidden_size / num_heads)
    intermediate_size: int = 0  # dense FFN width (dense models and leading dense layers)
    moe: MoEConfig | None = None  # routed experts; None = a dense model
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2-MoE)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # linear / dynamic-NTK position scaling
    max_position_embeddings: int = 4096  # trained context length
    norm: NormKind = "rms"  # rms: RMSNorm (weight only); layer: LayerNorm with weight and bias (Orion lineage)
    norm_eps: float = 1e-6  # epsilon of every norm
    tie_word_embeddings: bool = False  # lm_head shares the input embedding matrix
    bos_token_id: int | None = None  # beginning-of-sequence id
    eos_token_id: int | tuple[int, ...] | None = None  # end-of-sequence id(s)
    pad_token_id: int | None = None  # padding id
    family: str | None = None  # Hugging Face layout this model reads and writes (see moekit.weights.families)
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # the source config.json, kept for exact export

    def __post_init__(self) -> None:
        validate(self)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` routes through experts."""
        return self.moe is not None and layer >= self.moe.first_dense_layers

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check(cond: bool, name: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"config field {name}={value!r} is out of range: {why}")


def validate(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` naming the first field that is out of range."""
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        v = getattr(cfg, name)
        _check(isinstance(v, int) and v > 0, name, v, "must be a positive integer")
    _check(cfg.num_heads % cfg.num_kv_heads == 0, "num_kv_heads", cfg.num_kv_heads,
           f"must divide num_heads={cfg.num_heads}")
    _check(cfg.head_dim % 2 == 0, "head_dim", cfg.head_dim, "RoPE needs an even head width")
    _check(cfg.norm in ("rms", "layer"), "norm", cfg.norm, "must be 'rms' or 'layer'")
    _check(0 < cfg.norm_eps < 1, "norm_eps", cfg.norm_eps, "must be in (0, 1)")
    _check(cfg.rope_theta > 0 and math.isfinite(cfg.rope_theta), "rope_theta", cfg.rope_theta, "must be positive")
    _check(cfg.max_position_embeddings > 0, "max_position_embeddings", cfg.max_position_embeddings, "must be positive")
    if cfg.rope_scaling is not None:
        _check(cfg.rope_scaling.kind in ("linear", "dynamic"), "rope_scaling.kind", cfg.rope_scaling.kind,
               "must be 'linear' or 'dynamic'")
        _check(cfg.rope_scaling.factor >= 1, "rope_scaling.factor", cfg.rope_scaling.factor, "must be >= 1")
    for name in ("bos_token_id", "pad_token_id"):
        v = getattr(cfg, name)
        _check(v is None or 0 <= v < cfg.vocab_size, name, v, f"must be a token id below vocab_size={cfg.vocab_size}")
    eos = cfg.eos_token_id
    for v in (eos if isinstance(eos, tuple) else () if eos is None else (eos,)):
        _check(0 <= v < cfg.vocab_size, "eos_token_id", eos, f"must be token ids below vocab_size={cfg.vocab_size}")
    m = cfg.moe
    if m is None:
        _check(cfg.intermediate_size > 0, "intermediate_size", cfg.intermediate_size,
               "a dense model needs a positive FFN width")
        return
    _check(m.num_experts > 0, "num_experts", m.num_experts, "must be positive")
    _check(0 < m.top_k <= m.num_experts, "top_k", m.top_k, f"must be in 1..num_experts={m.num_experts}")
    _check(0 <= m.first_dense_layers < cfg.num_layers, "first_dense_layers", m.first_dense_layers,
           f"must leave at least one MoE layer of num_layers={cfg.num_layers}")
    _check(m.first_dense_layers == 0 or cfg.intermediate_size > 0, "intermediate_size", cfg.intermediate_size,
           "leading dense layers need a positive FFN width")
    if isinstance(m.expert_width, int):
        _check(m.expert_width > 0, "expert_width", m.expert_width, "must be positive")
    else:
        w = m.expert_width
        _check(len(w) == cfg.num_layers and all(len(row) == m.num_experts for row in w), "expert_width",
               "[...]", f"a per-layer list needs {cfg.num_layers} rows of {m.num_experts} widths")
        _check(all(isinstance(x, int) and x > 0 for row in w for x in row), "expert_width", "[...]",
               "every width must be a positive integer")
    _check(m.shared_width >= 0, "shared_width", m.shared_width, "must be >= 0")
    _check(not m.shared_gate or m.shared_width > 0, "shared_gate", m.shared_gate, "needs shared_width > 0")
    _check(m.router in ("linear", "mlp"), "router", m.router, "must be 'linear' or 'mlp'")
    _check(m.score_func in ("softmax", "sigmoid"), "score_func", m.score_func, "must be 'softmax' or 'sigmoid'")
    _check(m.renormalize_eps >= 0, "renormalize_eps", m.renormalize_eps, "must be >= 0")
    if not isinstance(m.routed_scale, (int, float)):
        _check(len(m.routed_scale) == cfg.num_layers, "routed_scale", m.routed_scale,
               f"a per-layer list needs {cfg.num_layers} entries")
    _check(m.aux_loss in ("switch", "cv2", "none"), "aux_loss", m.aux_loss, "must be 'switch', 'cv2' or 'none'")
    _check(0 <= m.jitter < 1, "jitter", m.jitter, "must be in [0, 1)")
    _check(m.bias_update_rate >= 0, "bias_update_rate", m.bias_update_rate, "must be >= 0")
    _check(m.capacity_factor is None or m.capacity_factor > 0, "capacity_factor", m.capacity_factor,
           "must be positive (or None for dropless routing)")


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts, computed from the config alone.

    Active counts every non-expert weight (both embedding matrices included,
    as the model cards do), the shared experts, and ``top_k`` routed experts;
    with uneven expert widths it uses ``top_k`` times the layer's mean width.
    """
    d, hd = cfg.hidden_size, cfg.head_dim
    embed = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    norm = d * (2 if cfg.norm == "layer" else 1)
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    if cfg.attention_bias:
        attn += hd * (cfg.num_heads + 2 * cfg.num_kv_heads)
    total = active = embed + norm  # embeddings and the final norm
    for layer in range(cfg.num_layers):
        common = attn + 2 * norm
        if not cfg.is_moe_layer(layer):
            total += common + 3 * d * cfg.intermediate_size
            active += common + 3 * d * cfg.intermediate_size
            continue
        m = cfg.moe
        e = m.num_experts
        router = e * d + (e * e if m.router == "mlp" else 0) + (e * d if m.router_noise else 0)
        shared = 3 * d * m.shared_width + (d if m.shared_gate else 0)
        widths = [m.width(layer, j) for j in range(e)]
        common += router + shared
        total += common + 3 * d * sum(widths)
        active += common + round(3 * d * m.top_k * sum(widths) / e)
    return total, active
