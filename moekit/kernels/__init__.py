"""The kernel interface: every model-side call into a fused or reference kernel goes through here.

A backend is a namespace with the functions of :mod:`moekit.kernels.reference`
(``linear``, ``mlp``, ``route``, ``moe_experts``,
``rms_norm``, ``attention``, ``rotary``; optionally ``advise_weights``, called on
freshly allocated, not yet filled weights by the loader). It is chosen once, when a
model is built (``MoEDecoder(cfg, kernels=...)``), never per call:

- ``reference``: plain PyTorch, the numerical spec and the training path;
- ``cpu``: C++ AVX-512 kernels for decode-sized batches (``moekit/kernels/cpu.py``);
- ``triton``: Triton GPU kernels: fused MoE, routing, norms, RoPE (``moekit/kernels/triton/``);
- ``auto``: ``triton`` for a model whose weights live on a CUDA device (when triton
  imports); otherwise ``cpu`` where the machine supports it and the model is large
  enough to benefit (>= 50M parameters), else ``reference``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from moekit.kernels import reference

NAMES = ("reference", "cpu", "triton", "auto")
AUTO_MIN_PARAMS = 50_000_000


def _namespace(name: str, module) -> SimpleNamespace:
    return SimpleNamespace(name=name, linear=module.linear, mlp=module.mlp, moe_experts=module.moe_experts,
                           rms_norm=module.rms_norm, attention=module.attention, rotary=module.rotary,
                           route=module.route, advise_weights=getattr(module, "advise_weights", _no_advice))


def _no_advice(tensors) -> None:
    """Backends without a memory layout preference for freshly allocated weights."""


def _triton(name: str) -> SimpleNamespace:
    try:
        from moekit.kernels import triton as kernels
    except ImportError as e:
        if name == "triton":
            raise ValueError(f"kernel backend 'triton' needs the triton package ({e})") from None
        warnings.warn(f"moekit: Triton kernels unavailable ({e}); using the reference path", stacklevel=3)
        return _namespace("reference", reference)
    return _namespace("triton", kernels)


def get_backend(name: str = "reference", params: int | None = None, device=None) -> SimpleNamespace:
    """The kernel functions of backend ``name`` (``params``: model size; ``device``: where the
    weights live; both used by ``auto``)."""
    if name not in NAMES:
        raise ValueError(f"unknown kernel backend {name!r}; available: {', '.join(NAMES)}")
    if name == "triton" or (name == "auto" and device is not None and torch.device(device).type == "cuda"):
        return _triton(name)
    if name == "reference" or (name == "auto" and (params or 0) < AUTO_MIN_PARAMS):
        return _namespace("reference", reference)
    from moekit.kernels import cpu

    if not cpu.supported():
        if name == "cpu":
            raise ValueError("kernel backend 'cpu' needs an x86-64 CPU with AVX-512 (this one has none)")
        return _namespace("reference", reference)
    try:
        cpu.extension()
    except Exception as e:  # no compiler, no ninja, ...
        if name == "cpu":
            raise
        warnings.warn(f"moekit: CPU kernels unavailable ({e}); using the reference path", stacklevel=2)
        return _namespace("reference", reference)
    return _namespace("cpu", cpu)
