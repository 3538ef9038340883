"""The kernel interface: every model-side call into a fused or reference kernel goes through here.

A :class:`Backend` holds the functions of :mod:`moekit.kernels.reference`
(``linear``, ``mlp``, ``route``, ``moe_experts``, ``rms_norm``, ``attention``,
``rotary``, ``paged_attention``; for the loader ``dequantize``, GGUF blocks to float32, and
``quantize_into``, float weights to int8 / int4; ``advise_weights``, called on freshly allocated, not yet
filled weights by the loader; ``prepare_weights``, called by the loader on the filled model, where a backend
may rearrange weights for its kernels; ``fused_decoder``, where a backend can run a whole decode step in one
call, for the engine)
and ``paths``, what runs each op. It is chosen once, when a model is built
(``MoEDecoder(cfg, kernels=...)``), never per call:

- ``reference``: plain PyTorch, the numerical spec and the training path;
- ``cpu``: C++ AVX-512 kernels, with ATen's GEMMs (AMX where the CPU has it) for many tokens
  (``moekit/kernels/cpu.py``);
- ``triton``: Triton GPU kernels: fused MoE, routing, norms, RoPE (``moekit/kernels/triton/``);
- ``auto``: ``triton`` for a model whose weights live on a CUDA device (when triton
  imports); otherwise ``cpu`` where the machine supports it, the dtype is bfloat16 or
  float32 and the model is large enough to benefit (>= 50M parameters), else ``reference``.
  ``Backend.reason`` says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit.errors import MoekitError
from moekit.kernels import reference
from moekit.machine import isa

NAMES = ("reference", "cpu", "triton", "auto")
AUTO_MIN_PARAMS = 50_000_000


def _no_advice(tensors) -> None:
    """Backends without a memory layout preference for freshly allocated weights."""


def _as_loaded(model) -> None:
    """Backends that compute with the weights as loaded."""


@dataclass(eq=False)
class Backend:
    """The kernel functions a model calls, and what runs each op."""

    name: str
    linear: Callable
    mlp: Callable
    moe_experts: Callable
    rms_norm: Callable
    attention: Callable
    rotary: Callable
    route: Callable
    paged_attention: Callable = reference.paged_attention
    dequantize: Callable = reference.dequantize  # (GGUF blocks uint8 [R, bytes], GGML type, K) -> float32 [R, K]
    quantize_into: Callable = reference.quantize_into  # (w [.., N, K], data, scale, dtype): int8 / int4 in place
    advise_weights: Callable = _no_advice
    prepare_weights: Callable = _as_loaded  # (model) once its weights are filled
    fused_decoder: Callable | None = None  # (model) -> (a whole-model decode step, or None, and why not)
    paths: dict[str, str] = field(default_factory=dict)  # op -> what runs it
    reason: str = ""  # why this backend (auto's choice, an unavailable faster one)

    @classmethod
    def of(cls, name: str, impl, paths: dict[str, str], reason: str = "") -> Backend:
        return cls(name, impl.linear, impl.mlp, impl.moe_experts, impl.rms_norm, impl.attention, impl.rotary,
                   impl.route, impl.paged_attention, getattr(impl, "dequantize", reference.dequantize),
                   getattr(impl, "quantize_into", reference.quantize_into),
                   getattr(impl, "advise_weights", _no_advice),
                   getattr(impl, "prepare_weights", _as_loaded), getattr(impl, "fused_decoder", None), paths,
                   reason)

    def describe(self) -> list[str]:
        """One line for the backend, one per op."""
        head = f"kernels: {self.name}" + (f" ({self.reason})" if self.reason else "")
        return [head] + [f"  {op}: {what}" for op, what in self.paths.items()]


def _reference(reason: str = "") -> Backend:
    return Backend.of("reference", reference, {"all ops": "plain PyTorch (ATen)"}, reason)


def _triton(name: str) -> Backend:
    try:
        from moekit.kernels import triton as kernels
    except ImportError as e:
        if name == "triton":
            raise MoekitError(f"kernel backend 'triton' needs the triton package ({e})") from None
        warnings.warn(f"moekit: Triton kernels unavailable ({e}); using the reference path", stacklevel=3)
        return _reference(f"Triton unavailable: {e}")
    return Backend.of("triton", kernels, {"experts, routing, norms, rotary, paged_attention": "Triton",
                                          "linear, attention": "cuBLAS / SDPA"})


def get_backend(name: str = "reference", params: int | None = None, device=None, dtype=None) -> Backend:
    """The kernels of backend ``name`` (``params``: model size; ``device`` and ``dtype``: where and
    how the weights live; all three used by ``auto``)."""
    if name not in NAMES:
        raise MoekitError(f"unknown kernel backend {name!r}; available: {', '.join(NAMES)}")
    if name == "triton" or (name == "auto" and device is not None and torch.device(device).type == "cuda"):
        return _triton(name)
    if name == "reference":
        return _reference()
    from moekit.kernels import cpu

    dtype = dtype or torch.get_default_dtype()
    if not cpu.supported():
        why = "this CPU has no AVX-512"
    elif dtype not in cpu.DTYPES:
        why = f"{str(dtype).removeprefix('torch.')} weights (the C++ kernels take bfloat16 or float32)"
    elif name == "auto" and (params or 0) < AUTO_MIN_PARAMS:
        return _reference(f"auto: a model under {AUTO_MIN_PARAMS // 10**6}M parameters")
    else:
        try:
            impl = cpu.CpuKernels(dtype)
        except Exception as e:  # no compiler, no ninja, ...
            if name == "cpu":
                raise
            warnings.warn(f"moekit: CPU kernels unavailable ({e}); using the reference path", stacklevel=2)
            return _reference(f"CPU kernels unavailable: {e}")
        return Backend.of("cpu", impl, impl.paths(), ", ".join(isa()))
    if name == "cpu":
        raise MoekitError(f"kernel backend 'cpu' cannot run here: {why}")
    return _reference(f"auto: {why}")
