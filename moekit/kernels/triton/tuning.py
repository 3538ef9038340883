"""Autotuning shared by the GEMM kernels: a short config list per kernel, timed briefly, no tuning files.

The first call at a new key times every config of the list (``triton.autotune``); the
choice is kept in memory and in Triton's own cache directory (``cache_results``), never
in the repository. Under the interpreter, or when a test fixes the tiles, one config runs.
"""

from __future__ import annotations

import triton
import triton.testing

from moekit.kernels.triton.interpret import interpreted


def quick_bench(kernel_call, quantiles):
    """Triton's timer with a short warm-up and repeat window (the defaults spend 125 ms per config)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotuned(kernel, configs: list, key: list[str]):
    return triton.autotune(configs, key=key, do_bench=quick_bench, cache_results=True)(kernel)


def pick(plain, tuned, config: dict | None, small: dict):
    """(kernel, extra meta): ``config`` when given, ``small`` under the interpreter, else the autotuner."""
    if config is not None:
        return plain, config
    if interpreted(plain):
        return plain, small
    return tuned, {}
