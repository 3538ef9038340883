"""XVERSE layout (XverseForCausalLM, model_type xverse): XVERSE-MoE-A4.2B(-Chat), and dense XVERSE.

The architectures string is the dense models' too; the config is MoE exactly
when ``num_experts`` is present. Routing, from the hub's modeling_xverse.py
(XverseMoEMLP): a float32 router, softmax over all experts in float32, top-k,
then renormalised as w / (sum(w) + 1e-6); the shared experts are one MLP of
width num_shared_experts * intermediate_size added with no gate. SGLang's port
renormalises only if the config has ``norm_topk_prob``; XVERSE's config has no
such field, so moekit follows the hub code and honours the field only when a
config.json sets it.
"""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.families.base import LLAMA_NAMES, Family, llama_fields, llama_to_hf, need, source_or

TEMPLATE = {"architectures": ["XverseForCausalLM"], "model_type": "xverse", "torch_dtype": "bfloat16",
            "output_router_logits": False, "use_cache": True, "initializer_range": 0.02}

MOE_NAMES = {
    "layers.{i}.ffn.router.proj.weight": "model.layers.{i}.mlp.router.weight",
    "layers.{i}.ffn.experts.{e}.{p}": "model.layers.{i}.mlp.experts.{e}.{p}_proj.weight",
    "layers.{i}.ffn.shared.{p}": "model.layers.{i}.mlp.shared_experts.{p}_proj.weight",
}


def to_config(hf: dict, names: frozenset[str] = frozenset()) -> ModelConfig:
    kw = llama_fields(hf, 1e-6)
    if not hf.get("num_experts"):
        return ModelConfig(**kw, intermediate_size=need(hf, "intermediate_size"), family="xverse")
    width = need(hf, "intermediate_size")
    moe = MoEConfig(num_experts=hf["num_experts"], top_k=need(hf, "moe_top_k"), expert_width=width,
                    shared_width=int(hf.get("num_shared_experts", 0)) * width,
                    renormalize=bool(hf.get("norm_topk_prob", True)), renormalize_eps=1e-6, router_fp32=True,
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)))
    return ModelConfig(**kw, moe=moe, family="xverse")


def to_hf(cfg: ModelConfig) -> dict:
    hf = llama_to_hf(cfg, source_or(cfg, TEMPLATE))
    m = cfg.moe
    if m is None:
        for k in ("num_experts", "moe_top_k", "num_shared_experts"):
            hf.pop(k, None)
        hf["intermediate_size"] = cfg.intermediate_size
        return hf
    w = m.expert_width
    ok = (isinstance(w, int) and m.shared_width % w == 0 and m.first_dense_layers == 0 and not m.shared_gate
          and m.router == "linear" and not m.router_noise and m.score_func == "softmax"
          and (not m.renormalize or m.renormalize_eps == 1e-6) and not isinstance(m.routed_scale, tuple) and m.scale(0) == 1.0
          and not cfg.attention_bias)
    if not ok:
        raise ConfigError("the xverse layout cannot express this model (it needs uniform routed experts, "
                          "shared experts a multiple of the expert width, softmax routing, no dense layers)")
    hf.update(num_experts=m.num_experts, moe_top_k=m.top_k, num_shared_experts=m.shared_width // w,
              intermediate_size=w, router_aux_loss_coef=m.aux_loss_coef)
    if not m.renormalize:
        hf["norm_topk_prob"] = False
    return hf


FAMILY = Family("xverse", ("XverseForCausalLM", "XverseMoeForCausalLM"), ("xverse",), to_config, to_hf,
                lambda cfg: {**LLAMA_NAMES, **MOE_NAMES})
