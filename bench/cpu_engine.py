"""CPU serving benchmark: a Poisson stream of requests served in-process (no HTTP) by three engines.

    python bench/cpu_engine.py                     # 64 requests, Mixtral-shaped 742M model, bf16, 2 threads
    python bench/cpu_engine.py --small             # smoke check: tiny model, 8 requests, < 1 minute
    python bench/cpu_engine.py --requests 8 --skip-fixed --json out.json

One seeded workload: prompt lengths log-uniform in [32, 2048] tokens, output lengths uniform in
[16, 256], random token ids, arrivals a Poisson process at ``--rate`` requests/s; greedy with EOS
ignored, so every engine produces the same number of tokens. The contenders serve the same requests
at the same arrival times, one after another in this process, from the same bf16 checkpoint
(written by bench/cpu_generate.py's helper in the family's Hugging Face layout):

1. moekit's Engine (continuous batching, paged KV cache): a loop adds every request whose arrival
   time has passed, then calls ``step()``;
2. transformers' continuous batching: the manager behind ``transformers serve --continuous-batching``
   (``model.init_continuous_batching``), requests added at their arrival times from this thread,
   per-token timestamps recorded by transformers (``record_timestamps``);
3. moekit's old fixed-batch engine (commit 728f105, bench/legacy_fixed_batch.py): whenever it is
   idle it takes every request that has arrived (up to ``--fixed-batch``) as one left-padded batch.

Per contender: output tok/s (output tokens / time from the first arrival to the last token), time to
first token p50/p99 (from the request's arrival), inter-token latency p50/p99 (gaps between a
request's consecutive tokens), wall time. Also measured: moekit's single-stream decode rate and its
decode rate with 16 running streams, and its peak KV memory against the bytes of the tokens in flight.
Both KV pools get the same budget (``--kv-gib``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# bench/ is on sys.path (this script's folder); cpu_generate puts the repo root there too
from cpu_generate import SHAPES, write_checkpoint
from hf_continuous import load_transformers, serve_transformers
from legacy_fixed_batch import fixed_batch_steps
from serving_trace import Trace, Workload, make_workload, new_trace, progress, warmup_prompts

import moekit
from moekit.engine import Engine, EngineStats, SamplingParams
from moekit.engine.threads import ThreadGovernor
from moekit.machine import cpu_info

# --small: a tiny Mixtral-layout model (same family code paths, seconds instead of minutes)
SMALL = dict(SHAPES["mixtral"], vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=256, num_local_experts=4)
TARGETS = {"throughput_vs_hf": 2.0, "streams_vs_single": 3.0, "kv_vs_inflight": 1.2}


# ---- 1. moekit's continuous-batching engine -------------------------------------------------------------
def new_engine(model, args) -> Engine:
    return Engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_bytes=int(args.kv_gib * 2**30), adapt_threads=not args.no_governor)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def serve_moekit(engine: Engine, wl: Workload) -> Trace:
    """Serve ``wl`` with a warmed-up ``engine`` (its stats are reset: they describe this run only)."""
    engine.stats = EngineStats()
    tr, n, nxt = new_trace("moekit Engine", wl), len(wl.prompts), 0
    with progress(tr.name, wl) as bar:
        t0 = time.perf_counter()
        while nxt < n or engine.has_unfinished():
            now = time.perf_counter() - t0
            while nxt < n and wl.arrivals[nxt] <= now:
                engine.add_request(wl.prompts[nxt], greedy(wl.max_new[nxt]), request_id=nxt)
                nxt += 1
            if not engine.has_unfinished():
                time.sleep(max(0.0, wl.arrivals[nxt] - now))
                continue
            events = engine.step()
            t = time.perf_counter() - t0
            for ev in events:
                tr.times[ev.index].append(t)
                tr.tokens[ev.index].append(ev.token_id)
            bar.update(len(events))
        tr.wall = time.perf_counter() - t0
    st = engine.stats
    token_bytes = engine.block_bytes // engine.pool.block_size
    peak_kv, inflight = st.peak_blocks * engine.block_bytes, st.peak_inflight_tokens * token_bytes
    tr.extra = {"peak_kv_bytes": peak_kv, "peak_inflight_bytes": inflight, "kv_vs_inflight": peak_kv / inflight,
                "kv_pool_bytes": engine.pool.num_blocks * engine.block_bytes, "steps": st.steps,
                "preemptions": st.preemptions, "prefix_cached_tokens": st.cached_tokens}
    return tr


def decode_rates(engine: Engine, args, rounds: int = 2) -> dict:
    """moekit decode tok/s with one stream and with ``args.streams`` streams started together (32-token
    prompts, ``args.decode_tokens`` new tokens each), counted after every stream has its first token; best
    of ``rounds`` alternating rounds."""
    g = random.Random(1)
    best = {1: 0.0, args.streams: 0.0}
    for _ in range(rounds):
        for k in list(best):
            times = {}
            for _ in range(k):
                rid = engine.add_request([g.randrange(3, engine.model.config.vocab_size) for _ in range(32)],
                                         greedy(args.decode_tokens))
                times[rid] = []
            while engine.has_unfinished():
                events = engine.step()
                t = time.perf_counter()
                for ev in events:
                    times[ev.index].append(t)
            start = max(ts[0] for ts in times.values())
            end = max(ts[-1] for ts in times.values())
            n = sum(sum(1 for x in ts if x > start) for ts in times.values())
            best[k] = max(best[k], n / (end - start))
    single, many = best[1], best[args.streams]
    return {"single_stream_tok_s": single, "streams": args.streams, "streams_tok_s": many, "ratio": many / single}


# ---- 3. the fixed-batch engine of 728f105 ----------------------------------------------------------------
def kv_token_bytes(model) -> int:
    """Keys + values of one token, every layer."""
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.embed.weight.element_size()


def serve_fixed(model, wl: Workload, args) -> Trace:
    gov = None if args.no_governor else ThreadGovernor()  # the old engine's, as it ran it: one per engine
    tick = gov.update if gov else (lambda: None)
    if gov:
        gov.start()
    list(fixed_batch_steps(model, warmup_prompts(wl), [4] * 3, tick))  # warm-up
    token_bytes = kv_token_bytes(model)
    tr, n, served = new_trace("fixed batch (728f105)", wl), len(wl.prompts), 0
    peak_kv = peak_need = 0
    with progress(tr.name, wl) as bar:
        t0 = time.perf_counter()
        while served < n:
            now = time.perf_counter() - t0
            if wl.arrivals[served] > now:
                time.sleep(wl.arrivals[served] - now)
                continue
            batch = [i for i in range(served, min(n, served + args.fixed_batch)) if wl.arrivals[i] <= now]
            stats = {}
            for out in fixed_batch_steps(model, [wl.prompts[i] for i in batch], [wl.max_new[i] for i in batch],
                                         tick, stats):
                t = time.perf_counter() - t0
                for j, tok in out:
                    tr.times[batch[j]].append(t)
                    tr.tokens[batch[j]].append(tok)
                bar.update(len(out))
            need = sum(len(wl.prompts[i]) + wl.max_new[i] for i in batch) * token_bytes
            if stats["kv_bytes"] > peak_kv:
                peak_kv, peak_need = stats["kv_bytes"], need
            served += len(batch)
        tr.wall = time.perf_counter() - t0
        if gov:
            gov.restore()
    tr.extra = {"peak_kv_bytes": peak_kv, "peak_inflight_bytes": peak_need, "kv_vs_inflight": peak_kv / peak_need}
    return tr


@torch.inference_mode()
def greedy_choices(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's greedy choice at each of ``tokens``' positions, ``tokens`` fed back (one forward, no cache)."""
    ids = torch.tensor([prompt + tokens[:-1]])
    if isinstance(model, moekit.MoEDecoder):
        return model(ids, logits_at=torch.arange(len(prompt) - 1, ids.shape[1]))[0].argmax(-1)
    return model(ids, logits_to_keep=len(tokens)).logits[0].argmax(-1)


