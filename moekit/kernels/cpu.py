"""The CPU backend: C++ AVX-512 kernels (moekit/kernels/cpu/*.cpp), with every choice made once.

The extension is compiled once per machine with the system compiler
(``-march=native``, so AVX-512 BF16 where the CPU has it) and cached under
``~/.cache/moekit``. :class:`CpuKernels` fixes, when a model is built:

- few tokens (decode): moekit's streaming kernels for linear, MLP and the fused MoE layer;
- many tokens (prefill): dense projections and the LM head on ATen's GEMMs (oneDNN, which
  uses AMX tiles where the CPU has them); experts with many tokens on moekit's packed
  microkernel or on ATen's GEMMs, whichever a one-time measurement on this machine found
  faster (cached next to the compiled kernels, :func:`pick_gemm`);
- attention (contiguous or paged KV cache), RMSNorm, RoPE and routing on moekit's kernels;
- int8 / int4 weights (:class:`QuantWeight`, any token count) on moekit's low-bit kernels
  (``cpu/qgemm.h``): with few tokens the activations are quantised to int8 in 32-column blocks
  (llama.cpp's Q8_0; 256 against per-channel int8, as its Q8_K) and AVX-512 VNNI dot products stream
  the weight bytes (rearranged after loading into 16-row panels, ``cpu/qpanel.h``, ``cpu/qpanelg.h``,
  :meth:`CpuKernels.prepare_weights`). With many tokens, panels keep int8 activations (each weight load
  serves 8 tokens); of weights left in rows (shapes panels do not fit, offloaded experts), int4 and
  grouped int8 are unpacked 16 rows at a time into such panels (``cpu/qtile.h``) and per-channel int8
  dequantises weight tiles to bf16 (exactly the reference's weights) for the packed microkernel.

A call the kernels cannot take (autograd, float16, a non-contiguous weight) runs the plain
PyTorch reference, which is also their oracle in tests, and says so once (a warning).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from moekit.errors import MoekitError
from moekit.kernels import cpu_convert, reference
from moekit.kernels.weights import ExpertWeights, QuantWeight, Weight, quantized
from moekit.machine import OtherLoad, cpu_info

SOURCES = Path(__file__).with_name("cpu")
MAX_TOKENS = 32  # linear/mlp: beyond this, ATen's GEMMs (oneDNN / MKL) are faster than streaming
PAGED_ROW_MAX = 4  # paged attention: a request with more new tokens takes the flash path (ROW_MAX in paged.cpp)
MOE_CHUNK = 1024  # tokens per fused-kernel call: bounds its float32 scratch (tokens x top-k x width)
QLINEAR_CHUNK = 512  # tokens per quantised-linear call: bounds its float32 scratch (tokens x rows)
QDECODE_TOKENS = 16  # fewer tokens (per expert or linear call): int8 activations (QGEMM_MIN_TOKENS, qgemm.h)
DTYPES = (torch.bfloat16, torch.float32)


def supported() -> bool:
    """Whether this machine can use the C++ kernels (x86-64 Linux with AVX-512)."""
    return sys.platform.startswith("linux") and "avx512f" in cpu_info()["flags"]


def _build_dir() -> Path:
    files = sorted(SOURCES.glob("*.cpp")) + sorted(SOURCES.glob("*.h"))
    digest = hashlib.sha256(" ".join(sorted(cpu_info()["flags"])).encode() + torch.__version__.encode())
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    root = Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))
    return root / f"cpu-{digest.hexdigest()[:12]}"


@lru_cache(maxsize=1)
def extension():
    """Compile (first use only) and load the C++ kernels; raises if this machine cannot build them."""
    from torch.utils.cpp_extension import load

    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print("moekit: compiling CPU kernels for this machine (once, about 30 s)...", file=sys.stderr, flush=True)
    return load(name=f"moekit_cpu_{build.name[4:]}", sources=[str(f) for f in sorted(SOURCES.glob("*.cpp"))],
                build_directory=str(build), extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


GEMMS = ("moekit", "aten")  # the two ways to run an expert's many-token GEMMs


def _time_gemms(ext, dtype: torch.dtype) -> dict[str, float]:
    """Best seconds of one MoE layer over 256 tokens (8 experts of 512, top-2, d 1024: 64 tokens per
    expert) on each GEMM path, the paths interleaved; the best of several runs, because another busy
    process can only slow a run down, and this choice is cached for good."""
    g, cpu = torch.Generator().manual_seed(0), {"device": "cpu"}  # real tensors, also under a meta-device scope
    x = torch.randn(256, 1024, generator=g, **cpu).to(dtype)
    w13 = (torch.randn(8, 1024, 1024, generator=g, **cpu) * 0.02).to(dtype)
    w2 = (torch.randn(8, 1024, 512, generator=g, **cpu) * 0.02).to(dtype)
    ids = torch.stack([torch.arange(256, **cpu) % 8, (torch.arange(256, **cpu) + 3) % 8], 1)
    wts = torch.full((256, 2), 0.5, **cpu)
    runs = {name: [] for name in GEMMS}
    for _ in range(9):
        for name in GEMMS:
            t = time.perf_counter()
            ext.moe(x, w13, w2, ids, wts, aten=name == "aten")
            runs[name].append(time.perf_counter() - t)
    return {name: min(r[1:]) for name, r in runs.items()}  # the first round warms up


def pick_gemm(dtype: torch.dtype) -> dict:
    """Which GEMM runs experts with many tokens, measured once per machine, dtype and thread count.

    Returns {"gemm": "moekit" | "aten", "seconds": {...}}; cached as JSON beside the compiled
    kernels. ``MOEKIT_CPU_GEMM=moekit|aten`` overrides the measurement.
    """
    forced = os.environ.get("MOEKIT_CPU_GEMM")
    if forced:
        if forced not in GEMMS:
            raise MoekitError(f"MOEKIT_CPU_GEMM={forced!r}: use one of {', '.join(GEMMS)}")
        return {"gemm": forced, "seconds": {}, "source": "MOEKIT_CPU_GEMM"}
    name = str(dtype).removeprefix("torch.")
    cache = _build_dir() / f"gemm-{name}-{torch.get_num_threads()}threads.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    ext = extension()
    load = OtherLoad()
    secs = _time_gemms(ext, dtype)
    others = load.cores()
    choice = {"gemm": min(secs, key=secs.get), "seconds": secs, "source": "measured"}
    if others is not None and others > 0.25:  # a busy machine measures contention, not the kernels
        return {**choice, "source": f"measured while other processes kept {others:.1f} cores busy; not cached"}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(choice))
    tmp.replace(cache)
    return choice


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


def _unfit(*ts: torch.Tensor) -> str | None:
    """Why the C++ kernels cannot take these tensors (None when they can)."""
    x = ts[0]
    if x.device.type != "cpu":
        return f"{x.device.type} tensors"
    if any(t.dtype != x.dtype for t in ts) or x.dtype not in DTYPES:
        return f"dtypes {sorted({str(t.dtype) for t in ts})} (the kernels take one of bfloat16, float32)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return "autograd (tensors that require grad)"
    return None


def _unfit_weights(x: torch.Tensor, *ws: Weight, extra=()) -> str | None:
    """Why the C++ kernels cannot take activations ``x`` with these (plain or quantised) weights."""
    why = _unfit(x, *(w for w in ws if not isinstance(w, QuantWeight)), *extra)
    if why:
        return why
    for w in ws:
        parts = (w.data, w.scale) if isinstance(w, QuantWeight) else (w,)
        if isinstance(w, QuantWeight):
            K, G = w.shape[-1], w.scale.shape[-2 if w.scale.dim() == w.data.dim() + 1 else -1]  # panels: [.., G, 16]
            if w.device.type != "cpu":
                return f"{w.device.type} tensors"
            if w.scale.dtype != torch.float16 or w.data.dtype != (torch.int8 if w.format == "int8" and not w.panels
                                                                 else torch.uint8):
                return f"a {w.format} weight stored as {w.data.dtype} with {w.scale.dtype} scales"
            if G * w.group != K or (w.group % 32 and not (w.format == "int8" and w.group == K)):
                return f"a {w.format} weight of {K} columns with {G} scale groups (the kernels take groups of 32k)"
        if not all(t.is_contiguous() for t in parts):
            return "non-contiguous weight"
    return None


def _parts(w: Weight | None, name: str) -> dict:
    """Keyword arguments of the C++ kernels for one weight: the tensor, and its scales if quantised."""
    if isinstance(w, QuantWeight):
        return {name: w.data, f"{name}_scale": w.scale}
    return {name: w}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous rows along its last dimension (a KV-cache slice already has them). A fresh
    copy otherwise: ``.contiguous()`` keeps any stride of a size-1 dim (one key of a one-token forward)."""
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


