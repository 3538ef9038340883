"""Where moekit's CPU prefill time goes: each kernel op's share of one forward pass.

    python bench/cpu_prefill_profile.py --shape mixtral      # 512 tokens, bfloat16, 2 threads

Loads the random-weight checkpoint of ``bench/cpu_generate.py`` (same shapes), wraps every
function of the model's kernel backend in a timer, and reports the best of 3 forwards
(last-position logits) with each op's milliseconds; "other" is the rest (embedding, residual
adds, reshapes).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_generate as cg  # noqa: E402

import moekit  # noqa: E402

OPS = ("linear", "moe_experts", "rms_norm", "attention", "rotary", "route", "mlp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral", choices=sorted(cg.SHAPES))
    ap.add_argument("--tokens", type=int, default=cg.PREFILL)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spent: dict[str, float] = collections.defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp:
        cg.write_checkpoint(cg.SHAPES[args.shape], torch.bfloat16, Path(tmp))
        model = moekit.load(tmp, dtype=torch.bfloat16)
    for op in OPS:
        def timed(*a, _fn=getattr(model.kernels, op), _op=op, **kw):
            t = time.perf_counter()
            out = _fn(*a, **kw)
            spent[_op] += time.perf_counter() - t
            return out
        setattr(model.kernels, op, timed)
    ids = torch.tensor(cg.prompts(1, args.tokens, 99))
    best, split = float("inf"), {}
    with torch.inference_mode():
        for i in range(5):
            spent.clear()
            t = time.perf_counter()
            model(ids, last_only=True)
            total = time.perf_counter() - t
            if i >= 2 and total < best:  # two warm-up passes
                best, split = total, dict(spent)
    print(f"{args.shape}, {args.tokens} tokens, kernels {model.kernels.name}: {best * 1e3:.1f} ms "
          f"({args.tokens / best:.0f} tok/s)")
    split["other"] = best - sum(split.values())
    for op, sec in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {op:12s} {sec * 1e3:7.1f} ms  {100 * sec / best:4.1f}%")


if __name__ == "__main__":
    main()
