"""Training throughput: moekit's trainer against Hugging Face transformers on the same MoE, same batches.

    python bench/train_throughput.py [--json bench/results/train_cpu.json] [--rounds 5] [--steps 3]

Both sides train the same random-weight checkpoint (written once in the Qwen2-MoE layout,
fine-grained routed experts plus a gated shared expert, as XVERSE has) on the same token
batches: bf16 autocast over float32 master weights, AdamW, gradient clipping at 1.0, the
Switch balance loss at 0.01. moekit runs its real ``Trainer.train_step`` (data, routing
statistics and logging included); transformers runs ``Qwen2MoeForCausalLM`` with
``output_router_logits=True`` under each ``experts_implementation`` that suits the device
(``eager`` and ``grouped_mm``; ``batched_mm`` as well on a GPU), and the fastest is the peer.
Contenders alternate round by round; each keeps its median step time.

Model FLOPs utilisation is 6 x (active matmul parameters) + 12 x layers x seq x width
FLOPs per token (PaLM's count) over a bf16 matmul peak probed in the same run; it is
reported on any device, and is the headline figure on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import moekit
from moekit.train import TrainConfig
from moekit.train.bpe import train_bpe
from moekit.train.trainer import Trainer

CPU_MODEL = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
             "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256,
             "shared_expert_intermediate_size": 512, "vocab_size": 4096, "seq": 256, "batch": 8}
GPU_MODEL = {"hidden_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
             "num_experts": 64, "num_experts_per_tok": 6, "moe_intermediate_size": 1408,
             "shared_expert_intermediate_size": 2816, "vocab_size": 32000, "seq": 2048, "batch": 8}


def hf_config(shape: dict) -> dict:
    keys = {k: v for k, v in shape.items() if k not in ("seq", "batch")}
    return {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], **keys,
            "intermediate_size": 4 * shape["hidden_size"], "max_position_embeddings": 4096,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "router_aux_loss_coef": 0.01,
            "output_router_logits": True, "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 2}


def synthetic_corpus(folder: Path, vocab: int) -> tuple[Path, Path]:
    """A few MB of seeded word soup and a byte-level BPE trained on it (throughput does not care what it says)."""
    g = torch.Generator().manual_seed(0)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 9, (3000,), generator=g)]
    ids = torch.randint(0, len(words), (600_000,), generator=g).tolist()
    text = "\n\n".join(" ".join(words[i] for i in ids[j:j + 300]) for j in range(0, len(ids), 300))
    path = folder / "corpus.txt"
    path.write_text(text)
    train_bpe([path], folder / "tok", vocab)
    return path, folder / "tok"


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def probe_matmul_tflops(device) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    return 2 * n ** 3 * reps / _timed(lambda: [a @ b for _ in range(reps)]) / 1e12


def flops_per_token(cfg: moekit.ModelConfig, seq: int) -> float:
    _, active = moekit.count_params(cfg)
    matmul = active - cfg.vocab_size * cfg.hidden_size  # the embedding lookup is no matmul
    return 6 * matmul + 12 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim


class MoekitSide:
    def __init__(self, trainer: Trainer, batches: list):
        self.trainer, self.batches, self.i = trainer, batches, 0
        trainer.mixture.next_batch = self._next  # the same pre-drawn batches both sides see

    def _next(self, n):
        tokens = self.batches[self.i % len(self.batches)]
        self.i += 1
        return tokens, None, None

    def step(self) -> float:
        return self.trainer.train_step()["loss"]


class HFSide:
    def __init__(self, folder: Path, impl: str, device, batches: list):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                          experts_implementation=impl).to(device).train()
        # fused AdamW: what transformers' Trainer uses by default (optim="adamw_torch_fused")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=True)
        self.device, self.batches, self.i = device, batches, 0

    def step(self) -> float:
        x = torch.as_tensor(self.batches[self.i % len(self.batches)]).to(self.device)
        self.i += 1
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            out = self.model(input_ids=x[:, :-1], output_router_logits=True)
        lm = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), x[:, 1:].flatten())
        (lm + self.model.config.router_aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(lm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = GPU_MODEL if device.type == "cuda" else CPU_MODEL
    seq, batch = shape["seq"], shape["batch"]
    tmp = Path(tempfile.mkdtemp(prefix="moekit-train-bench-"))
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; corpus in {tmp}")
    corpus, tok = synthetic_corpus(tmp, shape["vocab_size"])
    hf = hf_config(shape)
    cfg = moekit.families.detect_family(hf).to_config(dict(hf), frozenset())
    model = moekit.MoEDecoder(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    moekit.save(model, tmp / "model")
    del model
    run = TrainConfig(model={"path": str(tmp / "model")}, tokenizer=str(tok), out_dir=str(tmp / "run"),
                      data={"seq_len": seq, "cache_dir": str(tmp / "cache"),
                            "sources": [{"name": "soup", "paths": [str(corpus)], "separator": "\n\n"}]},
                      steps=10 ** 6, batch_size=batch, precision="bf16", optim={"lr": 3e-4, "warmup": 1},
                      eval_every=0, save_every=0, export=False)
    trainer = Trainer(run, progress=False)
    batches = [trainer.mixture.next_batch(batch)[0] for _ in range(4)]  # seq + 1 tokens per row
    total, active = moekit.count_params(cfg)
    contenders = {"moekit": MoekitSide(trainer, batches)}
    impls = ["eager", "grouped_mm"] + (["batched_mm"] if device.type == "cuda" else [])
    for impl in impls:
        try:
            contenders[f"transformers[{impl}]"] = HFSide(tmp / "model", impl, device, batches)
        except Exception as e:  # an implementation this transformers / device lacks
            print(f"transformers[{impl}] unavailable: {e}")
    first_loss = {name: c.step() for name, c in contenders.items()}  # warm-up, and the same starting loss
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, c in contenders.items():
            times[name] += [_timed(c.step) for _ in range(args.steps)]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {batch * seq / statistics.median(t):.0f} tok/s" for n, t in times.items()))
    peak = probe_matmul_tflops(device)
    fpt = flops_per_token(cfg, seq)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
           "model": {**shape, "params": total, "active": active}, "bf16_matmul_tflops": peak,
           "flops_per_token": fpt, "first_step_loss": first_loss, "contenders": {}}
    for name, t in times.items():
        tps = batch * seq / statistics.median(t)
        res["contenders"][name] = {"tokens_per_s": tps, "step_s": statistics.median(t),
                                   "mfu": tps * fpt / (peak * 1e12)}
    peers = {n: v for n, v in res["contenders"].items() if n != "moekit"}
    best_peer = max(peers, key=lambda n: peers[n]["tokens_per_s"]) if peers else None
    if best_peer:
        res["peer"] = best_peer
        res["speedup"] = res["contenders"]["moekit"]["tokens_per_s"] / peers[best_peer]["tokens_per_s"]
    print(markdown(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_suffix(".tmp")
        tmp_json.write_text(json.dumps(res, indent=1))
        tmp_json.replace(args.json)


def markdown(r: dict) -> str:
    m = r["model"]
    lines = [f"{r['device']}, torch {r['torch']}, {r['threads']} threads, {r['date']}; bf16 matmul peak "
             f"{r['bf16_matmul_tflops']:.2f} TFLOP/s; model {m['params'] / 1e6:.0f}M params "
             f"({m['active'] / 1e6:.0f}M active), batch {m['batch']} x {m['seq']} tokens",
             "", "| trainer | tokens/s | step (s) | MFU | first-step loss |", "| --- | --- | --- | --- | --- |"]
    for name, c in r["contenders"].items():
        lines.append(f"| {name} | {c['tokens_per_s']:.0f} | {c['step_s']:.3f} | {100 * c['mfu']:.1f}% | "
                     f"{r['first_step_loss'][name]:.4f} |")
    if "speedup" in r:
        lines.append(f"\nmoekit / {r['peer']}: {r['speedup']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
