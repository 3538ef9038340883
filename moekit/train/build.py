"""Turning a TrainConfig into a model, a tokenizer and token streams."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from moekit.chat import ChatFormat
from moekit.config import ConfigError, ModelConfig, count_params
from moekit.families import detect_family
from moekit.models import MoEDecoder
from moekit.presets import PRESETS
from moekit.tokenizer import Tokenizer
from moekit.train.config import DataSpec, ModelSpec
from moekit.train.data import Mixture, TokenStream, build_shard
from moekit.train.sft import chat_encoder, text_encoder

# MoE fields that change how training routes or balances, not the weights' shapes
TRAINING_KNOBS = {"aux_loss", "aux_loss_coef", "z_loss_coef", "noise_eps", "jitter", "bias_balance",
                  "bias_update_rate", "capacity_factor"}


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def apply_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """Change ModelConfig fields (``moe: {...}`` for MoEConfig ones); unknown names are errors."""
    over = {k: _tuples(v) for k, v in overrides.items() if k != "moe"}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(over) - known)
    if bad:
        raise ConfigError(f"model.overrides: unknown ModelConfig field(s) {bad}")
    moe = cfg.moe
    if "moe" in overrides:
        if moe is None:
            raise ConfigError("model.overrides.moe: this model has no experts")
        moe_known = {f.name for f in dataclasses.fields(type(moe))}
        bad = sorted(set(overrides["moe"]) - moe_known)
        if bad:
            raise ConfigError(f"model.overrides.moe: unknown MoEConfig field(s) {bad}")
        moe = dataclasses.replace(moe, **{k: _tuples(v) for k, v in overrides["moe"].items()})
    return cfg.replace(**over, moe=moe)


def build_model(spec: ModelSpec, seed: int = 0) -> MoEDecoder:
    """A float32 model with reference kernels (autograd) from the run's model section."""
    if spec.path:
        from moekit.weights import load

        base = load(spec.path, dtype=torch.float32)
        extra = set(spec.overrides) - {"moe"}
        moe_extra = set(spec.overrides.get("moe", {})) - TRAINING_KNOBS
        if extra or moe_extra:
            raise ConfigError(f"model.overrides: {sorted(extra | moe_extra)} would change the shapes of the weights "
                              f"in {spec.path}; only {sorted(TRAINING_KNOBS)} can change when starting from a "
                              f"checkpoint")
        if not spec.overrides:
            return base
        model = MoEDecoder(apply_overrides(base.config, spec.overrides))
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        if unexpected or any(not k.endswith("router.bias") for k in missing):
            raise ConfigError(f"cannot carry the weights over: missing {missing}, unexpected {unexpected}")
        return model
    if spec.upcycle:
        from moekit.upcycle import upcycle_from_spec

        return upcycle_from_spec(spec.upcycle, spec.overrides, seed)
    if spec.preset and spec.preset not in PRESETS:
        raise ConfigError(f"model.preset={spec.preset!r} is not a preset ({', '.join(PRESETS)})")
    hf = PRESETS[spec.preset] if spec.preset else spec.config
    try:
        base = detect_family(hf).to_config(dict(hf), frozenset())
    except (ConfigError, TypeError, ValueError) as e:  # TypeError / ValueError: a field of the wrong type
        raise ConfigError(f"model.{'preset' if spec.preset else 'config'}: {e}") from None
    cfg = apply_overrides(base, spec.overrides)
    _check_memory(cfg, "model.preset" if spec.preset else "model.config")
    model = MoEDecoder(cfg)
    model.init_weights(std=spec.init_std, generator=torch.Generator().manual_seed(seed))
    return model


def _check_memory(cfg: ModelConfig, where: str) -> None:
    """Refuse sizes whose float32 weights alone exceed this machine's memory, before trying to allocate them."""
    params = count_params(cfg)[0]
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if params * 4 > have:
        raise ConfigError(f"{where}: vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, "
                          f"num_layers={cfg.num_layers} make {params:,} parameters, {params * 4 / 2**30:,.0f} GiB in "
                          f"float32; this machine has {have / 2**30:,.0f} GiB")


def tokenizer_key(folder: str | Path) -> str:
    """Identifies the tokenizer files, so token shards are rebuilt when the tokenizer changes."""
    folder = Path(folder)
    parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir())
             if p.name.startswith(("tokenizer", "special_tokens"))]
    return "|".join(parts)


def build_streams(data: DataSpec, tok_dir: str, model: MoEDecoder, seed: int, progress: bool = True
                  ) -> tuple[Mixture, dict[str, TokenStream]]:
    """(training mixture, {source name: held-out stream}) with shards built or reused under data.cache_dir."""
    tok = Tokenizer.from_pretrained(tok_dir)
    cfg = model.config
    eos = tok.eos_token_id if tok.eos_token_id is not None else cfg.eos_token_id
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok_dir} has {tok.vocab_size} tokens, more than the model's "
                          f"vocab_size={cfg.vocab_size}")
    key = tokenizer_key(tok_dir)
    train, heldout = [], {}
    for i, src in enumerate(data.sources):
        if src.format == "chat":
            encode = chat_encoder(tok, ChatFormat.for_model(tok, cfg.family, data.chat_format))
        else:
            encode = text_encoder(tok)
        paths = build_shard(src, encode, eos, cfg.vocab_size, data.cache_dir, key, progress)
        train.append(TokenStream(paths["train"], data.seq_len, seed + i))
        try:
            heldout[src.name] = TokenStream(paths["heldout"], data.seq_len, seed + 1000 + i)
        except ValueError:
            pass  # a source with too few held-out tokens is simply not evaluated
    dynamic = data.dynamic if data.mixing == "dynamic" else None
    reference = {s.name: s.reference_loss for s in data.sources if s.reference_loss is not None}
    mixture = Mixture([s.name for s in data.sources], train, [s.weight for s in data.sources], seed, dynamic,
                      reference)
    return mixture, heldout
