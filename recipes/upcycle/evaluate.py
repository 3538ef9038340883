"""Held-out loss of the dense, upcycled and continually pretrained models of recipes/upcycle/run.sh.

    python recipes/upcycle/evaluate.py [--runs runs/upcycle] [--methods random cluster] [--windows 64]

Every model is scored in float32 on the same held-out KJV windows (the split the trainer
holds out, read through the trainer's own data code), and the table of docs/upcycling.md
is printed and written to RUNS/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def heldout_windows(model, n: int) -> torch.Tensor:
    from moekit.train import load_config
    from moekit.train.build import build_streams

    cfg = load_config(ROOT / "recipes/upcycle/dense.yaml")
    _, heldout = build_streams(cfg.data, cfg.tokenizer, model, seed=0, progress=False)
    stream = heldout["kjv"]
    n = min(n, stream.windows)
    return torch.stack([torch.as_tensor(stream.window(i)[0]) for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/upcycle")
    ap.add_argument("--methods", nargs="+", default=["random", "cluster"])
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    import moekit
    from moekit.upcycle import lm_loss

    R = args.runs
    dense = moekit.load(R / "dense/model", dtype=torch.float32)
    win = heldout_windows(dense, args.windows)
    rows = [("dense (pretrained)", R / "dense/model"), ("dense + continued pretraining", R / "dense-cpt/model")]
    for m in args.methods:
        rows += [(f"{m}: upcycled, before training", R / f"{m}/init"),
                 (f"{m}: upcycled + continued pretraining", R / f"{m}/cpt/model")]
    results = []
    for label, path in rows:
        if not (path / "config.json").is_file():
            print(f"skipping {label}: {path} has no model", file=sys.stderr)
            continue
        model = dense if path == R / "dense/model" else moekit.load(path, dtype=torch.float32)
        total, active = moekit.count_params(model.config)
        results.append({"model": label, "path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                        "loss": lm_loss(model, win, progress=True, desc=label), "params": total, "active": active})
    base = results[0]["loss"]
    lines = [f"Held-out loss on {len(win)} KJV windows of {win.shape[1] - 1} tokens (nats/token, float32):", "",
             "| model | params (active) | held-out loss | gap to dense | gap recovered |", "| --- | --- | --- | --- | --- |"]
    before = {}
    for r in results:
        method = r["model"].split(":")[0]
        if r["model"].endswith("before training"):
            before[method] = r["loss"]
        rec = ""
        if r["model"].endswith("continued pretraining") and method in before and before[method] > base:
            rec = f"{(before[method] - r['loss']) / (before[method] - base):.0%}"
            r["gap_recovered"] = (before[method] - r["loss"]) / (before[method] - base)
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {r['loss']:.4f} | "
                     f"{r['loss'] - base:+.4f} | {rec} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (R / "results.md").write_text(text)
    (R / "results.json").write_text(json.dumps({"windows": len(win), "seq_len": win.shape[1] - 1,
                                                "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
