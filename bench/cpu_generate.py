"""CPU generation speed: moekit against Hugging Face transformers on the same random-weight checkpoints.

    python bench/cpu_generate.py                 # both shapes, bfloat16, 2 threads
    python bench/cpu_generate.py --dtype float32 --shapes mixtral

Both stacks load the same checkpoint folder (written by moekit in the family's
Hugging Face layout) and are timed the same way, in the same process:

- decode tok/s: time(prompt -> 1 + N new tokens) - time(prompt -> 1 new token),
  N = 64, greedy, EOS ignored; batch 1 and batch 8 (8 different random prompts of 32 tokens);
- prefill tok/s: one forward pass over 512 tokens, logits for the last position only;
- every metric is measured round-robin over all contenders (best of 3), so machine drift
  during the run hits every contender alike;
- floor: bytes read per decode step (active weights + one embedding row + KV cache)
  divided by a copy bandwidth probed in this run (bytes read + written per second); each
  decode round is paired with its own probe (this machine's bandwidth drifts), and the
  "% of floor" column is the median over rounds;

- contention: decode at batch 1 again while a second process keeps one core busy (a Python
  spin loop, started before and stopped after each contender's round), median of the rounds.

transformers runs every ``experts_implementation`` that suits a CPU (eager and
grouped_mm; batched_mm is documented as unsuitable there) and the best is the peer.
The CPU model, its ISA extensions and the kernel path of every op are printed and recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moekit  # noqa: E402
from moekit.engine import Engine, SamplingParams  # noqa: E402
from moekit.families import get_family  # noqa: E402
from moekit.machine import cpu_info, isa  # noqa: E402

COMMON = {"vocab_size": 8000, "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "bos_token_id": 1,
          "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu"}
SHAPES = {
    # performance.md section 11: the APUS / Orion (Mixtral) layout, 742M parameters, 8 x 3584 top-2
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **COMMON,
                "num_key_value_heads": 4, "intermediate_size": 3584, "num_local_experts": 8,
                "num_experts_per_tok": 2},
    # XVERSE-shaped: 64 fine-grained experts (1/8 of the Mixtral shape's), top-6, 2 shared, MHA;
    # Qwen2-MoE's classes are transformers' stand-in for routed + shared experts (no q/k/v bias here)
    "xverse": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **COMMON,
               "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 6,
               "moe_intermediate_size": 448, "shared_expert_intermediate_size": 896, "intermediate_size": 896,
               "norm_topk_prob": True, "qkv_bias": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
}
PROMPT, NEW, PREFILL = 32, 64, 512


def best(fn, repeat: int = 3) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeat))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def probe_copy_gbs() -> float:
    """Median of 7 timed copies of 256 MiB (bytes read + written per second)."""
    a = torch.ones(256 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() / statistics.median(_timed(lambda: b.copy_(a)) for _ in range(7)) / 1e9


def probe_matmul_gflops(dtype) -> float:
    x, w = torch.randn(512, 4096).to(dtype), torch.randn(4096, 4096).to(dtype)
    return 2 * 512 * 4096 * 4096 / best(lambda: x @ w.T, 3) / 1e9


def write_checkpoint(hf: dict, dtype, folder: Path) -> moekit.ModelConfig:
    cfg = get_family(moekit.families.detect_family(hf).name).to_config(dict(hf), frozenset())
    model = moekit.MoEDecoder(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    moekit.save(model.to(dtype), folder)
    return cfg


def bytes_per_step(cfg: moekit.ModelConfig, batch: int, context: int, elt: int) -> float:
    """Weights read by one decode step (each touched expert once) plus the KV cache."""
    total, active = moekit.count_params(cfg)
    m = cfg.moe
    per_expert = 3 * cfg.hidden_size * m.expert_width
    routed_active = cfg.num_layers * m.top_k * per_expert
    touched = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** batch)  # expected, uniform routing
    weights = active - routed_active + cfg.num_layers * touched * per_expert - (cfg.vocab_size - batch) * cfg.hidden_size
    kv = batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * context
    return (weights + kv) * elt


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=g).tolist()


class Moekit:
    """moekit's engine on the checkpoint (kernels chosen by ``auto``)."""

    def __init__(self, folder: Path, dtype, governor: bool = True):
        self.model = moekit.load(folder, dtype=dtype, kernels="auto")
        self.engine = Engine(self.model, adapt_threads=governor)
        self.name = f"moekit ({self.model.kernels.name} kernels{'' if governor else ', fixed threads'})"

    def generate(self, batch: int, n: int) -> None:
        self.engine.generate(prompts(batch, PROMPT, batch),
                             SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))

    def prefill(self, ids: torch.Tensor) -> None:
        with torch.inference_mode():
            self.model(ids, last_only=True)


