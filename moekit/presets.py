"""Published model shapes, kept as the config.json each release ships (sources in docs/families.md)."""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig
from moekit.families import detect_family

_LLAMA2 = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
           "tie_word_embeddings": False}


def _llama_moe(experts: int, k: int, scale: float) -> dict:
    return {"architectures": ["LlamaMoEForCausalLM"], "model_type": "llama_moe", **_LLAMA2,
            "intermediate_size": 11008, "num_experts": experts, "num_selects": k,
            "size_experts": [[11008 // experts] * experts] * 32, "gate_type": "TopKBalancedNoisyGate",
            "gate_network": "mlp", "gates": "mlp", "gate_use_softmax": True, "gate_use_balance": True,
            "gate_balance_loss_weight": 0.01, "gate_add_noise": True, "gate_noise_epsilon": 0.01,
            "calculator_type": "UniversalCalculator", "multiply_gate_scores": True, "score_scale_factor": scale,
            "add_weight_norm": False, "torch_dtype": "bfloat16"}


PRESETS: dict[str, dict] = {
    "xverse-moe-a4.2b": {
        "architectures": ["XverseForCausalLM"], "model_type": "xverse", "hidden_size": 2560,
        "intermediate_size": 1728, "num_hidden_layers": 28, "num_attention_heads": 32,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 500000, "vocab_size": 100534,
        "tie_word_embeddings": False, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3,
        "hidden_act": "silu", "moe_top_k": 6, "num_experts": 64, "num_shared_experts": 2,
        "output_router_logits": False, "router_aux_loss_coef": 0.01, "torch_dtype": "bfloat16"},
    "apus-xdan-4.0-moe": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 7168,
        "intermediate_size": 20480, "num_hidden_layers": 60, "num_attention_heads": 56, "num_key_value_heads": 8,
        "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1e7, "router_aux_loss_coef": 0.001, "sliding_window": None, "vocab_size": 64000,
        "tie_word_embeddings": False, "bos_token_id": 6, "eos_token_id": 7, "pad_token_id": 0,
        "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "orion-moe-8x7b": {
        "architectures": ["OrionMOECausalLM"], "model_type": "orion_moe", "hidden_size": 4096,
        "intermediate_size": 14592, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 8192,
        "max_sequence_length": 8192, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "rope_scaling": None,
        "router_aux_loss_coef": 0.01, "router_jitter_noise": 0.0, "sliding_window": None, "vocab_size": 113664,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "attention_bias": False, "hidden_act": "silu", "torch_dtype": "bfloat16", "use_cache": False},
    "llama-moe-v1-3.5b-2_8": _llama_moe(8, 2, 4.0),
    "llama-moe-v1-3.5b-4_16": _llama_moe(16, 4, 4.0),
    "llama-moe-v1-3.0b-2_16": _llama_moe(16, 2, 8.0),
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None, "vocab_size": 32000,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "torch_dtype": "bfloat16"},
    "qwen2-moe": {  # Qwen1.5-MoE-A2.7B
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "vocab_size": 151936, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
        "use_sliding_window": False, "router_aux_loss_coef": 0.001, "hidden_act": "silu",
        "torch_dtype": "bfloat16"},
    "deepseek-moe-16b": {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "hidden_size": 2048,
        "intermediate_size": 10944, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
        "aux_loss_alpha": 0.001, "seq_aux": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "vocab_size": 102400, "tie_word_embeddings": False, "bos_token_id": 100000,
        "eos_token_id": 100001, "hidden_act": "silu", "torch_dtype": "bfloat16"},
}


def preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a published model, by preset name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    hf = PRESETS[name]
    return detect_family(hf).to_config(dict(hf), frozenset())