def referee(folder: Path, wl: Workload, ours: Trace, hf_choices: list[torch.Tensor]) -> list[str]:
    """Greedy choices of an fp32 copy of the model on moekit's outputs, against moekit's and transformers'."""
    m32 = moekit.load(folder, dtype=torch.float32)
    lines = []
    for i, hf_K in enumerate(hf_choices):
        ours_K = torch.tensor(ours.tokens[i])
        f32_K = greedy_choices(m32, wl.prompts[i], ours.tokens[i])
        lines.append(f"Request {i} teacher-forced ({len(ours_K)} positions, moekit's output fed back): transformers "
                     f"bf16 picks moekit's token at {int((hf_K == ours_K).sum())}; an fp32 copy of the model picks "
                     f"moekit's token at {int((f32_K == ours_K).sum())} and transformers' at {int((f32_K == hf_K).sum())}.")
    return lines


def agreement(a: Trace, b: Trace) -> dict:
    """Length of the prefix on which two contenders' greedy tokens agree, per request."""
    pre = [next((k for k, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q)))
           for p, q in zip(a.tokens, b.tokens)]
    lens = [len(p) for p in a.tokens]
    return {"prefix": pre, "lengths": lens, "identical": sum(p == n for p, n in zip(pre, lens)), "requests": len(pre)}


