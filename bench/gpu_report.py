"""Floors and tables for bench/gpu.py: pure arithmetic and formatting, no GPU (tested in tests/test_bench_gpu.py).

Conventions (as in /work/shared/reference/performance.md sections 7 and 10):
- bandwidth: a large device copy, bytes read + written per second;
- compute: a bf16 matmul's FLOP/s;
- decode floor: bytes one step must read (weights of every touched expert once, the
  other weights, one embedding row per sequence, the KV cache) / bandwidth;
- prefill floor: FLOPs of the forward pass (last-position logits only) / matmul rate;
- MoE block floor: max(bytes of the experts used / bandwidth, FLOPs / matmul rate).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from moekit.config import ModelConfig, count_params


def expected_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts per layer for ``batch`` tokens routed uniformly at random."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_bytes(cfg: ModelConfig, batch: int, context: int, elt: int = 2) -> float:
    """Bytes one decode step reads: every touched expert once, other weights, ``batch`` embedding rows, KV."""
    _, active = count_params(cfg)
    m = cfg.moe
    per_expert = 3 * cfg.hidden_size * m.max_width(0)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    weights = (active - moe_layers * m.top_k * per_expert
               + moe_layers * expected_touched(m.num_experts, m.top_k, batch) * per_expert
               - (cfg.vocab_size - batch) * cfg.hidden_size)
    kv = batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * context
    return (weights + kv) * elt


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    """FLOPs of one forward pass over ``tokens`` (causal attention, last-position logits only)."""
    _, active = count_params(cfg)
    vd = cfg.vocab_size * cfg.hidden_size
    matmuls = 2 * tokens * (active - 2 * vd) + 2 * vd  # embedding lookup is free; lm_head on one position
    attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * tokens  # QK^T and PV, causal half
    return matmuls + attention


def block_floor_s(D: int, F: int, E: int, K: int, Fs: int, tokens: int, touched: int, bw: float, peak: float,
                  elt: int = 2) -> float:
    """Seconds one MoE block needs at least: reading the touched experts (+ shared, router) or its FLOPs."""
    weights = touched * 3 * D * F + 3 * D * Fs + D * E
    flops = 2 * tokens * (K * 3 * D * F + 3 * D * Fs + D * E)
    return max(weights * elt / bw, flops / peak)


def pct(x: float | None, floor: float | None) -> str:
    return "" if x is None or not floor else f"{100 * x / floor:.0f}%"


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def markdown(r: dict) -> str:
    """The tables BENCHMARKS.md takes: whole model, then one MoE block per shape."""
    d, p = r["device"], r.get("probes", {})
    lines = [f"{r['date']}, {d.get('gpu')}, driver {d.get('driver')}, CUDA {d.get('cuda')}, torch {d.get('torch')}, "
             f"triton {d.get('triton')}, transformers {d.get('transformers')}.",
             f"Probes in this run: copy {fmt(p.get('copy_tbs'), 2)} TB/s (read + write), bf16 matmul "
             f"{fmt(p.get('matmul_tflops'), 0)} TFLOP/s. Command: `{r['command']}`", ""]
    m = r.get("model")
    if m:
        lines += [f"Whole model: {m['name']} ({m['params'] / 1e9:.2f}B parameters, {m['active'] / 1e9:.2f}B active, "
                  f"{m['layers']} layers), random bf16 weights; transformers runs {m['hf_class']}.", "",
                  "| metric | moekit | % floor | transformers (best path) | % floor | moekit / transformers | floor |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, floor in m["floors"].items():
            label = (f"decode, batch {key[len('decode_b'):]} (tok/s)" if key.startswith("decode_b")
                     else f"prefill, {m.get('prefill_tokens')} tokens (tok/s)")
            ours = m["moekit"].get(key)
            theirs = m.get("transformers", {}).get(key) or {}
            best = max(theirs.items(), key=lambda kv: kv[1] or 0, default=(None, None))
            ratio = f"{ours / best[1]:.2f}x" if ours and best[1] else ""
            who = f" ({best[0]})" if best[0] else ""
            lines.append(f"| {label} | {fmt(ours)} | {pct(ours, floor)} | {fmt(best[1])}{who} | "
                         f"{pct(best[1], floor)} | {ratio} | {fmt(floor, 0)} |")
        lines.append("")
    for shape, rows in r.get("block", {}).items():
        check = next((row for row in rows if "max_rel_diff_vs_transformers" in row), None)
        agree = ("" if check is None else f" Same weights in both; outputs at {check['tokens']} tokens differ by "
                 f"{check['max_rel_diff_vs_transformers']:.1e} (max abs difference / max abs value, bf16).")
        lines += [f"One MoE block, {shape} shape ({rows[0]['shape_text']}), milliseconds.{agree}", "",
                  "| tokens | moekit | path | decode path | grouped path | transformers best | floor | "
                  "moekit % floor | moekit / transformers |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            hf = {k: v for k, v in row["hf_ms"].items() if v is not None}
            best = min(hf.items(), key=lambda kv: kv[1], default=(None, None))
            speed = f"{best[1] / row['moekit_ms']:.2f}x" if best[1] and row["moekit_ms"] else ""
            lines.append(f"| {row['tokens']} | {fmt(row['moekit_ms'], 3)} | {row['path']} | "
                         f"{fmt(row.get('decode_ms'), 3)} | {fmt(row.get('grouped_ms'), 3)} | "
                         f"{fmt(best[1], 3)}{f' ({best[0]})' if best[0] else ''} | {fmt(row['floor_ms'], 3)} | "
                         f"{pct(row['floor_ms'], row['moekit_ms'])} | {speed} |")
        lines.append("")
    if r.get("errors"):
        lines += ["Errors and skips:", ""] + [f"- {e}" for e in r["errors"]] + [""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save(r: dict, out: Path, stem: str) -> None:
    """Write ``stem``.json and ``stem``.md under ``out`` (after every section, so a cut-off run keeps its results)."""
    write_atomic(out / f"{stem}.json", json.dumps(r, indent=2, default=str))
    write_atomic(out / f"{stem}.md", markdown(r))
