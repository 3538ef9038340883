"""The serving benchmark's workload (a seeded Poisson stream of requests) and what a contender did with it
(per-token times), shared by bench/cpu_engine.py and its peers' drivers."""

from __future__ import annotations

import itertools
import math
import random
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm


@dataclass
class Workload:
    prompts: list[list[int]]
    max_new: list[int]
    arrivals: list[float]  # seconds after the run starts
    vocab: int


def make_workload(n: int, rate: float, seed: int, vocab: int, prompt_range=(32, 2048), output_range=(16, 256)
                  ) -> Workload:
    rng = random.Random(seed)
    lo, hi = map(math.log, prompt_range)
    lens = [round(math.exp(rng.uniform(lo, hi))) for _ in range(n)]
    prompts = [[rng.randrange(3, vocab) for _ in range(k)] for k in lens]
    max_new = [rng.randint(*output_range) for _ in range(n)]
    t, arrivals = 0.0, []
    for _ in range(n):
        arrivals.append(t)  # the first request arrives at 0
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    return Workload(prompts, max_new, arrivals, vocab)


@dataclass
class Trace:
    """What one contender did: per request, each token's id and time (seconds after the run started)."""

    name: str
    arrivals: list[float]
    times: list[list[float]]
    tokens: list[list[int]]
    wall: float = 0.0
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        ttft = [t[0] - a for t, a in zip(self.times, self.arrivals)]
        itl = [b - a for t in self.times for a, b in itertools.pairwise(t)]
        n_out = sum(map(len, self.tokens))
        makespan = max(t[-1] for t in self.times) - min(self.arrivals)
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")
        return {"output_tokens": n_out, "makespan_s": makespan, "output_tok_s": n_out / makespan,
                "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99), "wall_s": self.wall,
                **self.extra}


def new_trace(name: str, wl: Workload) -> Trace:
    n = len(wl.prompts)
    return Trace(name, list(wl.arrivals), [[] for _ in range(n)], [[] for _ in range(n)])


def progress(name: str, wl: Workload, unit: str = "tok"):
    total = sum(wl.max_new) if unit == "tok" else len(wl.prompts)
    return tqdm(total=total, desc=name, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def warmup_prompts(wl: Workload) -> list[list[int]]:
    """Prompts for a few untimed requests (first calls of ops at new shapes are slow): random tokens of their
    own, so that no prefix cache meets the workload's prompts in them."""
    rng = random.Random(-1)
    lens = sorted(map(len, wl.prompts))
    return [[rng.randrange(3, wl.vocab) for _ in range(k)] for k in (16, lens[len(lens) // 2], min(lens[-1], 1200))]
