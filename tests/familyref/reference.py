"""Plain float64 reference forward pass for the seed MoE families.

Written only from /work/shared/reference/families.md (sections 0-6) and the public HF
conventions it cites; it shares no code with ``moekit``.  Everything is computed from the
HF ``config.json`` dict and the HF-named state dict, in float64, with per-token Python
loops for routing: clarity over speed (inputs are tiny).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_F64 = torch.float64


# ----------------------------------------------------------------------------- basics

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) * w + b."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down( silu(gate x) * up x ) for one token vector x [d]."""
    return w_down @ (F.silu(w_gate @ x) * (w_up @ x))


def topk_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest entries, largest first; ties go to the lower index."""
    vals = scores.tolist()
    return sorted(range(len(vals)), key=lambda e: (-vals[e], e))[:k]


def rope_tables(config: dict, head_dim: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for rotate-half RoPE, honouring linear / dynamic-NTK rope_scaling."""
    theta = config.get("rope_theta")
    if theta is None:
        theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    base = float(theta)
    pos = torch.arange(seq_len, dtype=_F64)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind == "linear":
        pos = pos / float(scaling["factor"])
    elif kind == "dynamic":
        factor, max_pos = float(scaling["factor"]), config["max_position_embeddings"]
        if seq_len > max_pos:
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    elif kind != "default":
        raise NotImplementedError(f"rope_scaling type {kind!r}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=_F64) / head_dim)
    ang = pos[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def attention(h: torch.Tensor, W: dict, p: str, config: dict, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal multi-head attention with GQA and optional q/k/v/o biases. h: [B, T, d]."""
    B, T, d = h.shape
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or d // H

    def proj(name: str, heads: int) -> torch.Tensor:
        y = h @ W[f"{p}{name}.weight"].T
        if f"{p}{name}.bias" in W:
            y = y + W[f"{p}{name}.bias"]
        return y.view(B, T, heads, hd).transpose(1, 2)  # [B, heads, T, hd]

    q, k, v = proj("q_proj", H), proj("k_proj", KV), proj("v_proj", KV)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    g = H // KV  # kv head j serves query heads j*g .. j*g+g-1
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
    out = out @ W[f"{p}o_proj.weight"].T
    if f"{p}o_proj.bias" in W:
        out = out + W[f"{p}o_proj.bias"]
    return out


# ----------------------------------------------------------------------------- per-token FFNs
# Each takes one token vector x [d], the float64 state dict W, the layer prefix
# p = "model.layers.{i}.", the layer index i and the config; returns [d].

def _dense(x, W, p):
    return swiglu(x, W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"], W[p + "mlp.down_proj.weight"])


def _expert(x, W, q):
    """SwiGLU expert stored as {q}{gate,up,down}_proj.weight."""
    return swiglu(x, W[q + "gate_proj.weight"], W[q + "up_proj.weight"], W[q + "down_proj.weight"])


def ffn_xverse(x, W, p, i, config):
    """Softmax over all E, top-k, weights /= (sum + 1e-6), plus ungated shared experts."""
    probs = (W[p + "mlp.router.weight"] @ x).softmax(-1)
    idx = topk_indices(probs, config["moe_top_k"])
    w = probs[idx]
    w = w / (w.sum() + 1e-6)
    y = sum(w[j] * _expert(x, W, f"{p}mlp.experts.{e}.") for j, e in enumerate(idx))
    return y + _expert(x, W, p + "mlp.shared_experts.")


def ffn_mixtral(x, W, p, i, config):
    """Mixtral / APUS / Orion: softmax over all E, top-k, renormalise (no eps)."""
    q = p + "block_sparse_moe."
    probs = (W[q + "gate.weight"] @ x).softmax(-1)
    idx = topk_indices(probs, config["num_experts_per_tok"])
    w = probs[idx]
    w = w / w.sum()
    y = torch.zeros_like(x)
    for j, e in enumerate(idx):
        ex = f"{q}experts.{e}."
        y = y + w[j] * swiglu(x, W[ex + "w1.weight"], W[ex + "w3.weight"], W[ex + "w2.weight"])
    return y


def ffn_llama_moe(x, W, p, i, config):
    """LLaMA-MoE v1: gate MLP W2 tanh(W1 x); softmax over the top-k logits; x score_scale_factor."""
    if not config.get("gate_use_softmax", True) or not config.get("multiply_gate_scores", True):
        raise NotImplementedError("reference covers gate_use_softmax=True, multiply_gate_scores=True")
    if config.get("calculator_type", "UniversalCalculator") != "UniversalCalculator":
        raise NotImplementedError(config["calculator_type"])
    g = p + "mlp.gate.gate_network."
    if config.get("gate_network", "mlp") == "mlp":
        logits = W[g + "2.weight"] @ torch.tanh(W[g + "0.weight"] @ x)
    else:  # "linear"
        logits = W[g + "weight"] @ x
    idx = topk_indices(logits, config["num_selects"])
    scores = logits[idx].softmax(-1)
    sf = config.get("score_scale_factor", 1.0)
    sf = float(sf[i] if isinstance(sf, (list, tuple)) else sf)
    c = p + "mlp.calculator.experts."
    y = torch.zeros_like(x)
    for j, e in enumerate(idx):
        out = swiglu(x, W[f"{c}weight_gate.{e}"], W[f"{c}weight_up.{e}"], W[f"{c}weight_down.{e}"])
        y = y + scores[j] * sf * out
    return y


def ffn_qwen2_moe(x, W, p, i, config):
    """Qwen2-MoE: softmax over all, top-k, optional renorm, + sigmoid(gate x) * shared_expert(x)."""
    sparse = (i not in (config.get("mlp_only_layers") or [])
              and config["num_experts"] > 0 and (i + 1) % config.get("decoder_sparse_step", 1) == 0)
    if not sparse:
        return _dense(x, W, p)
    probs = (W[p + "mlp.gate.weight"] @ x).softmax(-1)
    idx = topk_indices(probs, config["num_experts_per_tok"])
    w = probs[idx]
    if config.get("norm_topk_prob", False):
        w = w / w.sum()
    y = sum(w[j] * _expert(x, W, f"{p}mlp.experts.{e}.") for j, e in enumerate(idx))
    shared_gate = torch.sigmoid(W[p + "mlp.shared_expert_gate.weight"] @ x)  # [1]
    return y + shared_gate[0] * _expert(x, W, p + "mlp.shared_expert.")


def ffn_deepseek(x, W, p, i, config):
    """DeepSeek-MoE v1: dense first layers; softmax, top-k, optional renorm, + ungated shared experts."""
    sparse = (config.get("n_routed_experts") is not None
              and i >= config.get("first_k_dense_replace", 0) and i % config.get("moe_layer_freq", 1) == 0)
    if not sparse:
        return _dense(x, W, p)
    if config.get("scoring_func", "softmax") != "softmax":
        raise NotImplementedError(config["scoring_func"])
    probs = (W[p + "mlp.gate.weight"] @ x).softmax(-1)
    idx = topk_indices(probs, config["num_experts_per_tok"])
    w = probs[idx]
    if config.get("norm_topk_prob", False):
        w = w / w.sum()
    y = sum(w[j] * _expert(x, W, f"{p}mlp.experts.{e}.") for j, e in enumerate(idx))
    if config.get("n_shared_experts"):
        y = y + _expert(x, W, p + "mlp.shared_experts.")
    return y


def ffn_llama(x, W, p, i, config):
    return _dense(x, W, p)


FFN = {
    "xverse": ffn_xverse,
    "mixtral": ffn_mixtral,
    "orion_moe": ffn_mixtral,
    "llama_moe": ffn_llama_moe,
    "qwen2_moe": ffn_qwen2_moe,
    "deepseek": ffn_deepseek,
    "llama": ffn_llama,
}


# ----------------------------------------------------------------------------- model

def reference_logits(config: dict, sd: dict[str, torch.Tensor], input_ids: torch.LongTensor) -> torch.Tensor:
    """Logits [B, T, V] in float64 from an HF config dict and HF-named state dict."""
    model_type = config["model_type"]
    if model_type not in FFN:
        raise ValueError(f"no reference for model_type {model_type!r}")
    ffn = FFN[model_type]
    W = {k: v.detach().to(_F64) for k, v in sd.items()}  # rotary inv_freq / weight_noise simply go unused
    eps = float(config.get("rms_norm_eps", 1e-6))
    use_ln = model_type == "orion_moe" and "model.layers.0.input_layernorm.bias" in W

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if use_ln:
            return layer_norm(x, W[name + ".weight"], W[name + ".bias"], eps)
        return rms_norm(x, W[name + ".weight"], eps)

    B, T = input_ids.shape
    d = config["hidden_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    cos, sin = rope_tables(config, hd, T)

    x = W["model.embed_tokens.weight"][input_ids]  # [B, T, d]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = x + attention(norm(x, p + "input_layernorm"), W, p + "self_attn.", config, cos, sin)
        h = norm(x, p + "post_attention_layernorm").reshape(B * T, d)
        y = torch.stack([ffn(h[n], W, p, i, config) for n in range(B * T)])
        x = x + y.view(B, T, d)
    x = norm(x, "model.norm")
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in W
    head = W["model.embed_tokens.weight"] if tied else W["lm_head.weight"]
    return x @ head.T
