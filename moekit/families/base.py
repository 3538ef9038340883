"""What a family is: a config translator plus a tensor-name table, both declarative where possible.

Name tables map moekit's canonical tensor names (see ``MoEDecoder.named_views``)
to the family's Hugging Face names. Patterns use placeholders: ``{i}`` layer,
``{e}`` expert, ``{p}`` projection (gate/up/down), ``{a}`` attention projection
(q/k/v/o), ``{w}`` weight/bias. The same table is read both ways.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from moekit.config import ConfigError, ModelConfig, RopeScaling

SCALE = "_scale"  # suffix of a quantised weight's scale tensor (docs/quantization.md)
PLACEHOLDERS = {"i": r"\d+", "e": r"\d+", "p": "gate|up|down", "a": "q|k|v|o", "w": "weight|bias"}

# moekit name -> Hugging Face name, shared by every LLaMA-lineage family.
LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.{w}": "model.norm.{w}",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.{w}": "model.layers.{i}.input_layernorm.{w}",
    "layers.{i}.ffn_norm.{w}": "model.layers.{i}.post_attention_layernorm.{w}",
    "layers.{i}.attn.{a}.{w}": "model.layers.{i}.self_attn.{a}_proj.{w}",
    "layers.{i}.ffn.{p}": "model.layers.{i}.mlp.{p}_proj.weight",  # dense FFN layers
}


def _compile(pattern: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w)\}", pattern):
        out += re.escape(pattern[pos:m.start()]) + f"(?P<{m.group(1)}>{PLACEHOLDERS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]))


class NameMap:
    """Bidirectional, pattern-based tensor-name translation."""

    def __init__(self, table: dict[str, str]):
        self.rules = [(_compile(src), dst, _compile(dst), src) for src, dst in table.items()]

    def to_hf(self, name: str) -> str | None:
        for src_re, dst, _, _ in self.rules:
            if m := src_re.fullmatch(name):
                return dst.format(**m.groupdict())
        return self._scale(name, self.to_hf)

    def from_hf(self, name: str) -> str | None:
        for _, _, dst_re, src in self.rules:
            if m := dst_re.fullmatch(name):
                return src.format(**m.groupdict())
        return self._scale(name, self.from_hf)

    @staticmethod
    def _scale(name: str, translate) -> str | None:
        """A quantised weight's scales sit beside it: ``<weight's name>_scale`` in both namings."""
        if name.endswith(SCALE):
            base = translate(name.removesuffix(SCALE))
            return None if base is None else base + SCALE
        return None


def need(hf: dict, key: str):
    """A required config.json field, or a ConfigError naming it."""
    if hf.get(key) is None:
        raise ConfigError(f"config.json field {key!r} is missing")
    return hf[key]


def need_count(hf: dict, key: str) -> int:
    """A required positive-integer config.json field (a size or a count), or a ConfigError naming it."""
    v = need(hf, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"config.json field {key!r}={v!r} must be a positive integer")
    return v


def check_silu(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json field 'hidden_act'={act!r} is not supported (moekit experts are SwiGLU/silu)")


def rope_from_hf(hf: dict, default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_theta``/``rope_scaling`` or transformers 5's ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", default_theta))
    rs = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not rs:
        return float(theta), None
    kind = rs.get("type", rs.get("rope_type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ("linear", "dynamic"):
        raise ConfigError(f"config.json field 'rope_scaling' type {kind!r} is not supported (linear, dynamic)")
    return float(theta), RopeScaling(kind, float(need(rs, "factor")))


def rope_to_hf(cfg: ModelConfig, hf: dict) -> None:
    hf["rope_theta"] = cfg.rope_theta
    hf["rope_scaling"] = None if cfg.rope_scaling is None else {
        "type": cfg.rope_scaling.kind, "factor": cfg.rope_scaling.factor}


def llama_fields(hf: dict, norm_eps_default: float = 1e-6) -> dict:
    """ModelConfig keyword arguments every LLaMA-lineage config.json shares."""
    check_silu(hf)
    heads, d = need_count(hf, "num_attention_heads"), need_count(hf, "hidden_size")
    if not hf.get("head_dim") and d % heads:
        raise ConfigError(f"config.json field 'hidden_size'={d} is not divisible by num_attention_heads={heads}")
    theta, scaling = rope_from_hf(hf)
    eos = hf.get("eos_token_id")
    return dict(
        vocab_size=need(hf, "vocab_size"), hidden_size=d, num_layers=need(hf, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_eps=float(hf.get("rms_norm_eps", norm_eps_default)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, extra=dict(hf))


def llama_to_hf(cfg: ModelConfig, base: dict) -> dict:
    """Write the shared LLaMA-lineage fields of ``cfg`` over ``base`` (a family template or source config)."""
    hf = dict(base)
    hf.update(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
              pad_token_id=cfg.pad_token_id, hidden_act="silu",
              eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads or "head_dim" in hf:
        hf["head_dim"] = cfg.head_dim
    hf.pop("rope_parameters", None)
    rope_to_hf(cfg, hf)
    return hf


def source_or(cfg: ModelConfig, template: dict) -> dict:
    """The config.json this model came from when it is of the same model_type, else the template."""
    src = cfg.extra
    return dict(src) if src.get("model_type") == template["model_type"] else dict(template)


@dataclass(frozen=True)
class Family:
    """A checkpoint family: how to recognise it, translate its config, and name its tensors."""

    name: str  # moekit's name for the layout
    architectures: tuple[str, ...]  # config.json "architectures" entries it claims
    model_types: tuple[str, ...]  # config.json "model_type" values it claims
    to_config: Callable[[dict, frozenset[str]], ModelConfig]  # (config.json, tensor names) -> ModelConfig
    to_hf: Callable[[ModelConfig], dict]  # ModelConfig -> config.json dict
    names: Callable[[ModelConfig], dict[str, str]]  # moekit name pattern -> HF name pattern
    ignore: tuple[str, ...] = ()  # regexes of checkpoint tensors that are accepted and not loaded
    detect: Callable[[dict], bool] = field(default=lambda hf: True)  # extra test after type/arch match
    weight_format: str = "safetensors"  # what the family's own releases ship
