"""LLaMA-MoE v1 layout (LlamaMoEForCausalLM, model_type llama_moe).

From pjlab-sys4nlp/llama-moe (modeling_llama_moe_hf.py, moe_gates.py,
moe_calculators.py): the gate is Linear(d->E) -> Tanh -> Linear(E->E) with no
biases ("mlp"; "linear" is a single Linear), scores are a softmax over the
top-k logits (= softmax over all, then renormalised), and the
UniversalCalculator multiplies each expert output by score * score_scale_factor.
Expert weights are raw Parameters with no ``.weight`` suffix; checkpoints may
carry ``rotary_emb.inv_freq`` buffers, which are accepted and skipped.
"""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.families.base import LLAMA_NAMES, Family, llama_fields, llama_to_hf, need, need_count, source_or

TEMPLATE = {"architectures": ["LlamaMoEForCausalLM"], "model_type": "llama_moe", "torch_dtype": "bfloat16",
            "gate_type": "TopKBalancedNoisyGate", "calculator_type": "UniversalCalculator",
            "gate_use_softmax": True, "gate_use_balance": True, "multiply_gate_scores": True,
            "add_weight_norm": False, "capacity_factor": 1.25, "drop_tokens": True, "dropped_padding": "zero",
            "pretraining_tp": 1, "use_cache": True}

MOE_NAMES = {
    "layers.{i}.ffn.router.proj2.weight": "model.layers.{i}.mlp.gate.gate_network.2.weight",
    "layers.{i}.ffn.router.noise.weight": "model.layers.{i}.mlp.gate.weight_noise.weight",
    "layers.{i}.ffn.experts.{e}.{p}": "model.layers.{i}.mlp.calculator.experts.weight_{p}.{e}",
}

UNSUPPORTED = {"gate_type": "TopKBalancedNoisyGate", "calculator_type": "UniversalCalculator",
               "gate_use_softmax": True, "multiply_gate_scores": True, "add_weight_norm": False}


def to_config(hf: dict, names: frozenset[str] = frozenset()) -> ModelConfig:
    for key, want in UNSUPPORTED.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"config.json field {key!r}={hf[key]!r} is not supported (moekit reads {want!r})")
    kw = llama_fields(hf, 1e-6)
    e, layers = need_count(hf, "num_experts"), kw["num_layers"]
    sizes = hf.get("size_experts")
    if sizes is None:
        total = need(hf, "intermediate_size")
        if total % e:
            raise ConfigError(f"config.json field 'intermediate_size'={total} is not divisible by num_experts={e}")
        width = total // e
    else:
        if len(sizes) != layers:
            raise ConfigError(f"config.json field 'size_experts' has {len(sizes)} rows, expected {layers}")
        rows = tuple(tuple(int(x) for x in row) for row in sizes)
        flat = {x for row in rows for x in row}
        width = flat.pop() if len(flat) == 1 and all(len(r) == e for r in rows) else rows
    gate = hf.get("gate_network", hf.get("gates", "mlp"))
    if gate not in ("mlp", "linear"):
        raise ConfigError(f"config.json field 'gate_network'={gate!r} is not supported (mlp, linear)")
    scale = hf.get("score_scale_factor", 1.0)
    moe = MoEConfig(num_experts=e, top_k=need(hf, "num_selects"), expert_width=width, router=gate,
                    router_noise=bool(hf.get("gate_add_noise", True)), router_fp32=False,
                    routed_scale=tuple(float(s) for s in scale) if isinstance(scale, list) else float(scale),
                    aux_loss="cv2" if hf.get("gate_use_balance", True) else "none",
                    aux_loss_coef=float(hf.get("gate_balance_loss_weight", 0.01)),
                    noise_eps=float(hf.get("gate_noise_epsilon", 0.01)))
    return ModelConfig(**kw, moe=moe, family="llama_moe")


def to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    ok = (m is not None and m.first_dense_layers == 0 and not m.shared_width and m.score_func == "softmax"
          and m.renormalize and m.renormalize_eps == 0 and not cfg.attention_bias)
    if not ok:
        raise ConfigError("the llama_moe layout cannot express this model (it needs softmax top-k routing, "
                          "no shared experts and no dense layers)")
    hf = llama_to_hf(cfg, source_or(cfg, TEMPLATE))
    sizes = [[m.width(i, j) for j in range(m.num_experts)] for i in range(cfg.num_layers)]
    scale = list(m.routed_scale) if isinstance(m.routed_scale, tuple) else m.routed_scale
    hf.update(num_experts=m.num_experts, num_selects=m.top_k, size_experts=sizes, intermediate_size=sum(sizes[0]),
              gate_network=m.router, gates=m.router, gate_add_noise=m.router_noise, score_scale_factor=scale,
              gate_use_balance=m.aux_loss != "none", gate_balance_loss_weight=m.aux_loss_coef,
              gate_noise_epsilon=m.noise_eps)
    return hf


def names(cfg: ModelConfig) -> dict[str, str]:
    first = "gate_network.0.weight" if cfg.moe and cfg.moe.router == "mlp" else "gate_network.weight"
    return {**LLAMA_NAMES, **MOE_NAMES, "layers.{i}.ffn.router.proj.weight": f"model.layers.{{i}}.mlp.gate.{first}"}


FAMILY = Family("llama_moe", ("LlamaMoEForCausalLM",), ("llama_moe",), to_config, to_hf, names,
                ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