class Transformers:
    """transformers' generate on the same checkpoint, with one experts_implementation."""

    def __init__(self, folder: Path, dtype, impl: str):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                                        experts_implementation=impl).eval()
        self.name, self.impl = f"transformers ({impl})", impl

    def generate(self, batch: int, n: int) -> None:
        ids = torch.tensor(prompts(batch, PROMPT, batch))
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)

    def prefill(self, ids: torch.Tensor) -> None:
        with torch.inference_mode():
            self.model(ids, logits_to_keep=1)


def measure(contenders: list, floor_bytes, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Each metric measured round-robin over the contenders, so drift hits all alike.

    tok/s is the best round. Each decode round is paired with a copy-bandwidth probe taken just
    before it, and "% of floor" is the median over rounds of tok/s / (probed bandwidth / bytes per token),
    because this machine's bandwidth moves during a run.
    """
    out = {c.name: {} for c in contenders}
    ids = torch.tensor(prompts(1, PREFILL, 99))
    for c in contenders:  # warm-up
        c.generate(1, 2)
        c.prefill(ids)
    for batch in (1, 8):
        metric, speeds, pcts = f"decode_b{batch}", {c.name: [] for c in contenders}, {c.name: [] for c in contenders}
        for _ in range(rounds):
            floor = probe_copy_gbs() * 1e9 / floor_bytes(batch) * batch
            for c in contenders:
                full = _timed(lambda: c.generate(batch, NEW + 1))
                one = _timed(lambda: c.generate(batch, 1))
                speeds[c.name].append(batch * NEW / (full - one))
                pcts[c.name].append(100 * speeds[c.name][-1] / floor)
        for c in contenders:
            out[c.name][metric] = max(speeds[c.name])
            out[c.name][metric + "_pct_floor"] = statistics.median(pcts[c.name])
    best_p = {c.name: float("inf") for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            best_p[c.name] = min(best_p[c.name], _timed(lambda: c.prefill(ids)))
    for c in contenders:
        out[c.name]["prefill"] = PREFILL / best_p[c.name]
    return out


# a busy process that ends itself if this one dies (or after 10 minutes), so no spinner outlives the run
SPIN = ("import os, time\np, end = os.getppid(), time.monotonic() + 600\n"
        "while os.getppid() == p and time.monotonic() < end: pass")


def measure_contended(contenders: list, rounds: int = 3) -> dict[str, float]:
    """Decode tok/s at batch 1 while another process spins on one core (median of ``rounds``)."""
    speeds = {c.name: [] for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            spin = subprocess.Popen([sys.executable, "-c", SPIN])
            try:
                time.sleep(0.3)
                c.generate(1, 8)  # warm-up under load (moekit's thread governor finds the free cores here)
                full = _timed(lambda: c.generate(1, NEW + 1))
                one = _timed(lambda: c.generate(1, 1))
            finally:
                spin.kill()
                spin.wait()
            speeds[c.name].append(NEW / (full - one))
    return {name: statistics.median(v) for name, v in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="mixtral,xverse")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-impls", default="eager,grouped_mm")
    ap.add_argument("--no-contention", action="store_true", help="skip decode beside a busy process")
    ap.add_argument("--no-governor", action="store_true", help="moekit on a fixed thread count (no thread governor)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    elt = torch.finfo(dtype).bits // 8
    import transformers

    model_name = cpu_info()["model"] or platform.processor() or platform.machine()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{model_name}, {args.threads} threads",
               "cpu": model_name, "isa": isa(), "torch": torch.__version__,
               "transformers": transformers.__version__, "dtype": args.dtype,
               "matmul_gflops": probe_matmul_gflops(dtype), "shapes": {}}
    print(f"{model_name}; ISA: {' '.join(results['isa'])}", flush=True)
    copies = [probe_copy_gbs()]  # probed again before every model; the floor uses the median
    results["copy_gbs"] = copies[0]
    print(f"copy bandwidth {results['copy_gbs']:.1f} GB/s (read + write), "
          f"{args.dtype} matmul {results['matmul_gflops']:.0f} GFLOP/s", flush=True)
    for name in args.shapes.split(","):
        copies.append(probe_copy_gbs())
        results["copy_gbs"] = statistics.median(copies)
        results["copy_gbs_range"] = [min(copies), max(copies)]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = write_checkpoint(SHAPES[name], dtype, Path(tmp))
            total, active = moekit.count_params(cfg)
            ours = Moekit(Path(tmp), dtype, governor=not args.no_governor)
            peers = [Transformers(Path(tmp), dtype, impl) for impl in args.hf_impls.split(",")]
            paths = ours.model.kernels.describe()
            print("\n".join(paths), flush=True)
            speeds = measure([ours, *peers], lambda b: bytes_per_step(cfg, b, PROMPT + NEW // 2, elt))
            if not args.no_contention:
                for who, v in measure_contended([ours, *peers]).items():
                    speeds[who]["decode_b1_contended"] = v
            del ours.model, ours.engine
            for p in peers:
                del p.model
        for who, row in speeds.items():
            print(f"[{name}] {who}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        copies.append(probe_copy_gbs())
        rows = {}
        for metric in ("decode_b1", "decode_b8", "prefill", "decode_b1_contended"):
            if metric not in speeds[ours.name]:
                continue
            mine = speeds[ours.name][metric]
            peer = max(peers, key=lambda p: speeds[p.name][metric])
            theirs = speeds[peer.name][metric]
            row = {"moekit": mine, "transformers": theirs, "transformers_impl": peer.impl, "ratio": mine / theirs}
            if metric in ("decode_b1", "decode_b8"):
                batch = int(metric[-1])
                row.update(floor=results["copy_gbs"] * 1e9 / bytes_per_step(cfg, batch, PROMPT + NEW // 2, elt) * batch,
                           moekit_pct_floor=speeds[ours.name][metric + "_pct_floor"],
                           transformers_pct_floor=speeds[peer.name][metric + "_pct_floor"])
            rows[metric] = row
        results["shapes"][name] = {"params_total": total, "params_active": active, "moekit": ours.name,
                                   "kernel_paths": paths, "metrics": rows, "all": speeds}
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def markdown(r: dict) -> str:
    lo, hi = r["copy_gbs_range"]
    isa = f" ({' '.join(r['isa'])})" if r.get("isa") else ""
    lines = [f"{r['date']}, {r['machine']}{isa}, torch {r['torch']}, "
             f"transformers {r['transformers']}, {r['dtype']}; "
             f"copy {r['copy_gbs']:.1f} GB/s (median; {lo:.1f}-{hi:.1f}), matmul {r['matmul_gflops']:.0f} GFLOP/s", "",
             "| model | metric | moekit | transformers (best impl) | ratio | moekit % floor | transformers % floor |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    names = {"decode_b1": "decode, batch 1 (tok/s)", "decode_b8": "decode, batch 8 (tok/s)",
             "prefill": f"prefill, {PREFILL} tokens (tok/s)",
             "decode_b1_contended": "decode, batch 1, one core busy (tok/s)"}
    for shape, s in r["shapes"].items():
        label = f"{shape} ({s['params_total'] / 1e6:.0f}M, {s['params_active'] / 1e6:.0f}M active)"
        for metric, row in s["metrics"].items():
            pct = (f"{row['moekit_pct_floor']:.0f}%", f"{row['transformers_pct_floor']:.0f}%") \
                if "floor" in row else ("", "")
            lines.append(f"| {label} | {names[metric]} | {row['moekit']:.1f} | {row['transformers']:.1f} "
                         f"({row['transformers_impl']}) | {row['ratio']:.2f}x | {pct[0]} | {pct[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
