"""moekit on one GPU against Hugging Face transformers, with the ceilings probed in the same run.

    PYTHONPATH=. python3 bench/gpu.py                    # everything, about 10 minutes on an H100
    PYTHONPATH=. python3 bench/gpu.py --parts block      # only the MoE-block table
    PYTHONPATH=. python3 bench/gpu.py --smoke            # tiny shapes on the CPU (TRITON_INTERPRET=1)

Sections, in this order (results are written after each one, so a run cut short keeps them):

1. probes: device copy bandwidth (bytes read + written / s) and bf16 8192^3 matmul rate;
2. block: one MoE block (router, routed + shared experts) at the XVERSE and Mixtral shapes
   for 1, 2, 4, ..., 4096 tokens: moekit (and its decode / grouped paths up to 64 tokens)
   vs transformers' eager, batched_mm and grouped_mm experts on the same weights
   (Qwen2-MoE's block for XVERSE: routed + gated shared experts; Mixtral's block);
3. model: the whole XVERSE-MoE-A4.2B preset with random bf16 weights (``--layers`` to
   shrink it): decode tok/s at batch 1 and 16 (64 new tokens after a 32-token prompt,
   greedy, timed from the first to the last new token), prefill of 2048 tokens;
4. hf-model: the same shapes in transformers' Qwen2-MoE classes (XVERSE is not in
   transformers; Qwen2-MoE has routed + shared experts, plus a shared-expert gate and
   q/k/v biases, about 0.01% more work): grouped_mm experts with the static cache
   (compiled by transformers: its fastest documented decode path) and the default cache.

Results: $OUT (default bench/results/) gpu-<date>.json and .md. Floors: bench/gpu_report.py.
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before torch / triton are imported: the kernels are built for the interpreter when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_report as rep  # noqa: E402

import moekit  # noqa: E402
from moekit.config import ModelConfig, MoEConfig  # noqa: E402
from moekit.engine import Engine, SamplingParams  # noqa: E402

BLOCK_SHAPES = {  # D, F, E, K, Fs, shared gate (performance.md section 0)
    "xverse": (2560, 1728, 64, 6, 3456, True),
    "mixtral": (4096, 14336, 8, 2, 0, False),
    "orion": (4096, 14592, 8, 2, 0, False),
}
SMOKE_SHAPES = {"xverse": (64, 32, 8, 3, 64, True), "mixtral": (64, 96, 4, 2, 0, False)}


class Clock:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, cuda: bool, once: bool = False):
        self.cuda, self.once = cuda, once  # once: a single untimed-warmup-free call (interpreted smoke runs)

    def __call__(self, fn, reps: int = 5, warmup: int = 2) -> float:
        if self.once:
            reps, warmup = 1, 0
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def device_info(cuda: bool) -> dict:
    import transformers
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if cuda else "CPU (smoke run)",
            "driver": "n/a"}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def probes(clock: Clock, dev: str) -> dict:
    n = (64 << 20) if SMOKE else (2 << 30)
    a = torch.ones(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    copy = 2 * n / clock(lambda: b.copy_(a), reps=10)
    s = 512 if SMOKE else 8192
    x, w = torch.randn(s, s, device=dev, dtype=torch.bfloat16), torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    mm = 2 * s ** 3 / clock(lambda: x @ w, reps=10)
    return {"copy_tbs": copy / 1e12, "matmul_tflops": mm / 1e12}


# ----------------------------------------------------------------------------- one MoE block
def block_config(D, F, E, K, Fs, gate) -> ModelConfig:
    """A one-layer config around the block (router logits in the activation dtype, as transformers computes them)."""
    return ModelConfig(vocab_size=256, hidden_size=D, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=2,
                       moe=MoEConfig(num_experts=E, top_k=K, expert_width=F, shared_width=Fs, shared_gate=gate,
                                     router_fp32=False))


def hf_block(D, F, E, K, Fs, gate, ours, dev):
    """transformers' block with moekit's weights (Qwen2-MoE's with a shared expert, else Mixtral's)."""
    if Fs:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                             shared_expert_intermediate_size=Fs, norm_topk_prob=True)
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
    with torch.device("meta"):
        block = Block(cfg)
    block = block.to(torch.bfloat16).to_empty(device=dev).eval()
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.proj.weight)
        block.experts.gate_up_proj.copy_(ours.experts.w13)
        block.experts.down_proj.copy_(ours.experts.w2)
        if Fs:
            block.shared_expert.gate_proj.weight.copy_(ours.shared.w13[:Fs])
            block.shared_expert.up_proj.weight.copy_(ours.shared.w13[Fs:])
            block.shared_expert.down_proj.weight.copy_(ours.shared.w2)
            block.shared_expert_gate.weight.copy_(ours.shared_gate.weight)
    return block, cfg


def bench_block(name, shape, tokens, clock, probe, dev, errors) -> list[dict]:
    from moekit.kernels import get_backend
    from moekit.kernels.triton.moe import fused_moe, pick_path
    from moekit.models.moe import MoE

    D, F, E, K, Fs, gate = shape
    with torch.device("meta"):
        ours = MoE(block_config(*shape), 0, get_backend("triton"))
    ours = ours.to(torch.bfloat16).to_empty(device=dev).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    theirs, hf_cfg = hf_block(*shape, ours, dev)
    rows = []
    for T in tokens:
        x = torch.randn(1, T, D, device=dev, dtype=torch.bfloat16)
        row = {"tokens": T, "shape_text": f"d {D}, {E} x {F}, top-{K}" + (f", shared {Fs}" if Fs else ""),
               "hf_ms": {}}
        with torch.inference_mode():
            r = ours.router(x.view(T, D))
            touched = int(r.ids_TK.unique().numel())
            row["moekit_ms"] = 1e3 * clock(lambda: ours(x))
            row["path"] = pick_path(T, K, E)
            if T <= 64:
                sh = None if not Fs else (ours.shared.w13, ours.shared.w2,
                                          torch.sigmoid(ours.shared_gate(x.view(T, D))).view(-1) if gate else None)
                for path in ("decode", "grouped"):
                    row[f"{path}_ms"] = 1e3 * clock(lambda: fused_moe(x.view(T, D), ours.experts.w13, ours.experts.w2,
                                                                      r.ids_TK, r.weights_TK, sh, path=path))
            if T == min(16, max(tokens)):  # same weights, same function: check before timing transformers
                hf_cfg._experts_implementation = "eager"
                b = theirs(x)
                a, b = ours(x).float(), (b[0] if isinstance(b, tuple) else b).float()
                row["max_rel_diff_vs_transformers"] = float((a - b).abs().max() / b.abs().max())
            for impl in ("eager", "batched_mm", "grouped_mm"):
                gathered = T * K * 3 * D * F * 2  # batched_mm copies every (token, expert) weight slice
                if impl == "batched_mm" and gathered > 16e9:
                    row["hf_ms"][impl] = None
                    continue
                hf_cfg._experts_implementation = impl
                try:
                    row["hf_ms"][impl] = 1e3 * clock(lambda: theirs(x), reps=3, warmup=1)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    row["hf_ms"][impl] = None
                    errors.append(f"block {name} T={T} transformers {impl}: {type(e).__name__}: {str(e)[:120]}")
                    release(dev)
        row["floor_ms"] = 1e3 * rep.block_floor_s(D, F, E, K, Fs, T, touched, probe["copy_tbs"] * 1e12,
                                                  probe["matmul_tflops"] * 1e12)
        rows.append(row)
        print(f"  [{name}] T={T}: moekit {row['moekit_ms']:.3f} ms, floor {row['floor_ms']:.3f} ms, "
              f"transformers {row['hf_ms']}", flush=True)
    return rows


# ----------------------------------------------------------------------------- whole model
def prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_config(args) -> ModelConfig:
    if SMOKE:
        return ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                           moe=MoEConfig(num_experts=8, top_k=3, expert_width=32, shared_width=64,
                                         renormalize_eps=1e-6), max_position_embeddings=512, family="xverse")
    cfg = moekit.preset("xverse-moe-a4.2b")
    return cfg if args.layers >= cfg.num_layers else cfg.replace(num_layers=args.layers)


def decode_rate(stamps: list[float], batch: int) -> float:
    """Tokens per second between the first and the last new token (prefill excluded)."""
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_moekit_model(cfg, args, clock, dev) -> dict:
    from moekit.weights.load import materialize

    model = materialize(cfg, torch.bfloat16, dev, "triton")
    model.init_weights(std=0.02)
    model.eval()
    engine = Engine(model, cuda_graph=True)  # captured on CUDA; the same fixed-shape step, uncaptured, in --smoke
    out = {"kernels": model.kernels.name, "cuda_graph": engine.graphs is not None and engine.graphs.capture}
    for batch in (1, args.batch):
        ids = prompts(batch, args.prompt, cfg.vocab_size, batch).tolist()
        params = SamplingParams(max_new_tokens=args.new, temperature=0, ignore_eos=True)
        best = 0.0
        for i in range(2 if SMOKE else 3):  # the first round captures the graph and autotunes the kernels
            stamps = []
            for _ in engine.stream(ids, params):
                stamps.append(time.perf_counter())
            best = max(best, decode_rate(stamps, batch)) if i else best
        out[f"decode_b{batch}"] = best
    ids = prompts(1, args.prefill, cfg.vocab_size, 7).to(dev)
    with torch.inference_mode():
        out["prefill"] = args.prefill / clock(lambda: model(ids, last_only=True), reps=3, warmup=1)
    return out  # the model and its graphs are freed with this frame


def bench_hf_model(cfg, args, clock, dev, errors) -> dict:
    """transformers' Qwen2-MoE classes at the same shapes: grouped_mm experts, static (compiled) and default cache."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    m = cfg.moe
    hf_cfg = Qwen2MoeConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                            moe_intermediate_size=m.expert_width, shared_expert_intermediate_size=m.shared_width,
                            intermediate_size=m.shared_width, num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                            norm_topk_prob=True, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                            max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                            decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=False)
    hf_cfg._experts_implementation = "grouped_mm"
    with torch.device(dev):
        model = Qwen2MoeForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16)
    model.eval()
    out: dict[str, dict] = {"decode_b1": {}, f"decode_b{args.batch}": {}, "prefill": {}}
    caches = [("static cache, compiled", "static")] if (dev == "cuda" and not args.no_hf_compile) else []
    caches.append(("default cache", None))
    for label, cache in caches:
        for batch in (1, args.batch):
            if cache is None and batch != 1:
                continue
            ids = prompts(batch, args.prompt, cfg.vocab_size, batch).to(dev)
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                      do_sample=False, pad_token_id=0, cache_implementation=cache)
            try:
                best = 0.0
                for i in range(2):  # the first round compiles (static cache)
                    s = Stamps()
                    with torch.inference_mode():
                        model.generate(ids, streamer=s, **kw)
                    best = max(best, decode_rate(s.t[1:], batch)) if i else best  # s.t[0]: the prompt
                out[f"decode_b{batch}"][label] = best
            except (torch.OutOfMemoryError, RuntimeError) as e:
                errors.append(f"transformers {label} batch {batch}: {type(e).__name__}: {str(e)[:160]}")
            print(f"  transformers {label} batch {batch}: {out[f'decode_b{batch}'].get(label)}", flush=True)
    ids = prompts(1, args.prefill, cfg.vocab_size, 7).to(dev)
    with torch.inference_mode():
        out["prefill"]["grouped_mm"] = args.prefill / clock(lambda: model(ids, logits_to_keep=1, use_cache=False),
                                                            reps=3, warmup=1)
    return out


