"""DeepSeek-MoE (v1) layout (DeepseekForCausalLM, model_type deepseek): DeepSeekMoE-16B.

Fine-grained routed experts, ungated shared experts stored as one MLP of width
n_shared_experts * moe_intermediate_size, leading dense layers
(first_k_dense_replace). Softmax scores, top-k, renormalised only when
``norm_topk_prob`` (false in the 16B release).
"""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.families.base import LLAMA_NAMES, Family, llama_fields, llama_to_hf, need, source_or

TEMPLATE = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "torch_dtype": "bfloat16",
            "scoring_func": "softmax", "moe_layer_freq": 1, "seq_aux": True, "attention_bias": False,
            "pretraining_tp": 1, "use_cache": True}

MOE_NAMES = {
    "layers.{i}.ffn.router.proj.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.ffn.experts.{e}.{p}": "model.layers.{i}.mlp.experts.{e}.{p}_proj.weight",
    "layers.{i}.ffn.shared.{p}": "model.layers.{i}.mlp.shared_experts.{p}_proj.weight",
}


def to_config(hf: dict, names: frozenset[str] = frozenset()) -> ModelConfig:
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"config.json field 'moe_layer_freq'={hf['moe_layer_freq']} is not supported (only 1)")
    if hf.get("scoring_func", "softmax") != "softmax":
        raise ConfigError(f"config.json field 'scoring_func'={hf['scoring_func']!r} is not supported (softmax)")
    if hf.get("attention_bias"):
        raise ConfigError("config.json field 'attention_bias'=true is not supported (o_proj bias)")
    kw = llama_fields(hf, 1e-6)
    width = need(hf, "moe_intermediate_size")
    moe = MoEConfig(num_experts=need(hf, "n_routed_experts"), top_k=need(hf, "num_experts_per_tok"),
                    expert_width=width, shared_width=int(hf.get("n_shared_experts") or 0) * width,
                    renormalize=bool(hf.get("norm_topk_prob", False)), router_fp32=False,
                    first_dense_layers=int(hf.get("first_k_dense_replace", 0)),
                    aux_loss_coef=float(hf.get("aux_loss_alpha", 0.001)))
    return ModelConfig(**kw, moe=moe, intermediate_size=need(hf, "intermediate_size"),
                       family="deepseek")


def to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    w = m.expert_width if m else None
    ok = (m is not None and isinstance(w, int) and m.shared_width % w == 0 and not m.shared_gate
          and m.router == "linear" and not m.router_noise and m.score_func == "softmax"
          and m.renormalize_eps == 0 and not isinstance(m.routed_scale, tuple) and m.scale(0) == 1.0
          and not cfg.attention_bias)
    if not ok:
        raise ConfigError("the deepseek layout cannot express this model (it needs uniform experts, ungated "
                          "shared experts a multiple of the expert width, softmax routing, no output scale)")
    hf = llama_to_hf(cfg, source_or(cfg, TEMPLATE))
    hf.update(n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=w,
              n_shared_experts=m.shared_width // w, norm_topk_prob=m.renormalize,
              first_k_dense_replace=m.first_dense_layers, intermediate_size=cfg.intermediate_size,
              aux_loss_alpha=m.aux_loss_coef)
    return hf


FAMILY = Family("deepseek", ("DeepseekForCausalLM",), ("deepseek",), to_config, to_hf,
                lambda cfg: {**LLAMA_NAMES, **MOE_NAMES})
