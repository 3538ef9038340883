"""The CPU backend: C++ AVX-512 kernels (moekit/kernels/cpu/*.cpp), the reference path where they do not apply.

The extension is compiled once per machine with the system compiler
(``-march=native``, so AVX-512 BF16 where the CPU has it) and cached under
``~/.cache/moekit``. Anything the kernels do not cover (many tokens, autograd,
float16, non-contiguous inputs) runs the plain PyTorch reference, which is
also their oracle in tests.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from moekit.kernels import reference

SOURCES = Path(__file__).with_name("cpu")
MAX_TOKENS = 32  # linear/mlp: beyond this, oneDNN/MKL GEMMs (the reference path) are faster


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def supported() -> bool:
    """Whether this machine can use the C++ kernels (x86-64 with AVX-512)."""
    return sys.platform.startswith("linux") and " avx512f " in f" {_cpu_flags().split(':')[-1].strip()} "


@lru_cache(maxsize=1)
def extension():
    """Compile (first use only) and load the C++ kernels; raises if this machine cannot build them."""
    from torch.utils.cpp_extension import load

    files = sorted(SOURCES.glob("*.cpp")) + sorted(SOURCES.glob("*.h"))
    digest = hashlib.sha256(_cpu_flags().encode() + torch.__version__.encode())
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    key = digest.hexdigest()[:12]
    build = Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / f"cpu-{key}"
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print("moekit: compiling CPU kernels for this machine (once, about 30 s)...", file=sys.stderr, flush=True)
    return load(name=f"moekit_cpu_{key}", sources=[str(f) for f in files if f.suffix == ".cpp"], build_directory=str(build),
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def advise_weights(tensors) -> None:
    """Ask Linux for transparent huge pages under large CPU weight tensors before they are filled.

    Decode streams every byte of the selected weights; 2 MiB pages spare the TLB misses of
    4 KiB ones (3-5% faster decode on this project's machine). Best effort: a
    no-op off Linux, where THP is off, or for memory already touched.
    """
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is None:
        return
    for t in tensors:
        n = t.numel() * t.element_size()
        if t.device.type != "cpu" or n < 2 * HUGE_PAGE:
            continue
        start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (t.data_ptr() + n) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)


def _elementwise(*ts: torch.Tensor) -> bool:
    """The C++ kernels apply: bf16/fp32 CPU tensors of one dtype, no autograd."""
    x = ts[0]
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and all(t.dtype == x.dtype for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def _fast(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The streaming (few-token) kernels apply: ``_elementwise`` and at most MAX_TOKENS rows."""
    return x.dim() == 2 and x.shape[0] <= MAX_TOKENS and _elementwise(x, *weights)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if _fast(x2, w) and w.is_contiguous() and (b is None or b.dtype == x.dtype):
        return extension().linear(x2.contiguous(), w, b).view(*x.shape[:-1], w.shape[0])
    return reference.linear(x, w, b)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    if _elementwise(h) and h.dim() == 2:
        return extension().silu_mul(h.contiguous())
    return reference.silu_mul(h)


def mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    if _fast(x, w13, w2) and w13.is_contiguous() and w2.is_contiguous():
        return extension().mlp(x.contiguous(), w13, w2)
    return reference.mlp(x, w13, w2, act=silu_mul)


MOE_CHUNK = 1024  # tokens per fused-kernel call: bounds its float32 scratch (tokens x top-k x width)


def moe_experts(x_TD, w13_EFD, w2_EDF, ids_TK, weights_TK, shared=None) -> torch.Tensor:
    tensors = (x_TD, w13_EFD, w2_EDF) + (() if shared is None else tuple(shared[:2]))
    if not (_elementwise(*tensors) and x_TD.dim() == 2 and all(t.is_contiguous() for t in tensors[1:])):
        return reference.moe_experts(x_TD, w13_EFD, w2_EDF, ids_TK, weights_TK, shared, act=silu_mul)
    s13, s2, gate = shared if shared is not None else (None, None, None)
    ext, out = extension(), []
    for t0 in range(0, x_TD.shape[0], MOE_CHUNK):
        part = slice(t0, t0 + MOE_CHUNK)
        out.append(ext.moe(x_TD[part].contiguous(), w13_EFD, w2_EDF, ids_TK[part].contiguous(),
                           weights_TK[part].float().contiguous(), s13, s2,
                           None if gate is None else gate[part].float().contiguous()))
    return out[0] if len(out) == 1 else torch.cat(out)


def route(logits_TE, k, score_func="softmax", renormalize=True, eps=0.0, bias_E=None):
    if logits_TE.device.type == "cpu" and logits_TE.dim() == 2 and not (torch.is_grad_enabled()
                                                                        and logits_TE.requires_grad):
        bias = None if bias_E is None else bias_E.float().contiguous()
        weights, ids = extension().route(logits_TE.float().contiguous(), k, score_func == "softmax", renormalize,
                                         eps, 1.0, bias)
        return weights, ids
    return reference.route(logits_TE, k, score_func, renormalize, eps, bias_E)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if _elementwise(x, w) and w.is_contiguous():
        return extension().rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), w, eps).view(x.shape)
    return reference.rms_norm(x, w, eps)


def rotary(x_BNTA: torch.Tensor, cos_BTA: torch.Tensor, sin_BTA: torch.Tensor) -> torch.Tensor:
    if _elementwise(x_BNTA, cos_BTA, sin_BTA) and x_BNTA.dim() == 4:
        return extension().rotary(x_BNTA.contiguous(), cos_BTA.contiguous(), sin_BTA.contiguous())
    return reference.rotary(x_BNTA, cos_BTA, sin_BTA)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous rows along its last dimension (a KV-cache slice already has them)."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def attention(q_BHTA, k_BGSA, v_BGSA, mask_BTS=None) -> torch.Tensor:
    """Any number of query tokens: a row kernel for a few, blocked (flash) attention for many."""
    dtype = q_BHTA.dtype
    ok = (q_BHTA.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and q_BHTA.dim() == 4
          and k_BGSA.dtype == dtype and v_BGSA.dtype == dtype and q_BHTA.shape[-1] % 16 == 0
          and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHTA, k_BGSA, v_BGSA))))
    if ok:
        mask = None if mask_BTS is None else mask_BTS.contiguous()
        return extension().attention(q_BHTA.contiguous(), _rows(k_BGSA), _rows(v_BGSA), mask,
                                     q_BHTA.shape[-1] ** -0.5)
    return reference.attention(q_BHTA, k_BGSA, v_BGSA, mask_BTS)