def release(dev: str) -> None:
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="probes,block,model,hf-model", help="comma-separated sections to run")
    ap.add_argument("--shapes", default="xverse,mixtral", help=f"block shapes, of {', '.join(BLOCK_SHAPES)}")
    ap.add_argument("--max-tokens", type=int, default=4096, help="largest block token count (powers of two)")
    ap.add_argument("--layers", type=int, default=28, help="decoder layers of the XVERSE-sized model (28 = full)")
    ap.add_argument("--batch", type=int, default=16, help="the larger decode batch")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="new tokens per decode measurement")
    ap.add_argument("--prefill", type=int, default=2048, help="prefill length")
    ap.add_argument("--no-hf-compile", action="store_true", help="skip transformers' compiled static-cache path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not SMOKE
    if not cuda and not SMOKE:
        raise SystemExit("bench/gpu.py needs a CUDA GPU (or --smoke for a CPU dry run)")
    if SMOKE:
        args.max_tokens, args.batch, args.prompt, args.new, args.prefill = 4, 2, 5, 3, 16
    dev, clock = ("cuda" if cuda else "cpu"), Clock(cuda, once=SMOKE)
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    stem = f"gpu-{time.strftime('%Y-%m-%d')}" + ("-smoke" if SMOKE else "")
    r = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
         "device": device_info(cuda), "errors": []}
    parts, start = args.parts.split(","), time.perf_counter()
    print(f"{r['device']}", flush=True)
    from moekit.kernels.triton.interpret import numpy_compat

    def section(what: str, fn):
        """Run one part; a failure is recorded and the next part still runs."""
        print(f"{what} ({time.perf_counter() - start:.0f} s in)", flush=True)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one GPU run should report every part it can
            r["errors"].append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        finally:
            release(dev)
            rep.save(r, out, stem)

    with numpy_compat():
        r["probes"] = probes(clock, dev)
        print(f"probes: {r['probes']}", flush=True)
        rep.save(r, out, stem)
        if "block" in parts:
            shapes = SMOKE_SHAPES if SMOKE else BLOCK_SHAPES
            tokens = [2 ** i for i in range(args.max_tokens.bit_length())]
            r["block"] = {}
            for name in args.shapes.split(","):
                rows = section(f"block {name}", lambda: bench_block(name, shapes[name], tokens, clock, r["probes"],
                                                                    dev, r["errors"]))
                if rows:
                    r["block"][name] = rows
        cfg = model_config(args)
        total, active = moekit.count_params(cfg)
        bw, peak = r["probes"]["copy_tbs"] * 1e12, r["probes"]["matmul_tflops"] * 1e12
        context = args.prompt + args.new // 2
        r["model"] = {"name": "xverse-moe-a4.2b" + ("" if cfg.num_layers == 28 else f", {cfg.num_layers} layers"),
                      "params": total, "active": active, "layers": cfg.num_layers, "prefill_tokens": args.prefill,
                      "hf_class": "Qwen2MoeForCausalLM (grouped_mm experts)", "moekit": {}, "transformers": {},
                      "floors": {"decode_b1": bw / rep.decode_bytes(cfg, 1, context),
                                 f"decode_b{args.batch}": args.batch * bw / rep.decode_bytes(cfg, args.batch, context),
                                 "prefill": args.prefill * peak / rep.prefill_flops(cfg, args.prefill)}}
        if "model" in parts:
            r["model"]["moekit"] = section("moekit model", lambda: bench_moekit_model(cfg, args, clock, dev)) or {}
            print(f"  {r['model']['moekit']}", flush=True)
        if "hf-model" in parts:
            r["model"]["transformers"] = section("transformers model",
                                                 lambda: bench_hf_model(cfg, args, clock, dev, r["errors"])) or {}
        r["seconds"] = time.perf_counter() - start
        rep.save(r, out, stem)
    print(rep.markdown(r))
    print(f"wrote {out / stem}.json and .md ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
