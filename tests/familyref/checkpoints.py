"""Tiny random checkpoints in each family's real Hugging Face on-disk layout.

Written only from /work/shared/reference/families.md (and the public HF layouts of
Mixtral / Qwen2-MoE / DeepSeek-MoE / LLaMA); it shares no code with ``moekit``.

``make_checkpoint(family, folder, seed=0, **variant)`` writes ``config.json`` plus the
weights and returns ``(config_dict, state_dict)``.  The state dict maps the exact HF
tensor names to float32 copies of the values *as stored* (after rounding to the
on-disk dtype), so a reference computed from it sees exactly what a loader sees.
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
from safetensors.torch import save_file

FAMILIES = ("xverse", "mixtral", "orion", "llama_moe", "qwen2_moe", "deepseek", "llama")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tiny dims shared by every family (each can be overridden through **variant).
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    use_cache=True,
)

# Family-specific config.json fields (field names as in the real releases).
_FAMILY_CONFIG = {
    "xverse": dict(
        architectures=["XverseForCausalLM"],
        auto_map={"AutoConfig": "configuration_xverse.XverseConfig",
                  "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"},
        model_type="xverse",
        pad_token_id=1, bos_token_id=2, eos_token_id=3,
        intermediate_size=32,  # per expert
        rms_norm_eps=1e-6, rope_theta=500000.0,
        moe_top_k=3, num_experts=8, num_shared_experts=2,
        output_router_logits=False, router_aux_loss_coef=0.01,
        transformers_version="4.38.2",
    ),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral",
        num_key_value_heads=2, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2,
        rms_norm_eps=1e-5, rope_theta=1e7,
        bos_token_id=6, eos_token_id=7, pad_token_id=0,
        sliding_window=None, attention_bias=False, attention_dropout=0.0,
        output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0,
    ),
    "orion": dict(
        architectures=["OrionMOECausalLM"],
        auto_map={"AutoConfig": "configuration_orion.OrionMOEConfig",
                  "AutoModelForCausalLM": "modeling_orion.OrionMOEForCausalLM"},
        model_type="orion_moe",
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_key_value_heads=2, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2,
        max_sequence_length=256,
        rms_norm_eps=1e-5, rope_theta=1e6, rope_scaling=None,
        sliding_window=None, attention_bias=False, attention_dropout=0.0,
        output_router_logits=False, router_aux_loss_coef=0.01, router_jitter_noise=0.0,
        _attn_implementation="flash_attention_2",
    ),
    "llama_moe": dict(
        architectures=["LlamaMoEForCausalLM"],
        auto_map={"AutoConfig": "configuration_llama_moe.LlamaMoEConfig",
                  "AutoModel": "modeling_llama_moe_hf.LlamaMoEModel",
                  "AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM"},
        model_type="llama_moe",
        intermediate_size=64,  # total over experts
        num_key_value_heads=4,
        rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_experts=4, num_selects=2, size_experts=None,  # filled in below
        gate_type="TopKBalancedNoisyGate", gate_network="mlp", gates="mlp",
        gate_use_softmax=True, gate_use_balance=True, gate_balance_loss_weight=0.01,
        gate_add_noise=True, gate_noise_epsilon=0.01,
        calculator_type="UniversalCalculator", multiply_gate_scores=True,
        score_scale_factor=2.0, add_weight_norm=False,
        capacity_factor=1.25, drop_tokens=True, dropped_padding="zero",
    ),
    "qwen2_moe": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
        num_key_value_heads=2, intermediate_size=40,
        num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=24, shared_expert_intermediate_size=40,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False, sliding_window=256, max_window_layers=2,
        rms_norm_eps=1e-6, rope_theta=1e6,
        bos_token_id=1, eos_token_id=2, attention_dropout=0.0,
        output_router_logits=False, router_aux_loss_coef=0.001,
    ),
    "deepseek": dict(
        architectures=["DeepseekForCausalLM"],
        auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
                  "AutoModel": "modeling_deepseek.DeepseekModel",
                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        model_type="deepseek",
        num_hidden_layers=3, num_key_value_heads=4,
        intermediate_size=56, moe_intermediate_size=16,
        first_k_dense_replace=1, moe_layer_freq=1,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, pretraining_tp=1,
        attention_bias=False, attention_dropout=0.0,
        bos_token_id=0, eos_token_id=1,
    ),
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        num_key_value_heads=2, intermediate_size=96,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1,
        bos_token_id=1, eos_token_id=2,
    ),
}

# family -> (default stored dtype, default format, default number of shards)
_STORAGE = {
    "xverse": ("bfloat16", "safetensors", 2),
    "mixtral": ("float32", "safetensors", 2),
    "orion": ("float16", "bin", 2),
    "llama_moe": ("float32", "bin", 2),
    "qwen2_moe": ("float32", "safetensors", 2),
    "deepseek": ("float32", "safetensors", 1),
    "llama": ("float32", "safetensors", 1),
}


class _Rand:
    """Seeded draws: matrices N(0, 0.08), norm weights 1 + N(0, 0.1), biases N(0, 0.1)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def mat(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * 0.08

    def norm_w(self, n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=self.g)

    def bias(self, n: int) -> torch.Tensor:
        return 0.1 * torch.randn(n, generator=self.g)


def _swiglu(t: dict, r: _Rand, prefix: str, d: int, ff: int, names=("gate_proj", "up_proj", "down_proj")):
    g, u, dn = names
    t[f"{prefix}{g}.weight"] = r.mat(ff, d)
    t[f"{prefix}{u}.weight"] = r.mat(ff, d)
    t[f"{prefix}{dn}.weight"] = r.mat(d, ff)


def _mlp_tensors(family: str, cfg: dict, t: dict, r: _Rand, p: str, i: int) -> None:
    """Append layer ``i``'s feed-forward tensors (prefix ``p`` = 'model.layers.{i}.')."""
    d = cfg["hidden_size"]
    if family == "xverse":
        E, ff = cfg["num_experts"], cfg["intermediate_size"]
        t[p + "mlp.router.weight"] = r.mat(E, d)
        for e in range(E):
            _swiglu(t, r, f"{p}mlp.experts.{e}.", d, ff)
        _swiglu(t, r, p + "mlp.shared_experts.", d, cfg["num_shared_experts"] * ff)
    elif family in ("mixtral", "orion"):
        E, ff = cfg["num_local_experts"], cfg["intermediate_size"]
        t[p + "block_sparse_moe.gate.weight"] = r.mat(E, d)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = r.mat(ff, d)
            t[q + "w2.weight"] = r.mat(d, ff)
            t[q + "w3.weight"] = r.mat(ff, d)
    elif family == "llama_moe":
        E = cfg["num_experts"]
        if cfg["gate_network"] == "mlp":
            t[p + "mlp.gate.gate_network.0.weight"] = r.mat(E, d)
            t[p + "mlp.gate.gate_network.2.weight"] = r.mat(E, E)
        else:
            t[p + "mlp.gate.gate_network.weight"] = r.mat(E, d)
        t[p + "mlp.gate.weight_noise.weight"] = r.mat(E, d)
        q = p + "mlp.calculator.experts."
        for e, s in enumerate(cfg["size_experts"][i]):
            t[f"{q}weight_gate.{e}"] = r.mat(s, d)
            t[f"{q}weight_up.{e}"] = r.mat(s, d)
            t[f"{q}weight_down.{e}"] = r.mat(d, s)
    elif family == "qwen2_moe":
        moe = i not in cfg["mlp_only_layers"] and cfg["num_experts"] > 0 and (i + 1) % cfg["decoder_sparse_step"] == 0
        if not moe:
            _swiglu(t, r, p + "mlp.", d, cfg["intermediate_size"])
            return
        t[p + "mlp.gate.weight"] = r.mat(cfg["num_experts"], d)
        for e in range(cfg["num_experts"]):
            _swiglu(t, r, f"{p}mlp.experts.{e}.", d, cfg["moe_intermediate_size"])
        _swiglu(t, r, p + "mlp.shared_expert.", d, cfg["shared_expert_intermediate_size"])
        t[p + "mlp.shared_expert_gate.weight"] = r.mat(1, d)
    elif family == "deepseek":
        moe = i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0
        if not moe:
            _swiglu(t, r, p + "mlp.", d, cfg["intermediate_size"])
            return
        ff = cfg["moe_intermediate_size"]
        t[p + "mlp.gate.weight"] = r.mat(cfg["n_routed_experts"], d)
        for e in range(cfg["n_routed_experts"]):
            _swiglu(t, r, f"{p}mlp.experts.{e}.", d, ff)
        _swiglu(t, r, p + "mlp.shared_experts.", d, cfg["n_shared_experts"] * ff)
    elif family == "llama":
        _swiglu(t, r, p + "mlp.", d, cfg["intermediate_size"])
    else:  # pragma: no cover - guarded by make_checkpoint
        raise ValueError(family)


def _build_tensors(family: str, cfg: dict, seed: int, layernorm: bool) -> dict[str, torch.Tensor]:
    """All tensors in HF order, float32, before rounding to the storage dtype."""
    r = _Rand(seed)
    d, V = cfg["hidden_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or d // H
    qkv_bias = family == "qwen2_moe" and cfg.get("qkv_bias", True)

    def norm(name: str) -> None:
        t[name + ".weight"] = r.norm_w(d)
        if layernorm:
            t[name + ".bias"] = r.bias(d)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": r.mat(V, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm")
        for name, rows in (("q_proj", H * hd), ("k_proj", KV * hd), ("v_proj", KV * hd)):
            t[f"{p}self_attn.{name}.weight"] = r.mat(rows, d)
            if qkv_bias:
                t[f"{p}self_attn.{name}.bias"] = r.bias(rows)
        t[p + "self_attn.o_proj.weight"] = r.mat(d, H * hd)
        if family == "llama_moe":  # LLaMA-MoE's own checkpoints carry the RoPE buffer
            theta = cfg["rope_theta"]
            t[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        norm(p + "post_attention_layernorm")
        _mlp_tensors(family, cfg, t, r, p, i)
    norm("model.norm")
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = r.mat(V, d)
    return t


def _write_weights(folder: pathlib.Path, t: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    """Write single-file or sharded safetensors / torch.save .bin, plus the HF index when sharded."""
    names = list(t)
    if fmt == "safetensors":
        stem, ext, index_name = "model", "safetensors", "model.safetensors.index.json"
    elif fmt == "bin":
        stem, ext, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    else:
        raise ValueError(f"unknown fmt {fmt!r}")

    def save(part: dict, path: pathlib.Path) -> None:
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in part.items()}, str(path), metadata={"format": "pt"})
        else:
            torch.save({k: v.clone() for k, v in part.items()}, path)

    if shards == 1:
        save(t, folder / f"{stem}.{ext}")
        return
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        part_names = names[s * per:(s + 1) * per]
        fname = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        save({k: t[k] for k in part_names}, folder / fname)
        weight_map.update({k: fname for k in part_names})
    total = sum(v.numel() * v.element_size() for v in t.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index, indent=2))


