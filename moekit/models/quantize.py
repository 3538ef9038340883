"""Weight-only quantisation of a model, in place, and the record of it that checkpoints carry.

:func:`quantize_model` replaces the matrices of attention (``wqkv``, ``wo``), dense and shared
MLPs and routed experts (``w13``, ``w2``) and the LM head (unless tied to the embedding) by
:class:`~moekit.kernels.weights.QuantWeight` modules. Embeddings, norms and routers stay in
floating point. A matrix whose input width the group size does not divide stays as it is (and
padded experts whose widths do not end on a group): the rule depends only on shapes, so loading
rebuilds the same structure from config.json's ``quantization_config`` (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moekit.config import ConfigError
from moekit.kernels.weights import FORMATS, INT4_GROUPS, QuantWeight, check_format
from moekit.models.layers import MLP, Attention
from moekit.models.moe import Experts

DEFAULT_GROUP = {"int8": None, "int4": 64}  # None: one scale per output channel
METHOD = "moekit"


@dataclass(frozen=True)
class QuantConfig:
    """Which format, which group size (None: per output channel), whether the LM head too."""

    format: str
    group: int | None = None
    lm_head: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"quantisation format {self.format!r} is not supported; use one of {', '.join(FORMATS)}")
        if self.format == "int4" and self.group not in INT4_GROUPS:
            raise ConfigError(f"int4 group size {self.group} is not supported; use one of {INT4_GROUPS}")
        if self.group is not None and (not isinstance(self.group, int) or self.group < 1 or self.group % 32):
            raise ConfigError(f"group size {self.group!r} must be a multiple of 32 (or none: per output channel)")

    @classmethod
    def of(cls, fmt: str, group: int | None = None, lm_head: bool = True) -> QuantConfig:
        """A format with its default group size unless one is given."""
        return cls(fmt, DEFAULT_GROUP.get(fmt) if group is None else group, lm_head)

    @classmethod
    def requested(cls, quantize: str | QuantConfig | None, group: int | None = None) -> QuantConfig | None:
        """A loader's ``quantize`` argument: None, a format (with ``group``, see :meth:`of`) or a QuantConfig."""
        if quantize is None or isinstance(quantize, QuantConfig):
            return quantize
        return cls.of(quantize, group)

    def to_json(self) -> dict:
        return {"quant_method": METHOD, "format": self.format, "group_size": self.group, "lm_head": self.lm_head}

    @classmethod
    def from_json(cls, d) -> QuantConfig:
        """From config.json's ``quantization_config``; a ConfigError names a field it cannot take."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json field 'quantization_config' holds a {type(d).__name__}, not an object")
        method = d.get("quant_method")
        if method != METHOD:
            raise ConfigError(f"config.json field 'quantization_config.quant_method'={method!r} is not supported; "
                              f"moekit reads its own int8/int4 layout ({METHOD!r}, written by moekit quantize)")
        try:
            return cls(d.get("format"), d.get("group_size"), bool(d.get("lm_head", True)))
        except ConfigError as e:
            raise ConfigError(f"config.json field 'quantization_config': {e}") from None


def _group(q: QuantConfig, K: int) -> int:
    return K if q.group is None else q.group


def _fits(q: QuantConfig, K: int) -> bool:
    try:
        check_format(q.format, K, _group(q, K))
    except ValueError:
        return False
    return True


def targets(model: nn.Module, q: QuantConfig) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every matrix ``q`` quantises in ``model``."""
    out = []
    for module in model.modules():
        if isinstance(module, Attention):
            names = ("wqkv", "wo")
        elif isinstance(module, MLP):
            names = ("w13", "w2")
        elif isinstance(module, Experts):
            g = _group(q, module.w2.shape[-1])
            if module.padded and any(w % g for w in module.widths):
                continue
            names = ("w13", "w2")
        elif module is getattr(model, "lm_head", None) and q.lm_head:
            names = ("weight",)
        else:
            continue
        out += [(module, n) for n in names if _fits(q, getattr(module, n).shape[-1])]
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, q: QuantConfig, structure_only: bool = False,
                   progress: bool = False) -> QuantConfig:
    """Quantise ``model``'s matrices in place (see the module doc); returns ``q``, also kept as
    ``model.quant``. ``structure_only``: empty quantised weights of the right shapes (for loading)."""
    if getattr(model, "quant", None) is not None:
        raise ConfigError(f"the model is already quantised ({model.quant.format}); quantise its float checkpoint")
    todo = targets(model, q)
    for module, name in tqdm(todo, desc=f"quantising to {q.format}", unit="matrix", disable=not progress):
        w = getattr(module, name)
        group = _group(q, w.shape[-1])
        qw = (QuantWeight(q.format, w.shape, group, device=w.device) if structure_only
              else QuantWeight.quantize(w, q.format, group))
        delattr(module, name)
        setattr(module, name, qw)
    model.quant = q
    return q
