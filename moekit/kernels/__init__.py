"""The kernel interface: every model-side call into a fused or reference kernel goes through here.

A backend is a small namespace of functions with the signatures of
:mod:`moekit.kernels.reference`. It is chosen once, when a model is built
(``MoEDecoder(cfg, backend="reference")``), never per call.
"""

from __future__ import annotations

from types import SimpleNamespace

from moekit.kernels import reference


def get_backend(name: str = "reference") -> SimpleNamespace:
    """The kernel functions of backend ``name``."""
    if name in ("reference", "auto"):
        return SimpleNamespace(name=name, moe_experts=reference.moe_experts)
    raise ValueError(f"unknown kernel backend {name!r}; available: 'reference'")
