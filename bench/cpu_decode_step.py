"""The fused CPU decode step and the decode GEMVs: what the figures of docs/generation.md and BENCHMARKS.md rest on.

    python bench/cpu_decode_step.py               # Mixtral-shaped 742M, bf16 / int8 / int4, 2 threads (~4 min)

1. Engine decode at batch 1 (64 greedy tokens after a 32-token prompt, the prefill step excluded) with
   the fused decode step (``Engine(fused_decode=True)``, one C++ call per step) against the per-op
   forward (``fused_decode=False``), the two engines alternating over ``--rounds``, best of each; plus
   the share of a fused step spent outside ``Decoder.step`` (scheduling, sampling, the Python around it).
2. One-token GEMV read speed over ``--gemv-mb`` MB of 7168 x 1024 matrices (more than any cache), bf16 /
   int8 per channel / int4 group 32, on 1 and all threads, best of 7, beside a ``torch.sum`` read of
   the same size: the kernels' share of the machine's read speed.

The checkpoint is bench/serve_setup.py's (built on first use). Results: --out (default
bench/results/<date>/decode_step/): decode_step.json, decode_step.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import serve_setup

import moekit
from moekit.engine import Engine, SamplingParams
from moekit.kernels import cpu
from moekit.kernels.weights import QuantWeight
from moekit.machine import cpu_info

FORMATS = {"bf16": {}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4", "group": 32}}


class Timed:
    """Wraps a Decoder: the seconds its step() took."""

    def __init__(self, decoder):
        self.decoder, self.seconds = decoder, 0.0

    def step(self, *args):
        t = time.perf_counter()
        out = self.decoder.step(*args)
        self.seconds += time.perf_counter() - t
        return out


def decode(engine: Engine, n: int = 64) -> tuple[float, float]:
    """(tok/s after the prefill step, seconds in Decoder.step per token or 0 without the fused step)."""
    timed = engine.fused.decoder if engine.fused is not None else None
    stream = engine.stream([list(range(3, 35))], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
    next(stream)
    if timed is not None:
        timed.seconds = 0.0
    t, count = time.perf_counter(), 0
    for events in stream:
        count += len(events)
    dt = time.perf_counter() - t
    return count / dt, (timed.seconds / count if timed is not None else 0.0)


def engine_rows(folder: Path, rounds: int) -> list[dict]:
    rows = []
    for fmt, kw in FORMATS.items():
        model = moekit.load(folder, dtype=torch.bfloat16, kernels="cpu", progress=False, **kw)
        engines = {f: Engine(model, max_num_seqs=8, kv_cache_bytes=1 << 27, prefix_caching=False,
                             adapt_threads=False, fused_decode=f) for f in (True, False)}
        engines[True].fused.decoder = Timed(engines[True].fused.decoder)
        best = {True: (0.0, 0.0), False: (0.0, 0.0)}
        for _ in range(rounds):
            for f, eng in engines.items():
                tps, inside = decode(eng)
                if tps > best[f][0]:
                    best[f] = (tps, inside)
        step_ms = 1e3 / best[True][0]
        rows.append({"format": fmt, "fused_tok_s": best[True][0], "per_op_tok_s": best[False][0],
                     "fused_step_ms": step_ms, "outside_decoder_ms": step_ms - best[True][1] * 1e3})
        print(f"  {fmt}: fused {best[True][0]:.1f} tok/s, per-op {best[False][0]:.1f} tok/s, "
              f"{rows[-1]['outside_decoder_ms']:.2f} of {step_ms:.2f} ms outside Decoder.step", flush=True)
        del model, engines
    return rows


def best_gbs(fn, nbytes: int, runs: int = 7) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def gemv_rows(total_mb: int, threads: int) -> list[dict]:
    ext, g = cpu.extension(), torch.Generator().manual_seed(0)
    N, K = 7168, 1024
    x = torch.randn(1, K, generator=g).bfloat16()
    rows = []
    for fmt, group in (("bf16", None), ("int8", K), ("int4", 32)):
        w0 = torch.randn(N, K, generator=g) * 0.02
        one = w0.bfloat16() if fmt == "bf16" else QuantWeight.quantize(w0, fmt, group)
        size = N * K * 2 if fmt == "bf16" else one.data.numel() + one.scale.numel() * 2
        ws = [one.clone() if fmt == "bf16" else QuantWeight.quantize(w0 + 1e-3 * i, fmt, group)
              for i in range(max(1, total_mb * 2**20 // size))]

        def run():
            for w in ws:
                ext.linear(x, w, None) if fmt == "bf16" else ext.qlinear(x, w.data, w.scale, None)

        row = {"format": fmt}
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            row[f"gbs_{n}"] = best_gbs(run, size * len(ws))
        rows.append(row)
        ws.clear()  # free this format's copies before the next
    plain = torch.ones(total_mb * 2**20 // 4)
    read = {"format": "torch.sum (plain read)"}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        read[f"gbs_{n}"] = best_gbs(plain.sum, plain.numel() * 4)
    torch.set_num_threads(threads)
    return rows + [read]


def markdown(res: dict) -> str:
    t = res["threads"]
    out = [f"# bench/cpu_decode_step.py, {res['date']}", "",
           f"- CPU: {res['cpu']}, {t} threads; torch {torch.__version__}; moekit {res['git']}",
           f"- command: `{res['command']}`", "",
           "Engine decode at batch 1, Mixtral-shaped 742M (best of the alternating rounds):", "",
           "| format | fused tok/s | per-op tok/s | fused / per-op | fused step ms | ms outside Decoder.step |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in res["engine"]:
        out.append(f"| {r['format']} | {r['fused_tok_s']:.1f} | {r['per_op_tok_s']:.1f} | "
                   f"{r['fused_tok_s'] / r['per_op_tok_s']:.2f}x | {r['fused_step_ms']:.2f} | {r['outside_decoder_ms']:.2f} |")
    cols = sorted({1, t})
    out += ["", f"One-token GEMV read speed over 7168 x 1024 matrices ({res['gemv_mb']} MB), GB/s:", "",
            "| weights | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in cols) + " |",
            "| --- |" + " --- |" * len(cols)]
    for r in res["gemv"]:
        out.append(f"| {r['format']} | " + " | ".join(f"{r[f'gbs_{n}']:.1f}" for n in cols) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gemv-mb", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moekit")
    ap.add_argument("--out", type=Path, default=HERE / "results" / time.strftime("%Y-%m-%d") / "decode_step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info()["model"], "threads": args.threads,
           "git": git.strip(), "command": "python " + " ".join(sys.argv), "gemv_mb": args.gemv_mb}
    print("engine decode, fused vs per-op:", flush=True)
    res["engine"] = engine_rows(serve_setup.checkpoint(args.cache), args.rounds)
    print("one-token GEMV read speed:", flush=True)
    res["gemv"] = gemv_rows(args.gemv_mb, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step.json").write_text(json.dumps(res, indent=1))
    (args.out / "decode_step.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
