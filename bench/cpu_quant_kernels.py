"""One MoE layer with bf16, int8 and int4 weights on moekit's CPU kernels, against a plain memory read.

    python bench/cpu_quant_kernels.py                 # 2 threads, bf16 activations
    python bench/cpu_quant_kernels.py --tokens 1 8     # decode only

The Mixtral bench shape (d 1024, 8 experts of 3584, top-2) and the XVERSE shape (d 2560, 64 experts
of 1728, top-6, one shared expert of 2 x 1728) at 1, 8 and 512 tokens. Each timed step runs every
layer of a small stack once (several layers, so that the weights cannot stay in the last-level cache
between steps, as in a model) with fresh random routing per step; contenders alternate and the
best of N steps counts, because another busy process can only slow a step down. GB/s counts the
weight bytes the step touches (the selected experts' data and scales, and the shared expert); the
floor is torch.sum over 256 MB of float32 on the same threads. Weights are random (speed only).

``--int-mm`` adds the probe behind the prefill choice: ATen's bf16 GEMM against ``torch._int_mm``
(int8 x int8 -> int32, oneDNN; AMX where the CPU has it) at an expert's prefill shapes, GEMM only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit.kernels import cpu  # noqa: E402
from moekit.kernels.weights import ExpertWeights, QuantWeight  # noqa: E402
from moekit.machine import cpu_info  # noqa: E402

# name: (D, F, E, K, shared width, layers)
SHAPES = {"mixtral": (1024, 3584, 8, 2, 0, 4), "xverse": (2560, 1728, 64, 6, 3456, 2)}
# int8: one scale per output channel (moekit quantize's default), and groups of 32 (a GGUF Q8_0 file kept as int8);
# int4: groups of 32 (GGUF Q4_0) and 64 (the default); "rows": left in the row layout (as an offloaded expert is)
FORMATS = {"bf16": None, "int8": ("int8", None), "int8-g32": ("int8", 32), "int4": ("int4", 32),
           "int4-g64": ("int4", 64), "int8-g32-rows": ("int8", 32, "rows"), "int4-rows": ("int4", 32, "rows")}


def weight(shape, fmt, g: torch.Generator):
    """A random weight [.., N, K]: bf16, or a QuantWeight with random values and scales."""
    if fmt is None:
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()
    w = QuantWeight(fmt[0], shape, fmt[1])
    w.data.copy_(torch.randint(-127, 128, w.data.shape, generator=g, dtype=torch.int16).to(w.data.dtype))
    w.scale.copy_(torch.rand(w.scale.shape, generator=g) * 1e-3 + 1e-4)
    if "avx512_vnni" in cpu_info()["flags"] and fmt[2:] != ("rows",):
        w.to_panels()  # as CpuKernels.prepare_weights does for a model's weights
    return w


def nbytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in ((w.data, w.scale) if isinstance(w, QuantWeight) else (w,)))


def layer(D, F, E, Fs, fmt, g) -> ExpertWeights:
    shared = (weight((2 * Fs, D), fmt, g), weight((D, Fs), fmt, g), None) if Fs else ()
    return ExpertWeights(weight((E, 2 * F, D), fmt, g), weight((E, D, F), fmt, g), *shared)


def touched(ex: ExpertWeights, ids: torch.Tensor) -> int:
    """Weight bytes a call reads: the distinct selected experts plus the shared expert."""
    E = ex.num_experts
    per = (nbytes(ex.w13) + nbytes(ex.w2)) // E
    shared = nbytes(ex.shared_w13) + nbytes(ex.shared_w2) if ex.has_shared else 0
    return ids.unique().numel() * per + shared


def floor_gbs(runs: int) -> float:
    x = torch.ones(64 << 20)  # 256 MiB of float32
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def int_mm_probe(runs: int) -> None:
    """GFLOP/s of a Mixtral expert's gate+up GEMM (1024 -> 7168) at prefill token counts."""
    g = torch.Generator().manual_seed(1)
    print("\n| GEMM [tokens x 1024] x [1024 x 7168] | tokens | bf16 at::mm GFLOP/s | torch._int_mm GOP/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    w8 = torch.randint(-127, 128, (7168, 1024), generator=g, dtype=torch.int8)
    wb = w8.bfloat16()
    for T in (128, 512):
        x8 = torch.randint(-127, 128, (T, 1024), generator=g, dtype=torch.int8)
        xb = x8.bfloat16()
        best = {"bf16": float("inf"), "int": float("inf")}
        for _ in range(runs):
            for name, fn in (("bf16", lambda: xb @ wb.t()), ("int", lambda: torch._int_mm(x8, w8.t()))):
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        flops = 2 * T * 1024 * 7168 / 1e9
        print(f"| expert gate+up | {T} | {flops / best['bf16']:.0f} | {flops / best['int']:.0f} "
              f"| {best['bf16'] / best['int']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--runs", type=int, default=15, help="timed steps per contender (best counts)")
    ap.add_argument("--gemm", choices=cpu.GEMMS, default=None, help="many-token expert GEMMs (default: measured pick)")
    ap.add_argument("--int-mm", action="store_true", help="also probe torch._int_mm against the bf16 GEMM")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kern = cpu.CpuKernels(torch.bfloat16, gemm=args.gemm)
    g = torch.Generator().manual_seed(0)
    floor = floor_gbs(10)
    print(f"{cpu_info()['model']}, {args.threads} threads, many-token GEMMs: {kern.pick['gemm']}; "
          f"floor (torch.sum of 256 MB float32): {floor:.1f} GB/s\n")
    print("| shape | tokens | format | step (ms) | weight MB read | GB/s | % of floor | speedup vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.shapes:
        D, F, E, K, Fs, L = SHAPES[name]
        stacks = {f: [layer(D, F, E, Fs, spec, g) for _ in range(L)] for f, spec in FORMATS.items()}
        for T in args.tokens:
            x = torch.randn(T, D, generator=g).bfloat16()
            wts = torch.full((T, K), 1.0 / K)
            best = {f: (float("inf"), 0) for f in FORMATS}
            with torch.no_grad():
                for _ in range(args.runs + 1):  # the first round warms up
                    ids = [torch.rand(T, E, generator=g).topk(K, dim=-1).indices for _ in range(L)]
                    for f, layers in stacks.items():
                        t = time.perf_counter()
                        for ex, i in zip(layers, ids):
                            kern.moe_experts(x, ex, i, wts)
                        dt = (time.perf_counter() - t) / L
                        read = sum(touched(ex, i) for ex, i in zip(layers, ids)) / L
                        if dt < best[f][0]:
                            best[f] = (dt, read)
            for f, (dt, read) in best.items():
                gbs = read / dt / 1e9
                print(f"| {name} | {T} | {f} | {dt * 1e3:.2f} | {read / 1e6:.1f} | {gbs:.1f} "
                      f"| {100 * gbs / floor:.0f}% | {best['bf16'][0] / dt:.2f}x |")
        del stacks
    if args.int_mm:
        int_mm_probe(args.runs)


if __name__ == "__main__":
    main()
