"""Single-stream decode on the CPU: which thread runs the engine, and how close the expert kernel is to a plain read.

    python bench/cpu_threads.py          # the bench/serve.py checkpoint (built by bench/serve_setup.py), 2 threads

1. Engine decode (128-token prompt, 64 new tokens, greedy) from the main thread, then from a second
   thread while the main thread's OpenMP team (made while loading) still exists: the arrangement
   ``moekit serve`` had before ``AsyncEngine.run_here``. libgomp throttles its spinning once there are
   more OpenMP threads than cores, and every parallel region then pays a wake-up.
2. The same for one 1024 x 1024 bf16 GEMV (moekit's linear kernel), median of 200.
3. The MoE expert kernel for one token (two of the 8 Mixtral-shape experts, rotating so the weights
   come from memory) in GB/s of expert weights read, against a plain read of a 256 MB tensor
   (``torch.sum``) with the same threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import moekit  # noqa: E402
from moekit.engine import SamplingParams  # noqa: E402
from moekit.kernels import get_backend  # noqa: E402
from moekit.kernels.weights import ExpertWeights  # noqa: E402


def decode_rate(engine, rounds: int = 3) -> float:
    ids, best = list(range(100, 228)), 0.0
    for _ in range(rounds):
        stamps = [time.perf_counter() for _ in engine.stream([ids], SamplingParams(max_new_tokens=64, temperature=0,
                                                                                   ignore_eos=True))]
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return best


def median_us(fn, n: int = 200) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moekit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import serve_setup

    lm = moekit.CausalLM.from_pretrained(serve_setup.checkpoint(args.cache), dtype="bfloat16")
    k = get_backend("cpu")
    W = (torch.randn(1024, 1024) * 0.02).bfloat16()
    x = torch.randn(1, 1024).bfloat16()
    main_rate, main_gemv = decode_rate(lm.engine), median_us(lambda: k.linear(x, W))
    side_rate, side_gemv = in_thread(lambda: decode_rate(lm.engine)), in_thread(lambda: median_us(lambda: k.linear(x, W)))
    print(f"decode from the main thread   {main_rate:6.1f} tok/s; 1024x1024 GEMV {main_gemv:6.1f} us")
    print(f"decode from a second thread   {side_rate:6.1f} tok/s; 1024x1024 GEMV {side_gemv:6.1f} us")

    E, D, F = 8, 1024, 3584
    w13, w2 = (torch.randn(E, 2 * F, D) * 0.02).bfloat16(), (torch.randn(E, D, F) * 0.02).bfloat16()
    turn = iter(range(10**9))

    def moe():
        a = next(turn) % (E // 2)
        k.moe_experts(x, ExpertWeights(w13, w2), torch.tensor([[2 * a, 2 * a + 1]]), torch.tensor([[0.5, 0.5]]))

    moe_gbs = 2 * 3 * D * F * 2 / (median_us(moe, 50) * 1e-6) / 1e9
    a = torch.randn(64 << 20)  # 256 MB, written so its pages are real
    read_gbs = a.numel() * 4 / (median_us(lambda: a.sum(), 10) * 1e-6) / 1e9
    print(f"MoE experts, one token        {moe_gbs:6.1f} GB/s of expert weights; plain read (torch.sum) {read_gbs:.1f} GB/s")


if __name__ == "__main__":
    main()
