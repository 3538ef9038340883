"""Orion-MoE8x7B layout (OrionMOECausalLM, model_type orion_moe).

Its config is Mixtral's (configuration_orion.py says it was adapted from
configuration_mixtral.py) and we read the tensors under Mixtral's names.
The norm is the open point: the dense Orion-14B lineage uses nn.LayerNorm
with a bias (vLLM's orion.py, llama.cpp's converter) although the field is
called rms_norm_eps. moekit decides from the checkpoint itself: LayerNorm when
``*.input_layernorm.bias`` tensors are present, RMSNorm when they are absent,
and LayerNorm (the lineage's choice) when there is no checkpoint to look at.
"""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.families.base import LLAMA_NAMES, Family, llama_fields, llama_to_hf, source_or
from moekit.families.mixtral import MOE_NAMES, check_window, mixtral_moe, require_mixtral_shape

TEMPLATE = {"architectures": ["OrionMOECausalLM"], "model_type": "orion_moe", "torch_dtype": "bfloat16",
            "sliding_window": None, "attention_bias": False, "router_jitter_noise": 0.0,
            "output_router_logits": False, "rope_scaling": None, "use_cache": True}


def norm_from_names(names: frozenset[str]) -> str:
    if not names:
        return "layer"
    return "layer" if any(n.endswith("input_layernorm.bias") for n in names) else "rms"


def to_config(hf: dict, names: frozenset[str] = frozenset()) -> ModelConfig:
    check_window(hf)
    return ModelConfig(**llama_fields(hf, 1e-5), moe=mixtral_moe(hf), norm=norm_from_names(names), family="orion")


def to_hf(cfg: ModelConfig) -> dict:
    require_mixtral_shape(cfg, "orion")
    hf = llama_to_hf(cfg, source_or(cfg, TEMPLATE))
    m = cfg.moe
    hf.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k, intermediate_size=m.expert_width,
              router_aux_loss_coef=m.aux_loss_coef, router_jitter_noise=m.jitter,
              max_sequence_length=cfg.max_position_embeddings)
    return hf


FAMILY = Family("orion", ("OrionMOECausalLM", "OrionMOEForCausalLM"), ("orion_moe",), to_config, to_hf,
                lambda cfg: {**LLAMA_NAMES, **MOE_NAMES}, weight_format="bin")
