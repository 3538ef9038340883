"""Low-bit CPU inference (issue 18): moekit bf16 / int8 / int4 against llama.cpp BF16 / Q8_0 / Q4_0 on the same weights.

    python bench/cpu_quant.py            # both shapes, 2 threads, 3 rounds
    python bench/cpu_quant.py --smoke    # tiny models of the same layouts, 1 round: the whole pipeline in minutes

Models (bench/cpu_quant_setup.py): the Mixtral shape (742M parameters, 8 x 3584 experts, top-2; the
bench/serve.py checkpoint) and the XVERSE shape of BENCHMARKS.md's CPU tables (777M, 64 x 448, top-6,
two shared experts, in XVERSE-MoE's layout), seeded random bf16 weights. Every contender runs on
--threads threads (2):

- moekit, kernels="cpu": the bf16 checkpoint; ``moekit.load(path, quantize="int8")`` (one scale per
  output channel); ``quantize="int4", group=32`` (the bytes of GGUF's Q4_0; ``--int4-groups 32,64``
  adds moekit's default group 64). Decode through moekit's Engine (fixed threads, no prefix cache),
  prefill ``model(ids, last_only=True)``. What ran is printed and recorded per row: the backend's
  ``describe()``, and every warning it raised while that contender ran (a quantised op the CPU
  kernels cannot take runs on the plain PyTorch reference path and says so once).
- llama.cpp through llama-cpp-python's low-level API in a process of its own, on the same
  checkpoint written by ``moekit export --format gguf --type bf16|q8_0|q4_0``; batch 8 is 8 sequences
  (seq ids 0-7) in one llama_batch per step over a non-unified KV cache; prefill is one llama_decode of
  512 tokens; llama.cpp's defaults otherwise (mmap, flash attention auto). Its system info is recorded.

Method: decode tok/s = B x 64 tokens / the time of the 64 steps after the one that prefills the prompts
(65 new tokens per sequence), greedy, EOS ignored, 32-token random prompts (8 different ones at batch 8),
the same ids for everyone, timed inside each stack's own loop; prefill
tok/s: one 512-token forward pass, last position's logits. Contenders alternate within each round
(order rotated per round) and the best of --rounds counts, since a busy host only slows a run down.
Floor: bytes one decode step reads in the contender's own storage (all weights but the routed experts
and the embedding, the experts a batch is expected to touch, one embedding row per sequence, the KV
cache) over the best plain-read bandwidth (torch.sum over 256 MB of float32, probed before each decode
round). Sanity: moekit loads the Q8_0 GGUF (kept as int8, groups of 32) and its logits over a 32-token
prompt and its own 16 greedy tokens are compared with llama.cpp's on that file (per position; a position
where a near-tied router picks another expert stands out, so the median must be within 5%), with how often
llama.cpp, fed the same history, picks moekit's token; free-running greedy tokens are reported too (on
random weights near-tied logits make them diverge early, so they are not a pass criterion).
Results: --out (default bench/results/<date>/quant/, smoke: .../quant-smoke/): quant.json, quant.md, quant.png.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import cpu_quant_setup as setup

import moekit
from moekit.engine import Engine, SamplingParams
from moekit.engine.kv_cache import PagedKVCache
from moekit.machine import cpu_info, isa
from moekit.weights.load import read_config

SIZES = {"full": (32, 64, 512, 32), "smoke": (8, 8, 64, 8)}  # prompt, new tokens, prefill, sanity-check tokens
RATIOS = [  # (what, numerator, denominator, {metric kind: target})
    ("moekit int8 / moekit bf16", "moekit-int8", "moekit-bf16", {"decode": 1.8}),
    ("moekit int8 / llama.cpp Q8_0", "moekit-int8", "llama-q8_0", {"decode": 1.3, "prefill": 1.0}),
    ("moekit int4 g32 / llama.cpp Q4_0", "moekit-int4-g32", "llama-q4_0", {"decode": 1.2, "prefill": 1.0}),
    ("moekit int4 g64 / llama.cpp Q4_0", "moekit-int4-g64", "llama-q4_0", {}),
    ("moekit bf16 / llama.cpp BF16", "moekit-bf16", "llama-bf16", {}),
]
METRICS = ("decode_b1", "decode_b8", "prefill")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_gbs(runs: int = 5) -> float:
    """Plain read bandwidth: torch.sum over 256 MB of float32, best of ``runs``."""
    x = torch.ones(64 << 20)
    x.sum()
    return x.numel() * 4 / min(timed(x.sum) for _ in range(runs)) / 1e9


def prompts(batch: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=False, capture_output=True, text=True, cwd=HERE.parent).stdout.strip()


class Moekit:
    def __init__(self, folder: Path, fmt: str, group: int | None, governor: bool, seq_tokens: int):
        self.key = f"moekit-{fmt}" + (f"-g{group}" if fmt == "int4" else "")
        self.label = {"bf16": "moekit bf16", "int8": "moekit int8 (per channel)"}.get(fmt, f"moekit int4 (group {group})")
        self.fmt, self.notes = self.label.split(" ", 1)[1], []
        kw = {} if fmt == "bf16" else {"quantize": fmt, "group": group}
        with self.watch():
            self.model = moekit.load(folder, dtype=torch.bfloat16, kernels="cpu", progress=False, **kw)
            blocks = PagedKVCache.block_bytes(self.model.config, 16, torch.bfloat16)
            self.engine = Engine(self.model, max_num_seqs=8, kv_cache_bytes=blocks * (8 * -(-seq_tokens // 16) + 2),
                                 prefix_caching=False, adapt_threads=governor)
        self.paths = self.model.kernels.describe()
        self.tensors = setup.model_tensors(self.model)

    @contextlib.contextmanager
    def watch(self):
        """Keep every warning raised meanwhile (the CPU backend's fallback warnings among them)."""
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield
        self.notes += [str(w.message) for w in seen if str(w.message) not in self.notes
                       and not issubclass(w.category, (ResourceWarning, DeprecationWarning))]

    def decode(self, ps: list[list[int]], n: int) -> tuple[int, float]:
        """Greedy ``n`` tokens per prompt: (tokens after each one's first, seconds from the first step's end)."""
        with self.watch():
            stream = self.engine.stream(ps, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
            next(stream)  # the step that prefills the prompts (one step: B x prompt <= 512 tokens)
            t, count = time.perf_counter(), 0
            for events in stream:
                count += len(events)
            return count, time.perf_counter() - t

    def prefill(self, ids: list[int]) -> float:
        with self.watch(), torch.inference_mode():
            return timed(lambda: self.model(torch.tensor([ids]), last_only=True))

    def ran(self) -> str:
        falls = [n.split("moekit: ", 1)[-1] for n in self.notes if "reference path" in n]
        pre = self.engine.stats.preemptions
        return ("REFERENCE FALLBACK: " + "; ".join(falls) if falls else "moekit C++ kernels (no fallback warning)") + \
            (f"; {pre} preemptions" if pre else "")

    def close(self) -> None:
        del self.model, self.engine


class Llama:
    def __init__(self, worker: setup.LlamaWorker, path: Path, qtype: str, n_ctx_seq: int, mmap: bool):
        self.w, self.key, self.label, self.fmt = worker, f"llama-{qtype}", f"llama.cpp {qtype.upper()}", qtype.upper()
        self.w.call(op="load", name=self.key, path=str(path), n_seq=8, n_ctx_seq=n_ctx_seq, mmap=mmap)
        self.tensors, self.notes, self.path = setup.gguf_tensors(path), [], path
        self.paths = [f"llama.cpp (llama-cpp-python {worker.info['version']}), {path.name}, mmap {mmap}"]

    def decode(self, ps, n) -> tuple[int, float]:
        res = self.w.call(op="generate", name=self.key, prompts=ps, n=n)
        return res["decoded"], res["seconds"]

    def greedy(self, ids, n) -> list[int]:
        return self.w.call(op="generate", name=self.key, prompts=[ids], n=n)["tokens"][0]

    def prefill(self, ids):
        return self.w.call(op="prefill", name=self.key, ids=ids)["seconds"]

    def logits(self, ids) -> np.ndarray:
        res = self.w.call(op="logits", name=self.key, ids=ids)
        return np.frombuffer(base64.b64decode(res["logits"]), dtype=np.float32).reshape(res["shape"])

    def ran(self) -> str:
        return "llama.cpp ggml-cpu"

    def close(self) -> None:
        pass


def measure(cs: list, vocab: int, sizes, rounds: int, probes: list[float]) -> dict:
    """tok/s per contender and metric: contenders alternate (order rotated each round), best round counts."""
    P, NEW, PREFILL, _ = sizes
    ids = prompts(1, PREFILL, 99, vocab)[0]
    out = {c.key: {} for c in cs}
    for c in cs:  # warm-up (and the one-time fallback warnings)
        c.decode(prompts(1, P, 1, vocab), 4), c.decode(prompts(8, P, 8, vocab), 4), c.prefill(ids)
    for B in (1, 8):
        ps = prompts(B, P, B, vocab)
        for r in range(rounds):
            probes.append(read_gbs())
            for c in cs[r % len(cs):] + cs[:r % len(cs)]:
                time.sleep(0.2)  # let the previous contender's OpenMP threads stop spinning
                count, seconds = c.decode(ps, NEW + 1)
                rate = count / seconds
                out[c.key].setdefault(f"decode_b{B}_rounds", []).append(rate)
                print(f"  round {r + 1} {c.label}: decode batch {B} {rate:.1f} tok/s", flush=True)
    for r in range(rounds):
        for c in cs[r % len(cs):] + cs[:r % len(cs)]:
            time.sleep(0.2)
            rate = PREFILL / c.prefill(ids)
            out[c.key].setdefault("prefill_rounds", []).append(rate)
            print(f"  round {r + 1} {c.label}: prefill {rate:.1f} tok/s", flush=True)
    for row in out.values():
        row.update({m: max(row[m + "_rounds"]) for m in METRICS})
    return out


def sanity(llama_q8: Llama, vocab: int, sizes) -> dict:
    """moekit on the Q8_0 GGUF's own int8 blocks against llama.cpp on that file: logits over the prompt and
    16 greedy tokens of moekit's (teacher-forced: each position's top-1 given the same history), and
    free-running greedy tokens."""
    ids = prompts(1, sizes[3], 7, vocab)[0]
    ref_tokens = llama_q8.greedy(ids, 16)
    out = {"prompt": len(ids), "llama_greedy": ref_tokens, "moekit": {}}
    for label, dtype, kernels in (("float32, reference kernels", torch.float32, "reference"),
                                  ("bf16, cpu kernels", torch.bfloat16, "cpu")):
        model = moekit.load(llama_q8.path, dtype=dtype, kernels=kernels, progress=False)
        tokens = Engine(model, max_num_seqs=1, kv_cache_bytes=1 << 26, adapt_threads=False).generate(
            [ids], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0].token_ids
        seq = ids + tokens[:-1]
        with torch.inference_mode():
            lg = model(torch.tensor([seq]))[0].float().numpy()
        ref = llama_q8.logits(seq)
        gen = slice(len(ids) - 1, None)  # the positions that chose moekit's 16 tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        top2 = np.sort(ref[gen], axis=-1)[:, -2:]
        out["moekit"][label] = {
            "loaded_as": repr(getattr(model, "quant", None)),
            "rel_err": [float(e) for e in np.abs(lg - ref).max(-1) / np.abs(ref).max()],  # per position
            "top1_agree": float((lg.argmax(-1) == ref.argmax(-1)).mean()),
            "forced_top1_agree": float((ref[gen].argmax(-1) == np.array(tokens)).mean()),
            "llama_top2_gap_median": float(np.median(top2[:, 1] - top2[:, 0])),
            "greedy_equal_prefix": same, "greedy": tokens}
        del model
        gc.collect()
    out["ok"] = float(np.median(out["moekit"]["float32, reference kernels"]["rel_err"])) <= 0.05
    return out


def run_shape(name: str, args, sizes, cache: Path, out: Path, probes: list[float], info: dict) -> dict:
    P, NEW, PREFILL, _ = sizes
    folder = setup.checkpoint(name, cache, args.smoke)
    ggufs = {q: setup.gguf(folder, q, cache, name + ("-smoke" if args.smoke else "")) for q in setup.GGUF_TYPES}
    cfg = read_config(folder)[0]
    total, active = moekit.count_params(cfg)
    print(f"\n== {name}: {folder} ({total / 1e6:.0f}M parameters, {active / 1e6:.0f}M active)", flush=True)
    worker = setup.LlamaWorker(args.threads, out / f"llama-{name}.log")
    worker.info = info["llama"] = worker.call(op="info")
    n_ctx_seq = -(-max(PREFILL, P + NEW + 1) // 256) * 256
    cs = [Moekit(folder, "bf16", None, args.governor, P + NEW + 1),
          Moekit(folder, "int8", None, args.governor, P + NEW + 1),
          *[Moekit(folder, "int4", int(g), args.governor, P + NEW + 1) for g in args.int4_groups.split(",")],
          *[Llama(worker, ggufs[q], q, n_ctx_seq, not args.llama_no_mmap) for q in setup.GGUF_TYPES]]
    print("\n".join(cs[0].paths), flush=True)
    try:
        speeds = measure(cs, cfg.vocab_size, sizes, args.rounds, probes)
        check = None if args.no_check else sanity(next(c for c in cs if c.key == "llama-q8_0"), cfg.vocab_size, sizes)
    finally:
        worker.close()
    rows = {}
    for c in cs:
        row = {"label": c.label, "weights": c.fmt, "kernel_paths": c.paths, "ran": c.ran(), "warnings": c.notes,
               **speeds[c.key]}
        for B in (1, 8):
            row[f"bytes_per_step_b{B}"] = setup.step_bytes(c.tensors, cfg, B) + setup.kv_bytes(cfg, B, P + NEW // 2)
        rows[c.key] = row
        print(f"  {c.label}: {c.ran()}", flush=True)
        c.close()
    gc.collect()
    return {"folder": str(folder), "moekit_paths": cs[0].paths, "gguf": {q: str(p) for q, p in ggufs.items()}, "params_total": total,
            "params_active": active, "rows": rows, "sanity": check}


def finish(results: dict) -> None:
    """Floors from the best read probe, and the ratios with their targets."""
    bw = max(results["read_gbs"]) * 1e9
    for s in results["shapes"].values():
        for row in s["rows"].values():
            for B in (1, 8):
                floor = bw * B / row[f"bytes_per_step_b{B}"]
                row[f"decode_b{B}_floor"], row[f"decode_b{B}_pct_floor"] = floor, 100 * row[f"decode_b{B}"] / floor
        s["ratios"] = []
        for what, a, b, targets in RATIOS:
            if a in s["rows"] and b in s["rows"]:
                r = {m: s["rows"][a][m] / s["rows"][b][m] for m in METRICS}
                met = {m: (r[m] >= t if m.startswith("decode") else r[m] > t)
                       for m in METRICS for k, t in targets.items() if m.startswith(k)}
                s["ratios"].append({"what": what, **r, "targets": targets, "met": met})


def markdown(results: dict) -> str:
    r, probes = results, results["read_gbs"]
    P, NEW, PREFILL, _ = r["sizes"]
    lines = [f"# bench/cpu_quant.py, {r['date']}{' (SMOKE: tiny models, not a measurement)' if r['smoke'] else ''}", "",
             f"- CPU: {r['cpu']} ({' '.join(r['isa'])}), {r['threads']} threads for every contender; torch {r['torch']}",
             f"- llama.cpp: llama-cpp-python {r['llama']['version']}; system info: `{r['llama']['system_info']}`",
             f"- moekit {r['git']}; command: `{r['command']}`; wall {r['wall_s'] / 60:.1f} min",
             (f"- plain read (torch.sum, 256 MB float32): best {max(probes):.1f} GB/s (probes {min(probes):.1f}-"
              f"{max(probes):.1f}); decode: {P}-token prompts, {NEW} new tokens, greedy; prefill: {PREFILL} tokens; "
              f"best of {r['rounds']} alternating rounds"), ""]
    for name, s in r["shapes"].items():
        lines += [f"## {name} ({s['params_total'] / 1e6:.0f}M parameters, {s['params_active'] / 1e6:.0f}M active)", "",
                  "moekit's backend (`describe()`): " + "; ".join(x.strip() for x in s["moekit_paths"]), "",
                  ("| contender | MB read / token (b1, b8) | decode b1 tok/s | % floor | decode b8 tok/s | % floor "
                   f"| prefill {PREFILL} tok/s | what ran |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in s["rows"].values():
            mb = f"{row['bytes_per_step_b1'] / 1e6:.0f}, {row['bytes_per_step_b8'] / 8e6:.0f}"
            lines.append(f"| {row['label']} | {mb} | {row['decode_b1']:.1f} | {row['decode_b1_pct_floor']:.0f}% | "
                         f"{row['decode_b8']:.1f} | {row['decode_b8_pct_floor']:.0f}% | {row['prefill']:.1f} | {row['ran']} |")
        lines += ["", "| ratio | decode b1 | decode b8 | prefill | target |", "| --- | --- | --- | --- | --- |"]
        for q in s["ratios"]:
            cell = {m: f"{q[m]:.2f}x" + ("" if m not in q["met"] else " (met)" if q["met"][m] else " (**not met**)")
                    for m in METRICS}
            tgt = ", ".join(f"{k} {'>=' if k == 'decode' else '>'} {t}x" for k, t in q["targets"].items())
            lines.append(f"| {q['what']} | {cell['decode_b1']} | {cell['decode_b8']} | {cell['prefill']} | {tgt} |")
        c = s["sanity"]
        if c:
            lines.append("")
            for label, m in c["moekit"].items():
                over = sum(e > 0.05 for e in m["rel_err"])
                over = f"{over} over 5%: near-tied routing" if over else "none over 5%"
                lines.append(f"- Sanity, Q8_0 GGUF, {c['prompt']}-token prompt + 16 greedy tokens: moekit ({label}, "
                             f"{m['loaded_as']}) vs llama.cpp: max abs logit difference / max logit per position "
                             f"{np.median(m['rel_err']):.2%} (median), {max(m['rel_err']):.2%} (max; {over}), top-1 equal at {m['top1_agree']:.0%} of positions; llama.cpp picks moekit's greedy "
                             f"token at {m['forced_top1_agree']:.0%} of the 16 (median top-2 gap "
                             f"{m['llama_top2_gap_median']:.3f}); free-running greedy tokens equal for the first "
                             f"{m['greedy_equal_prefix']} of 16")
            lines.append(f"- Sanity {'passed' if c['ok'] else '**FAILED**'} (float32 reference: median within 5%)")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    fig, axes = plt.subplots(len(shapes), 3, figsize=(15, 4.2 * len(shapes)), squeeze=False)
    for i, name in enumerate(shapes):
        rows = list(results["shapes"][name]["rows"].values())
        for j, m in enumerate(METRICS):
            ax = axes[i][j]
            vals = [row[m] for row in rows]
            colors = ["tab:blue" if row["label"].startswith("moekit") else "tab:orange" for row in rows]
            bars = ax.bar(range(len(rows)), vals, color=colors)
            for b, row in zip(bars, rows):
                pct = f"\n{row[m + '_pct_floor']:.0f}% floor" if m != "prefill" else ""
                ax.annotate(f"{row[m]:.0f}{pct}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
            ax.set_xticks(range(len(rows)), [row["label"].replace(" ", "\n", 1) for row in rows], fontsize=7)
            ax.set_title(f"{name}: {m.replace('_b', ', batch ')} (tok/s)", fontsize=10)
            ax.margins(y=0.2)
    fig.suptitle(f"moekit vs llama.cpp on the same weights, {results['cpu']}, {results['threads']} threads "
                 f"({results['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="mixtral,xverse")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds, best counts (default 3; smoke 1)")
    ap.add_argument("--int4-groups", default="32", help="moekit int4 group sizes, e.g. 32,64 (32 = Q4_0's bytes)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moekit")
    ap.add_argument("--out", type=Path, help="results folder (default bench/results/<date>/quant[-smoke])")
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks the pipeline, measures nothing")
    ap.add_argument("--governor", action="store_true", help="moekit's thread governor on (default: fixed threads)")
    ap.add_argument("--llama-no-mmap", action="store_true", help="llama.cpp loads its weights without mmap")
    ap.add_argument("--no-check", action="store_true", help="skip the Q8_0 logits sanity check")
    args = ap.parse_args()
    start, date = time.time(), time.strftime("%Y-%m-%d")
    args.rounds = args.rounds or (1 if args.smoke else 3)
    out = args.out or HERE / "results" / date / ("quant-smoke" if args.smoke else "quant")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    sizes = SIZES["smoke" if args.smoke else "full"]
    dirty = sh("git", "status", "--porcelain", "--", "moekit/kernels")
    results = {"date": date, "smoke": args.smoke, "command": "python " + " ".join(sys.argv), "cpu": cpu_info()["model"],
               "isa": isa(), "threads": args.threads, "torch": torch.__version__, "rounds": args.rounds, "sizes": sizes,
               "git": sh("git", "rev-parse", "--short", "HEAD") + (" + uncommitted moekit/kernels changes" if dirty else ""),
               "read_gbs": [read_gbs()], "llama": {}, "shapes": {}}
    print(f"{results['cpu']}; {results['git']}; plain read {results['read_gbs'][0]:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # smoke checkpoints are thrown away
        cache = Path(tmp) / "cache" if args.smoke else args.cache
        if args.smoke:
            setup.link_mixtral(args.cache, cache)
        for name in args.shapes.split(","):
            results["shapes"][name] = run_shape(name, args, sizes, cache, out, results["read_gbs"], results)
    results["wall_s"] = time.time() - start
    finish(results)
    text = markdown(results)
    (out / "quant.json").write_text(json.dumps(results, indent=1))
    (out / "quant.md").write_text(text)
    plot(results, out / "quant.png")
    print("\n" + text + f"\nwrote {out}/quant.json, quant.md, quant.png")


if __name__ == "__main__":
    main()
