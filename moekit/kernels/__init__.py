"""The kernel interface: every model-side call into a fused or reference kernel goes through here.

A backend is a namespace with the functions of :mod:`moekit.kernels.reference`
(``linear``, ``mlp``, ``route``, ``moe_experts``,
``rms_norm``, ``attention``, ``rotary``). It is chosen once, when a
model is built (``MoEDecoder(cfg, kernels=...)``), never per call:

- ``reference``: plain PyTorch, the numerical spec and the training path;
- ``cpu``: C++ AVX-512 kernels for decode-sized batches (``moekit/kernels/cpu.py``);
- ``auto``: ``cpu`` where the machine supports it and the model is large enough
  to benefit (>= 50M parameters), else ``reference``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

from moekit.kernels import reference

NAMES = ("reference", "cpu", "auto")
AUTO_MIN_PARAMS = 50_000_000


def _namespace(name: str, module) -> SimpleNamespace:
    return SimpleNamespace(name=name, linear=module.linear, mlp=module.mlp, moe_experts=module.moe_experts,
                           rms_norm=module.rms_norm, attention=module.attention, rotary=module.rotary,
                           route=module.route)


def get_backend(name: str = "reference", params: int | None = None) -> SimpleNamespace:
    """The kernel functions of backend ``name`` (``params``: model size, used by ``auto``)."""
    if name not in NAMES:
        raise ValueError(f"unknown kernel backend {name!r}; available: {', '.join(NAMES)}")
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