def make_checkpoint(family: str, folder: pathlib.Path, *, seed: int = 0, **variant) -> tuple[dict, dict[str, torch.Tensor]]:
    """Write a tiny random ``family`` checkpoint into ``folder``; return (config, float32 state dict).

    Writer-only variants: ``dtype`` ("float32" | "bfloat16" | "float16"), ``fmt``
    ("safetensors" | "bin"), ``shards`` (1 = single file, no index), ``norm`` (Orion only:
    "layernorm" | "rms").  Every other keyword overrides / adds a config.json field, e.g.
    ``rope_scaling={"type": "linear", "factor": 2.0}``, ``size_experts=[[8, 16, 24, 16], ...]``,
    ``score_scale_factor=[2.0, 4.0]``, ``norm_topk_prob=True``, ``tie_word_embeddings=True``,
    ``hidden_size=32``.
    """
    if family not in _FAMILY_CONFIG:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    variant = dict(variant)
    dtype_name, fmt, shards = _STORAGE[family]
    dtype_name = variant.pop("dtype", dtype_name)
    fmt = variant.pop("fmt", fmt)
    shards = variant.pop("shards", shards)
    norm_kind = variant.pop("norm", "layernorm" if family == "orion" else "rms")
    if norm_kind not in ("rms", "layernorm"):
        raise ValueError(f"norm must be 'rms' or 'layernorm', got {norm_kind!r}")
    if norm_kind == "layernorm" and family != "orion":
        raise ValueError("LayerNorm is only an option for the Orion family")

    cfg = {**_COMMON, **_FAMILY_CONFIG[family], **variant}
    if family == "llama_moe":
        if cfg["size_experts"] is None:
            width = cfg["intermediate_size"] // cfg["num_experts"]
            cfg["size_experts"] = [[width] * cfg["num_experts"] for _ in range(cfg["num_hidden_layers"])]
        assert len(cfg["size_experts"]) == cfg["num_hidden_layers"], "size_experts needs one list per layer"
        assert all(len(s) == cfg["num_experts"] for s in cfg["size_experts"]), "one width per expert"
        if "gate_network" in variant and "gates" not in variant:
            cfg["gates"] = cfg["gate_network"]
    cfg["torch_dtype"] = "bfloat16" if family == "orion" else dtype_name

    raw = _build_tensors(family, cfg, seed, layernorm=norm_kind == "layernorm")
    stored = {k: v.to(_DTYPES[dtype_name]) for k, v in raw.items()}
    _write_weights(folder, stored, fmt, shards)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = {k: v.to(torch.float32).clone() for k, v in stored.items()}
    return json.loads(json.dumps(cfg)), sd
