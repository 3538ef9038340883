"""Dense LLaMA layout (LlamaForCausalLM): the starting point for upcycling."""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig
from moekit.families.base import LLAMA_NAMES, Family, llama_fields, llama_to_hf, need, source_or

TEMPLATE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "use_cache": True}


def to_config(hf: dict, names: frozenset[str] = frozenset()) -> ModelConfig:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("config.json field 'attention_bias'/'mlp_bias'=true is not supported")
    return ModelConfig(**llama_fields(hf, 1e-6), intermediate_size=need(hf, "intermediate_size"),
                       family="llama")


def to_hf(cfg: ModelConfig) -> dict:
    if cfg.moe is not None or cfg.attention_bias:
        raise ConfigError("the llama layout cannot express this model (it is dense, with no attention biases)")
    hf = llama_to_hf(cfg, source_or(cfg, TEMPLATE))
    hf.update(intermediate_size=cfg.intermediate_size)
    return hf


FAMILY = Family("llama", ("LlamaForCausalLM",), ("llama",), to_config, to_hf, lambda cfg: dict(LLAMA_NAMES),
                ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
