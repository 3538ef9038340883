"""The engine's own cost per decode step: this checkout's Engine against an earlier commit's, same checkpoint.

    python bench/engine_step_cost.py                  # against 728f105 (the fixed-batch engine before issue 15)
    python bench/engine_step_cost.py --before <commit> --rounds 3

The earlier commit is checked out into a temporary git worktree; each side runs in its own
process (its own moekit, its own compiled kernels), alternately, ``--rounds`` times. A side
generates 64 greedy tokens at batch 1 after a 32-token prompt on the Mixtral-shaped 742M model
(bf16, 2 threads, no thread governor) and reports (time(1 + 63 tokens) - time(1 token)) / 63,
best of 3, in ms per step.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIDE = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import moekit
from moekit.engine import Engine, SamplingParams
torch.set_num_threads(2)
model = moekit.load(sys.argv[2], dtype=torch.bfloat16)
engine = Engine(model, eos_token_ids=(), adapt_threads=False)
prompt, full, one = list(range(1, 33)), SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True), \
    SamplingParams(max_new_tokens=1, temperature=0)
engine.generate([prompt], full)
best = float("inf")
for _ in range(3):
    t = time.perf_counter(); engine.generate([prompt], full); t1 = time.perf_counter() - t
    t = time.perf_counter(); engine.generate([prompt], one); t0 = time.perf_counter() - t
    best = min(best, (t1 - t0) / 63 * 1e3)
print(f"{best:.2f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="728f105")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from cpu_generate import SHAPES, write_checkpoint

    from moekit.machine import cpu_info

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, old = Path(tmp) / "mixtral", Path(tmp) / "before"
        write_checkpoint(SHAPES["mixtral"], torch.bfloat16, ckpt)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.before], check=True)
        try:
            times = {args.before: [], "this checkout": []}
            for _ in range(args.rounds):
                for name, src in ((args.before, old), ("this checkout", ROOT)):
                    out = subprocess.run([sys.executable, "-c", SIDE, str(src), str(ckpt)], check=True,
                                         capture_output=True, text=True).stdout
                    times[name].append(float(out.split()[-1]))
                    print(f"{name}: {times[name][-1]:.2f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(f"\n{cpu_info()['model']}, decode at batch 1, Mixtral-shaped 742M bf16, 2 threads, best of 3 per round:")
    for name, ts in times.items():
        print(f"- {name}: {min(ts):.2f}-{max(ts):.2f} ms/step over {len(ts)} rounds")


if __name__ == "__main__":
    main()
