"""Expert offload: a checkpoint at least twice the budget decodes within it, with the in-memory run's tokens.

    python bench/offload.py --out bench/results/offload/run2.json   # docs/quantization.md's figures
    python bench/offload.py --budgets 0.5 --cold 0.5 --rounds 1 --model PATH  # another checkpoint

The model: ``~/.cache/moekit/bench-serve/mixtral-bf16`` (bench/serve_setup.py: 742M parameters,
bfloat16, 1.48 GB; 8 layers of 8 experts of 21 MiB, top-2) or, if absent, the same shape written
here with random weights. Every measurement is a fresh subprocess, so its peak RSS
(``ru_maxrss``) is its own:

- idle: ``import torch, moekit``, nothing else;
- runtime: idle plus what every load sets up before reading a weight (the CPU kernels, the
  checkpoint's header read and checked against the model built on the meta device: the loader's
  own first step): the baseline ``max_memory`` does not cover; "-runtime" is a run's
  peak RSS less this, to set against "weights" (resident + expert cache, or the whole model)
  and the budget; what remains is the KV cache, activations and the allocator's slack;
- in-memory: ``moekit.load(folder)``;
- offload: ``moekit.load(folder, max_memory=B)`` for each budget.

Each run loads, then decodes ``--new`` tokens greedily (EOS ignored) from a fixed 32-token
prompt with the engine; configurations run interleaved for ``--rounds`` rounds (median tok/s). decode tok/s = (new - 1) / (time of the last token - time of the
first), so prefill is not in it. Page cache: "warm" runs read the checkpoint once before
(the OS keeps it cached: misses are memory copies, and that cache is memory the process does
not own and RSS does not count); "cold" runs drop the file's pages (posix_fadvise) before
loading and after every expert read, so each miss is a disk read, as on a machine without
spare memory. Last, the embedded default model (trained, so its routing has the locality of a
real model, unlike random weights) at a budget of about half its experts. Results print as a
table and go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_SERVE = Path.home() / ".cache" / "moekit" / "bench-serve" / "mixtral-bf16"
SHAPE = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 8000, "hidden_size": 1024,
         "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 3584,
         "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
         "rope_theta": 1e6, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
         "torch_dtype": "bfloat16"}
PROMPT = 32


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    sys.path.insert(0, str(ROOT))
    import moekit
    from moekit.kernels import get_backend

    torch.set_num_threads(spec["threads"])
    out: dict = {}
    if spec["kind"] == "runtime":  # what every load brings before any weight: the CPU kernels, the checkpoint's
        # header read and checked against the model built on the meta device (the loader's own first step)
        from moekit.weights.gguf_import import plan_gguf
        from moekit.models.quantize import QuantConfig
        from moekit.weights.offload import _safetensors_sources

        get_backend("auto", 10**9, "cpu", torch.bfloat16)
        if spec["model"].endswith(".gguf"):
            plan = plan_gguf(spec["model"], quantize=spec.get("quantize"))
            meta = plan.on_meta("cpu", "auto")
            kept = meta, plan.reads(meta.named_views())
        else:
            kept = _safetensors_sources(Path(spec["model"]), None, "cpu", "auto",
                                        QuantConfig.requested(spec.get("quantize")))
        # RSS with these alive, not the peak: parsing a GGUF header (its vocabulary) is transient
        with open("/proc/self/status") as f:
            out["peak_rss"] = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))
        del kept
        return out
    if spec["kind"] == "load":
        if spec["cold"]:
            for f in weight_files(Path(spec["model"])):
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        t0 = time.perf_counter()
        if spec.get("budget") is None:
            model = moekit.load(spec["model"], progress=False, quantize=spec.get("quantize"))
        else:
            model = moekit.load(spec["model"], max_memory=spec["budget"], progress=False,
                                quantize=spec.get("quantize"))
            model.offload.drop_page_cache = spec["cold"]
        out["load_s"] = time.perf_counter() - t0
        out["loaded_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if spec.get("text"):
            prompt = moekit.Tokenizer.from_pretrained(spec["model"]).encode(spec["text"])
        else:
            g = torch.Generator().manual_seed(0)
            prompt = torch.randint(3, model.config.vocab_size, (PROMPT,), generator=g).tolist()
        params = moekit.SamplingParams(max_new_tokens=spec["new"], temperature=0, ignore_eos=True)
        tokens, times = [], []
        for events in moekit.Engine(model).stream([prompt], params):
            times.append(time.perf_counter())
            tokens += [ev.token_id for ev in events]
        st = model.offload_stats()
        weights = (st["resident_bytes"] + st["capacity_bytes"] if st else
                   sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())))
        out.update(tokens=tokens, decode_tok_s=(len(times) - 1) / (times[-1] - times[0]), stats=st, weights=weights,
                   kernels=model.kernels.name)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       check=False)
    if p.returncode:
        raise SystemExit(f"child {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def ensure_model(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if BENCH_SERVE.is_dir():
        return BENCH_SERVE
    folder = Path(tempfile.mkdtemp(prefix="moekit-offload-"))
    sys.path.insert(0, str(ROOT))
    import torch

    import moekit
    from moekit.families import detect_family, get_family

    cfg = get_family(detect_family(SHAPE).name).to_config(dict(SHAPE), frozenset())
    model = moekit.MoEDecoder(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    moekit.save(model.to(torch.bfloat16), folder)
    return folder


def weight_files(model: Path) -> list[Path]:
    """A GGUF file, or a checkpoint folder's safetensors files."""
    return [model] if model.suffix == ".gguf" else sorted(model.glob("*.safetensors"))


