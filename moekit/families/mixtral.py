"""Mixtral layout (MixtralForCausalLM): APUS-xDAN-4.0-MoE, Mixtral-8x7B.

Routing: softmax over all experts (float32) -> top-k -> renormalise; router
logits in the activation dtype, as transformers computes them.
"""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.families.base import LLAMA_NAMES, Family, llama_fields, llama_to_hf, need, source_or

TEMPLATE = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "torch_dtype": "bfloat16",
            "sliding_window": None, "attention_dropout": 0.0, "output_router_logits": False,
            "initializer_range": 0.02, "use_cache": True}

MOE_NAMES = {
    "layers.{i}.ffn.router.proj.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "layers.{i}.ffn.experts.{e}.gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "layers.{i}.ffn.experts.{e}.down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "layers.{i}.ffn.experts.{e}.up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}


def check_window(hf: dict) -> None:
    w, n = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096)
    if w is not None and w < n:
        raise ConfigError(f"config.json field 'sliding_window'={w} is not supported (below max_position_embeddings={n})")


def mixtral_moe(hf: dict, **overrides) -> MoEConfig:
    kw = dict(num_experts=need(hf, "num_local_experts"), top_k=need(hf, "num_experts_per_tok"),
              expert_width=need(hf, "intermediate_size"), router_fp32=False,
              aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
              jitter=float(hf.get("router_jitter_noise") or 0.0))
    return MoEConfig(**{**kw, **overrides})


def require_mixtral_shape(cfg: ModelConfig, family: str) -> None:
    m = cfg.moe
    ok = (m is not None and m.first_dense_layers == 0 and not m.shared_width and m.router == "linear"
          and not m.router_noise and m.score_func == "softmax" and m.renormalize and m.renormalize_eps == 0
          and isinstance(m.expert_width, int) and m.scale(0) == 1.0 and not cfg.attention_bias
          and not isinstance(m.routed_scale, tuple))
    if not ok:
        raise ConfigError(f"the {family} layout cannot express this model (it needs uniform routed experts, "
                          "softmax top-k renormalised, no shared experts, no dense layers, no output scale)")


def to_config(hf: dict, names: frozenset[str] = frozenset()) -> ModelConfig:
    check_window(hf)
    return ModelConfig(**llama_fields(hf, 1e-5), moe=mixtral_moe(hf), family="mixtral")


def to_hf(cfg: ModelConfig) -> dict:
    require_mixtral_shape(cfg, "mixtral")
    hf = llama_to_hf(cfg, source_or(cfg, TEMPLATE))
    m = cfg.moe
    hf.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k, intermediate_size=m.expert_width,
              router_aux_loss_coef=m.aux_loss_coef, router_jitter_noise=m.jitter)
    return hf


FAMILY = Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), to_config, to_hf,
                lambda cfg: {**LLAMA_NAMES, **MOE_NAMES})