class CpuKernels:
    """moekit's C++ kernels for a model of ``dtype``; the expert GEMM path is fixed here, once."""

    name = "cpu"

    def __init__(self, dtype: torch.dtype = torch.bfloat16, gemm: str | None = None):
        self.ext = extension()
        self.pick = {"gemm": gemm, "seconds": {}, "source": "argument"} if gemm else pick_gemm(dtype)
        if self.pick["gemm"] not in GEMMS:
            raise ValueError(f"gemm={self.pick['gemm']!r}: use one of {', '.join(GEMMS)}")
        self.aten = self.pick["gemm"] == "aten"
        self._said: set[tuple[str, str]] = set()

    def advise_weights(self, tensors) -> None:
        advise_weights(tensors)

    def prepare_weights(self, model) -> None:
        """int8 and int4 weights into the VNNI kernels' 16-row panels (QuantWeight.to_panels), where the CPU
        has VNNI. In-process A/B on this project's EPYC, 2 threads, against the row kernels:
        int8 on cached weights 1.2x at 1 token and 1.4-1.9x at 2-8, on weights streamed from memory
        0.95-1.2x (1.6x for 1024x448 at 8 tokens); int4 Mixtral-shaped engine decode batch 1 unchanged,
        batch 8 1.27x, prefill 1.14x (docs/quantization.md)."""
        if "avx512_vnni" in cpu_info()["flags"]:
            for m in model.modules():
                if isinstance(m, QuantWeight):
                    m.to_panels()

    def dequantize(self, raw: torch.Tensor, kind: str, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """GGUF blocks as float32 (cpu_convert.py)."""
        return cpu_convert.dequantize(self.ext, raw, kind, K, out)

    def quantize_into(self, w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                      dtype: torch.dtype | None = None) -> None:
        """Float weights into int8 / int4 (cpu_convert.py)."""
        cpu_convert.quantize_into(self.ext, w, data, scale, dtype)

    def fused_decoder(self, model):
        """(the whole-model decode step of ``model`` for the engine, or None, and why not): cpu_decode.py."""
        from moekit.kernels import cpu_decode

        return cpu_decode.build(model, self.aten)

    def paths(self) -> dict[str, str]:
        """What runs each op (for the load log and ``moekit info --kernels``)."""
        secs = self.pick.get("seconds") or {}
        why = (f"measured {secs['moekit'] * 1e3:.1f} vs {secs['aten'] * 1e3:.1f} ms" if len(secs) == 2
               else self.pick.get("source", ""))
        many = ("ATen GEMMs (oneDNN" + (", AMX" if "amx_bf16" in cpu_info()["flags"] else "") + ")"
                if self.aten else "moekit packed microkernel")
        tiles = "weight tiles dequantised for the packed microkernel"
        low = (f"int8 activations x VNNI dot products (int8 and int4 in 16-row panels; in rows, int4 and grouped "
               f"int8 from {QDECODE_TOKENS} tokens on: 16-row tiles unpacked into panels; per-channel int8 rows: < "
               f"{QDECODE_TOKENS} tokens, more: {tiles})" if "avx512_vnni" in cpu_info()["flags"] else tiles)
        return {"linear": f"moekit streaming (<= {MAX_TOKENS} tokens), ATen GEMM (more)",
                "int8 / int4 weights": f"moekit: {low}" + (", experts with >= 16 tokens: a dequantised copy on ATen "
                                                           "GEMMs" if self.aten else ""),
                "experts": f"moekit fused MoE; experts with >= 16 tokens: {many} [{why}]",
                "attention": "moekit (flash for many query tokens)",
                "paged_attention": f"moekit: row kernel over the block table (<= {PAGED_ROW_MAX} new tokens of a "
                                   "request), flash over gathered key blocks (more)",
                "rms_norm, rotary, route": "moekit",
                "loading": "moekit: int8 / int4 quantisation (quantize=), GGUF dequantisation of "
                           + ", ".join(sorted(cpu_convert.kinds(self.ext))) + " (gguf-py: other types)",
                "engine decode steps": "the whole forward in one C++ call (<= 32 requests; cpu_decode.py)"}

    def _fallback(self, op: str, reason: str):
        """Say once per (op, reason) that a call ran on the reference path."""
        if (op, reason) not in self._said:
            self._said.add((op, reason))
            warnings.warn(f"moekit: cpu kernel '{op}' ran on the plain PyTorch reference path: {reason}",
                          stacklevel=3)
        return getattr(reference, op)

    def linear(self, x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if quantized(w):
            return self._qlinear(x, x2, w, b)
        if x2.shape[0] > MAX_TOKENS:  # by design: ATen's GEMM (AMX where there is one)
            return reference.linear(x, w, b)
        why = _unfit(x2, w, *(() if b is None else (b,))) or (None if w.is_contiguous() else "non-contiguous weight")
        if why:
            return self._fallback("linear", why)(x, w, b)
        return self.ext.linear(x2.contiguous(), w, b).view(*x.shape[:-1], w.shape[0])

    def _qlinear(self, x: torch.Tensor, x2: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
        why = _unfit_weights(x2, w, extra=() if b is None else (b,))
        if why:
            return self._fallback("linear", why)(x, w, b)
        x2 = x2.contiguous()
        out = [self.ext.qlinear(x2[t:t + QLINEAR_CHUNK], w.data, w.scale, b)
               for t in range(0, max(x2.shape[0], 1), QLINEAR_CHUNK)]
        return (out[0] if len(out) == 1 else torch.cat(out)).view(*x.shape[:-1], w.shape[0])

    def silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2 and not _unfit(h):
            return self.ext.silu_mul(h.contiguous())
        return reference.silu_mul(h)

    def mlp(self, x: torch.Tensor, w13: Weight, w2: Weight) -> torch.Tensor:
        if quantized(w13, w2):  # any token count: dequantised weight tiles beat a whole dequantised copy
            why = _unfit_weights(x, w13, w2)
            if why:
                return self._fallback("mlp", why)(x, w13, w2)
            return self.ext.mlp(x.contiguous(), **_parts(w13, "w13"), **_parts(w2, "w2"))
        if x.shape[0] > MAX_TOKENS:
            return reference.mlp(x, w13, w2, act=self.silu_mul)
        why = _unfit(x, w13, w2) or (None if w13.is_contiguous() and w2.is_contiguous() else "non-contiguous weight")
        if why:
            return self._fallback("mlp", why)(x, w13, w2)
        return self.ext.mlp(x.contiguous(), w13, w2)

    def moe_experts(self, x_TD, experts: ExpertWeights, ids_TK, weights_TK) -> torch.Tensor:
        why = _unfit_weights(x_TD, *experts.tensors())
        if why:
            return self._fallback("moe_experts", why)(x_TD, experts, ids_TK, weights_TK)
        gate = experts.shared_gate_T
        weights = {**_parts(experts.w13, "w13"), **_parts(experts.w2, "w2")}
        if experts.has_shared:
            weights.update(**_parts(experts.shared_w13, "shared_w13"), **_parts(experts.shared_w2, "shared_w2"))
        out = []
        for t0 in range(0, x_TD.shape[0], MOE_CHUNK):
            part = slice(t0, t0 + MOE_CHUNK)
            out.append(self.ext.moe(x_TD[part].contiguous(), ids=ids_TK[part].contiguous(),
                                    weights=weights_TK[part].float().contiguous(),
                                    shared_weights=None if gate is None else gate[part].float().contiguous(),
                                    aten=self.aten, **weights))
        return out[0] if len(out) == 1 else torch.cat(out)

    def route(self, logits_TE, k, score_func="softmax", renormalize=True, eps=0.0, bias_E=None):
        if logits_TE.device.type != "cpu" or (torch.is_grad_enabled() and logits_TE.requires_grad):
            return self._fallback("route", _unfit(logits_TE) or "cpu tensors")(
                logits_TE, k, score_func, renormalize, eps, bias_E)
        bias = None if bias_E is None else bias_E.float().contiguous()
        return self.ext.route(logits_TE.float().contiguous(), k, score_func == "softmax", renormalize, eps, 1.0, bias)

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        why = _unfit(x, w) or (None if w.is_contiguous() else "non-contiguous weight")
        if why:
            return self._fallback("rms_norm", why)(x, w, eps)
        return self.ext.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), w, eps).view(x.shape)

    def rotary(self, x_BNTA: torch.Tensor, cos_BTA: torch.Tensor, sin_BTA: torch.Tensor) -> torch.Tensor:
        why = _unfit(x_BNTA, cos_BTA, sin_BTA)
        if why:
            return self._fallback("rotary", why)(x_BNTA, cos_BTA, sin_BTA)
        return self.ext.rotary(x_BNTA.contiguous(), cos_BTA.contiguous(), sin_BTA.contiguous())

    def paged_attention(self, q_NHA, k_PGCA, v_PGCA, table_RM, starts_R1, lens_R, scale=None) -> torch.Tensor:
        """Attention over a paged KV cache (see :func:`moekit.kernels.reference.paged_attention`): a row
        kernel reading the cache in place for requests with a few new tokens, flash for longer chunks."""
        A = q_NHA.shape[-1]
        unfit = ((A % 16, f"head width {A} is not a multiple of 16"),
                 (k_PGCA.stride(-1) != 1 or v_PGCA.stride(-1) != 1, "a KV pool without contiguous rows"))
        why = _unfit(q_NHA, k_PGCA, v_PGCA) or next((w for bad, w in unfit if bad), None)
        if why:
            return self._fallback("paged_attention", why)(q_NHA, k_PGCA, v_PGCA, table_RM, starts_R1, lens_R, scale)
        ints = [t.to("cpu", torch.int32).contiguous() for t in (table_RM, starts_R1, lens_R)]
        q = q_NHA if q_NHA.stride(-1) == 1 else q_NHA.contiguous()
        return self.ext.paged_attention(q, k_PGCA, v_PGCA, *ints, A ** -0.5 if scale is None else scale)

    def attention(self, q_BHTA, k_BGSA, v_BGSA, mask_BTS=None) -> torch.Tensor:
        """Any number of query tokens: a row kernel for a few, blocked (flash) attention for many."""
        why = _unfit(q_BHTA, k_BGSA, v_BGSA) or (None if q_BHTA.shape[-1] % 16 == 0 else
                                                 f"head width {q_BHTA.shape[-1]} is not a multiple of 16")
        if why:
            return self._fallback("attention", why)(q_BHTA, k_BGSA, v_BGSA, mask_BTS)
        mask = None if mask_BTS is None else mask_BTS.contiguous()
        return self.ext.attention(q_BHTA.contiguous(), _rows(k_BGSA), _rows(v_BGSA), mask, q_BHTA.shape[-1] ** -0.5)