# ---- report -----------------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    w = r["workload"]
    head = (f"{r['date']}, {r['cpu']}, {r['threads']} threads, torch {r['torch']}, transformers {r['transformers']}, "
            f"{r['model']}; `{r['command']}`")
    load = (f"Workload: {w['requests']} requests, prompts {w['prompt_min']}-{w['prompt_max']} tokens (log-uniform, "
            f"{w['prompt_tokens']} in all), outputs {w['output_min']}-{w['output_max']} ({w['output_tokens']} in all), "
            f"Poisson arrivals at {w['rate']} req/s (last at {w['last_arrival_s']:.1f} s).")
    cols = ["contender", "output tok/s", "vs transformers CB", "TTFT p50 (s)", "TTFT p99 (s)", "ITL p50 (ms)",
            "ITL p99 (ms)", "wall (s)"]
    lines = [head, "", load, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    hf = r["contenders"].get("transformers CB")
    for name, m in r["contenders"].items():
        vs = f"{m['output_tok_s'] / hf['output_tok_s']:.2f}x" if hf else ""
        lines.append(f"| {name} | {m['output_tok_s']:.1f} | {vs} | {m['ttft_p50_s']:.2f} | {m['ttft_p99_s']:.2f} "
                     f"| {m['itl_p50_ms']:.0f} | {m['itl_p99_ms']:.0f} | {m['wall_s']:.1f} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    for line in r["agreement"] + r.get("referee", []) + r["notes"]:
        lines.append(f"\n{line}")
    return "\n".join(lines)


def targets(r: dict) -> list[dict]:
    c, out = r["contenders"], []
    ours, hf = c.get("moekit Engine"), c.get("transformers CB")
    if ours and hf:
        x = ours["output_tok_s"] / hf["output_tok_s"]
        out.append({"target": f"output tok/s >= {TARGETS['throughput_vs_hf']:g}x transformers CB at <= its ITL p99",
                    "measured": f"{x:.2f}x; ITL p99 {ours['itl_p99_ms']:.0f} vs {hf['itl_p99_ms']:.0f} ms",
                    "met": x >= TARGETS["throughput_vs_hf"] and ours["itl_p99_ms"] <= hf["itl_p99_ms"]})
    d = r["decode"]
    out.append({"target": f"decode with {d['streams']} streams >= {TARGETS['streams_vs_single']:g}x single stream",
                "measured": f"{d['ratio']:.2f}x ({d['streams_tok_s']:.1f} vs {d['single_stream_tok_s']:.1f} tok/s)",
                "met": d["ratio"] >= TARGETS["streams_vs_single"]})
    if ours:
        out.append({"target": f"peak KV memory <= {TARGETS['kv_vs_inflight']:g}x the bytes of the tokens in flight",
                    "measured": f"{ours['kv_vs_inflight']:.3f}x ({ours['peak_kv_bytes'] / 2**20:.1f} vs "
                                f"{ours['peak_inflight_bytes'] / 2**20:.1f} MiB)",
                    "met": ours["kv_vs_inflight"] <= TARGETS["kv_vs_inflight"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate, requests/s (inf: all at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--small", action="store_true", help="tiny model and 8 short requests (smoke check)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-gib", type=float, default=1.0, help="KV pool of moekit and of transformers CB")
    ap.add_argument("--no-governor", action="store_true", help="moekit on a fixed thread count (no thread governor)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-fixed", action="store_true")
    ap.add_argument("--fixed-batch", type=int, default=16, help="most requests the fixed-batch engine takes at once")
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation (CB accepts sdpa, paged|eager)")
    ap.add_argument("--hf-experts", default="grouped_mm", help="transformers experts_implementation")
    ap.add_argument("--hf-max-batch-tokens", type=int, help="transformers CB max_batch_tokens "
                    "(default: --max-num-batched-tokens)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.small:
        args.requests, args.rate, args.decode_tokens = min(args.requests, 8), 20.0, 16
        args.kv_gib = min(args.kv_gib, 0.25)
    torch.set_num_threads(args.threads)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)  # its psutil error: see notes
    import transformers

    hf_cfg = SMALL if args.small else SHAPES[args.shape]
    wl = make_workload(args.requests, args.rate, args.seed, hf_cfg["vocab_size"],
                       (32, 256) if args.small else (32, 2048), (8, 32) if args.small else (16, 256))
    r = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_info()["model"], "threads": args.threads,
         "torch": torch.__version__, "transformers": transformers.__version__,
         "command": "python bench/cpu_engine.py " + " ".join(sys.argv[1:]), "args": vars(args) | {"json": None},
         "workload": {"requests": args.requests, "rate": args.rate, "prompt_min": min(map(len, wl.prompts)),
                      "prompt_max": max(map(len, wl.prompts)), "prompt_tokens": sum(map(len, wl.prompts)),
                      "output_min": min(wl.max_new), "output_max": max(wl.max_new), "output_tokens": sum(wl.max_new),
                      "last_arrival_s": wl.arrivals[-1]},
         "contenders": {}, "notes": [], "agreement": []}
    traces = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_checkpoint(hf_cfg, torch.bfloat16, Path(tmp))
        total, active = moekit.count_params(cfg)
        r["model"] = (f"{'small' if args.small else args.shape}-shaped {total / 1e6:.0f}M ({active / 1e6:.0f}M active), "
                      "bf16")
        print(r["model"], "|", r["workload"], flush=True)
        model = moekit.load(Path(tmp), dtype=torch.bfloat16)
        r["kernels"] = model.kernels.name
        engine = new_engine(model, args)
        engine.generate(warmup_prompts(wl), greedy(4))  # first calls of ops at new shapes are slow
        traces["moekit Engine"] = serve_moekit(engine, wl)
        r["decode"] = decode_rates(engine, args)
        del engine
        print(f"decode: {r['decode']}", flush=True)
        if not args.skip_hf:
            hf = load_transformers(Path(tmp), args)
            try:
                traces["transformers CB"] = serve_transformers(hf, wl, args, r["notes"])
            except RuntimeError as e:  # e.g. no psutil and no readable NUMA node size: see the notes
                r["notes"].append(f"{e} (skipped)")
            else:
                ours = traces["moekit Engine"]
                hf_choices = [greedy_choices(hf, wl.prompts[i], ours.tokens[i]) for i in range(min(2, args.requests))]
                del hf
                r["referee"] = referee(Path(tmp), wl, ours, hf_choices)
            hf = None
        if not args.skip_fixed:
            traces["fixed batch (728f105)"] = serve_fixed(model, wl, args)
    for name, tr in traces.items():
        r["contenders"][name] = tr.metrics()
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in r["contenders"][name].items()), flush=True)
    ours = traces["moekit Engine"]
    for name, tr in traces.items():
        if tr is ours:
            continue
        a = agreement(ours, tr)
        r[f"agreement_{name}"] = a
        first = ", ".join(f"request {i}: {a['prefix'][i]}/{a['lengths'][i]}" for i in range(min(3, a["requests"])))
        r["agreement"].append(f"Greedy tokens, moekit vs {name}: {a['identical']}/{a['requests']} requests identical; "
                              f"agreeing prefix median {int(np.median(a['prefix']))} tokens ({first}).")
    r["targets"] = targets(r)
    print(markdown(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