def warm_page_cache(model: Path) -> None:
    for f in weight_files(model):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def measure(configs: list[tuple[str, dict]], rounds: int) -> dict[str, dict]:
    """Every config once per round, rounds interleaved (machine drift hits all alike): median tok/s,
    largest peak RSS; tokens must be the same in every round."""
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for _ in range(rounds):
        for label, spec in configs:
            if not spec.get("cold"):
                warm_page_cache(Path(spec["model"]))
            runs[label].append(run(spec))
    out = {}
    for label, rs in runs.items():
        r = dict(rs[-1])
        if "tokens" in r:
            r["same_every_round"] = all(x["tokens"] == r["tokens"] for x in rs)
            r["decode_tok_s_runs"] = [x["decode_tok_s"] for x in rs]
            r["decode_tok_s"] = statistics.median(r["decode_tok_s_runs"])
        r["peak_rss"] = max(x["peak_rss"] for x in rs)
        out[label] = r
    return out


def table(title: str, results: dict[str, dict], idle: int, reference: str) -> list[str]:
    ref = results[reference]["tokens"]
    lines = [title, (f"{'run':46} {'peak RSS':>8} {'-runtime':>8} {'weights':>7} {'budget':>7} {'tok/s':>6} "
                     f"{'hit rate':>8} {'read':>8}  tokens = in-memory")]

    def mib(n):
        return f"{n / 2**20:6.0f}M"

    for label, r in results.items():
        st, budget = r.get("stats") or {}, r.get("budget")
        lines.append(f"{label:46} {mib(r['peak_rss']):>8} {mib(r['peak_rss'] - idle):>8} "
                     f"{mib(r['weights']) if 'weights' in r else '':>7} {mib(budget * 2**30) if budget else '':>7} "
                     f"{r.get('decode_tok_s', 0):6.1f} {st.get('hit_rate', 0):8.1%} "
                     f"{st.get('bytes_read', 0) / 2**20:6.0f}M  {r['tokens'] == ref if 'tokens' in r else ''}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="checkpoint folder or GGUF file (default: bench-serve's mixtral-bf16, or one "
                                    "written here)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5, 0.65], help="max_memory values, GiB")
    ap.add_argument("--new", type=int, default=64, help="tokens to decode")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median tok/s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cold", type=float, nargs="*", default=[0.5, 0.65],
                    help="budgets also run with the page cache dropped (--cold alone: none)")
    ap.add_argument("--quantize", choices=["int8", "int4"],
                    help="quantise the matrices as they are read (a float or K-quant checkpoint), in memory and "
                         "offloaded")
    ap.add_argument("--trained", type=float, default=0.0145,
                    help="budget for the embedded (trained) model's run, a routing-locality data point; 0: skip")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    folder = ensure_model(args.model)
    size = sum(f.stat().st_size for f in weight_files(folder))
    base = {"model": str(folder), "new": args.new, "threads": args.threads, "cold": False, "kind": "load",
            "quantize": args.quantize}
    configs = [("idle: import torch, moekit", {**base, "kind": "idle"}),
               ("runtime: + CPU kernels, header, meta model", {**base, "kind": "runtime"}), ("in-memory", base)]
    for b in args.budgets:
        for cold in ([False, True] if b in args.cold else [False]):
            configs.append((f"offload {b:g} GiB" + (", cold" if cold else ""), {**base, "budget": b, "cold": cold}))
    results = measure(configs, args.rounds)
    for label, spec in configs:
        results[label]["budget"] = spec.get("budget")
    idle = results[configs[1][0]]["peak_rss"]  # the runtime baseline the budget does not cover
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    kind = "GGUF" if folder.suffix == ".gguf" else "safetensors"
    kind += f", quantised to {args.quantize} as read" if args.quantize else ""
    head = (f"{folder}: {size / 2**30:.2f} GiB of {kind}; {args.new} tokens greedy, {args.threads} threads, "
            f"median of {args.rounds} interleaved rounds; {cpu}; {datetime.date.today()}")
    lines = table(head, results, idle, "in-memory")
    trained = {}
    if args.trained:
        from_default = str(ROOT / "moekit" / "assets" / "default")
        tb = {**base, "model": from_default, "text": "And God said, Let there be light: and there was light. And"}
        tconf = [("in-memory", tb), (f"offload {args.trained:g} GiB", {**tb, "budget": args.trained})]
        trained = measure(tconf, 1)
        for label, spec in tconf:
            trained[label]["budget"] = spec.get("budget")
        lines += ["", *table(f"{from_default} (trained XVERSE-shaped, 16 experts top-4 x 4 layers)", trained, idle,
                             "in-memory")]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"model": str(folder), "checkpoint_bytes": size, "cpu": cpu,
                                        "platform": platform.platform(), "date": str(datetime.date.today()),
                                        "idle_rss": idle, "runs": results, "trained": trained,
                                        "table": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
