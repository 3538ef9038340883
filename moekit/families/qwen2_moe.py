"""Qwen2-MoE layout (Qwen2MoeForCausalLM): routed experts plus one sigmoid-gated shared expert.

Routing as transformers' Qwen2MoeTopKRouter: softmax over all experts in
float32, top-k, renormalised only when ``norm_topk_prob``. q/k/v carry biases.
"""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.families.base import LLAMA_NAMES, Family, llama_fields, llama_to_hf, need, source_or

TEMPLATE = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "torch_dtype": "bfloat16",
            "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
            "output_router_logits": False, "initializer_range": 0.02, "use_cache": True}

MOE_NAMES = {
    "layers.{i}.ffn.router.proj.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.ffn.experts.{e}.{p}": "model.layers.{i}.mlp.experts.{e}.{p}_proj.weight",
    "layers.{i}.ffn.shared.{p}": "model.layers.{i}.mlp.shared_expert.{p}_proj.weight",
    "layers.{i}.ffn.shared_gate.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
}


def to_config(hf: dict, names: frozenset[str] = frozenset()) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise ConfigError("config.json field 'use_sliding_window'=true is not supported")
    kw = llama_fields(hf, 1e-6)
    dense = list(hf.get("mlp_only_layers") or [])
    if hf.get("decoder_sparse_step", 1) != 1 or dense != list(range(len(dense))):
        raise ConfigError("config.json fields 'decoder_sparse_step'/'mlp_only_layers' are only supported "
                          "when the dense layers are a leading block (step 1)")
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    moe = MoEConfig(num_experts=need(hf, "num_experts"), top_k=need(hf, "num_experts_per_tok"),
                    expert_width=need(hf, "moe_intermediate_size"), shared_width=shared, shared_gate=shared > 0,
                    renormalize=bool(hf.get("norm_topk_prob", False)), router_fp32=False,
                    first_dense_layers=len(dense), aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    return ModelConfig(**kw, moe=moe, intermediate_size=hf.get("intermediate_size") or 0,
                       attention_bias=bool(hf.get("qkv_bias", True)), family="qwen2_moe")


def to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    ok = (m is not None and isinstance(m.expert_width, int) and m.shared_gate == (m.shared_width > 0)
          and m.router == "linear" and not m.router_noise and m.score_func == "softmax"
          and m.renormalize_eps == 0 and not isinstance(m.routed_scale, tuple) and m.scale(0) == 1.0)
    if not ok:
        raise ConfigError("the qwen2_moe layout cannot express this model (it needs uniform experts, "
                          "a gated shared expert or none, softmax routing, no output scale)")
    hf = llama_to_hf(cfg, source_or(cfg, TEMPLATE))
    hf.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_width,
              shared_expert_intermediate_size=m.shared_width, norm_topk_prob=m.renormalize,
              decoder_sparse_step=1, mlp_only_layers=list(range(m.first_dense_layers)),
              intermediate_size=cfg.intermediate_size or m.shared_width, qkv_bias=cfg.attention_bias,
              router_aux_loss_coef=m.aux_loss_coef)
    return hf


FAMILY = Family("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",), to_config, to_hf,
                lambda cfg: {**LLAMA_NAMES, **MOE_NAMES})
