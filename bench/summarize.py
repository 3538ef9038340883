"""Median over repeated runs of bench/cpu_generate.py, as the table in BENCHMARKS.md.

    python bench/summarize.py bench/results/cpu_generate_bf16_run*.json

This machine's memory bandwidth drifts during and between runs, so single runs swing by
10-30%; the medians of ratios and floor percentages over several runs are what we quote.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

NAMES = {"decode_b1": "decode, batch 1", "decode_b8": "decode, batch 8", "prefill": "prefill, 512 tokens",
         "decode_b1_contended": "decode, batch 1, one core busy"}
TARGETS = {"decode_b1": (1.5, 70.0), "decode_b8": (2.0, None), "prefill": (1.2, None),
           "decode_b1_contended": (1.3, None)}


def summarize(paths: list[Path]) -> str:
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]
    isa = f" ({' '.join(first['isa'])})" if first.get("isa") else ""
    lines = [f"{len(runs)} runs, {first['date']}, {first['machine']}{isa}, "
             f"torch {first['torch']}, "
             f"transformers {first['transformers']}, {first['dtype']}", "",
             "| model | metric | moekit tok/s | transformers tok/s | ratio (median, range) | moekit % floor "
             "| transformers % floor | target |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape in first["shapes"]:
        for metric in NAMES:
            if any(metric not in r["shapes"][shape]["metrics"] for r in runs):
                continue  # runs from before the metric existed
            rows = [r["shapes"][shape]["metrics"][metric] for r in runs]
            ratio = [r["ratio"] for r in rows]
            med = statistics.median
            pct = ("", "")
            if "moekit_pct_floor" in rows[0]:
                pct = (f"{med(r['moekit_pct_floor'] for r in rows):.0f}%",
                       f"{med(r['transformers_pct_floor'] for r in rows):.0f}%")
            want_ratio, want_pct = TARGETS[metric]
            target = f">= {want_ratio}x" + (f", >= {want_pct:.0f}% floor" if want_pct else "")
            lines.append(f"| {shape} | {NAMES[metric]} | {med(r['moekit'] for r in rows):.1f} | "
                         f"{med(r['transformers'] for r in rows):.1f} | {med(ratio):.2f}x "
                         f"({min(ratio):.2f}-{max(ratio):.2f}) | {pct[0]} | {pct[1]} | {target} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize([Path(p) for p in sys.argv[1:]]))
