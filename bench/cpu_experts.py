"""The many-token expert GEMMs on their own: moekit's packed microkernel against ATen's (oneDNN) GEMMs.

    python bench/cpu_experts.py            # 2 threads, bfloat16

One expert (gate+up, SwiGLU, down) over T tokens at the Mixtral and XVERSE benchmark shapes,
through moekit's fused MoE call on each GEMM path (``aten=False`` / ``aten=True``; the latter is
the per-expert oneDNN GEMM that transformers' eager experts run), next to a large square oneDNN
GEMM as this machine's practical bf16 peak. Best of 10 runs, GFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit.kernels import cpu  # noqa: E402
from moekit.machine import cpu_info  # noqa: E402

SHAPES = [("mixtral", 128, 1024, 3584), ("mixtral", 512, 1024, 3584), ("xverse", 48, 1024, 448)]


def best(fn, runs: int = 10) -> float:
    fn()
    out = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext, g = cpu.extension(), torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 4096, generator=g).bfloat16(), torch.randn(4096, 4096, generator=g).bfloat16()
    peak = 2 * 2048 * 4096 * 4096 / best(lambda: a @ b.T, 3) / 1e9
    print(f"{cpu_info()['model']}, {args.threads} threads; oneDNN 2048x4096x4096 bf16 GEMM: {peak:.0f} GFLOP/s")
    print("| shape | tokens | moekit GFLOP/s | ATen GFLOP/s | moekit / ATen |\n| --- | --- | --- | --- | --- |")
    for name, T, D, F in SHAPES:
        x = torch.randn(T, D, generator=g).bfloat16()
        w13 = (torch.randn(1, 2 * F, D, generator=g) * 0.02).bfloat16()
        w2 = (torch.randn(1, D, F, generator=g) * 0.02).bfloat16()
        ids, w = torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1)
        flops = 2 * 3 * D * F * T
        ours, aten = (flops / best(lambda: ext.moe(x, w13, w2, ids, w, aten=p)) / 1e9 for p in (False, True))
        print(f"| {name} (d {D}, expert {F}) | {T} | {ours:.0f} | {aten:.0f} | {ours / aten:.2f}x |")


if __name__ == "__main__":
    main()
