"""What bench/cpu_quant.py runs: the checkpoints, their GGUF exports, bytes per decode step, a llama.cpp worker.

- ``checkpoint``: the Mixtral shape is bench/serve_setup.py's 742M checkpoint (built there, reused from
  ``--cache``); the XVERSE shape is bench/cpu_generate.py's XVERSE-shaped model of the BENCHMARKS.md
  CPU tables (d 1024, 8 layers, MHA 16 heads, 64 experts of 448, top-6, shared width 896) written in
  XVERSE-MoE's own layout (two shared experts of 448, ungated), which ``moekit export`` writes as
  llama.cpp's ``bailingmoe``. Both get the Mixtral checkpoint's SentencePiece tokenizer (vocab 8000).
- ``gguf``: the same float checkpoint exported by ``moekit export --format gguf --type bf16|q8_0|q4_0``
  (moekit.weights.gguf_export), cached in <cache>/bench-quant/.
- ``step_bytes``: weight bytes one decode step reads, from the stored tensors themselves (moekit's
  state dict, the GGUF's tensor table): everything but the routed experts and the embedding, the
  routed experts a batch is expected to touch (uniform routing: E (1 - (1 - k/E)^B) per layer), one
  embedding row per sequence.
- ``--llama-worker``: llama.cpp through llama-cpp-python's low-level API in its own process (its
  OpenMP team never shares a process with torch's), driven by JSON lines on stdin/stdout.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF_TYPES = ("bf16", "q8_0", "q4_0")
SMOKE = {  # the same layouts, tiny (seconds to write, export and run)
    "mixtral": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 512},
    "xverse": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
               "num_experts": 16, "moe_top_k": 4, "intermediate_size": 64},
}


def shape(name: str, smoke: bool) -> dict:
    """config.json of shape ``name`` (imports torch and moekit: never in the llama.cpp worker)."""
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from cpu_generate import COMMON, SHAPES

    hf = {"mixtral": SHAPES["mixtral"],
          "xverse": {"architectures": ["XverseForCausalLM"], "model_type": "xverse", **COMMON,
                     "num_key_value_heads": 16, "num_experts": 64, "moe_top_k": 6, "num_shared_experts": 2,
                     "intermediate_size": 448}}[name]
    return {**hf, **(SMOKE[name] if smoke else {})}


def log(msg: str) -> None:
    print(f"[setup] {msg}", file=sys.stderr, flush=True)


def checkpoint(name: str, cache: Path, smoke: bool) -> Path:
    """The bf16 checkpoint folder of shape ``name`` (built once into ``cache``)."""
    import serve_setup
    import torch
    from cpu_generate import write_checkpoint

    hf = shape(name, smoke)
    mixtral = serve_setup.checkpoint(cache)  # also the tokenizer every shape uses
    if name == "mixtral" and not smoke:
        return mixtral
    folder = cache / "bench-quant" / f"{name}{'-smoke' if smoke else ''}-bf16"
    if not (folder / "tokenizer.model").exists():
        log(f"writing the {name}-shaped checkpoint to {folder}")
        write_checkpoint(hf, torch.bfloat16, folder)
        for f in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(mixtral / f, folder / f)
    return folder


def link_mixtral(cache: Path, smoke_cache: Path) -> None:
    """A throw-away cache for --smoke that sees the real Mixtral checkpoint (for its tokenizer) without a copy."""
    import serve_setup

    (smoke_cache / "bench-serve").mkdir(parents=True)
    (smoke_cache / "bench-serve" / "mixtral-bf16").symlink_to(serve_setup.checkpoint(cache))


def gguf(folder: Path, qtype: str, cache: Path, name: str) -> Path:
    """``folder`` exported by moekit to a GGUF of ``qtype``, cached as <cache>/bench-quant/<name>-<qtype>.gguf
    (never bench/serve_setup.py's mixtral-bf16.gguf, which llama.cpp's own converter wrote)."""
    from moekit.weights.gguf_export import export_checkpoint

    out = cache / "bench-quant" / f"{name}-{qtype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        log(f"moekit export --format gguf --type {qtype} --model {folder} --out {out}")
        export_checkpoint(folder, out, qtype, progress=False)
    return out


def touched(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a batch of ``batch`` tokens selects per layer (uniform routing)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def step_bytes(tensors, cfg, batch: int) -> int:
    """Weight bytes of one decode step of ``batch`` sequences; ``tensors``: (name, bytes) pairs of
    moekit's state dict or a GGUF file."""
    m, total = cfg.moe, 0.0
    for name, n in tensors:
        if ".experts." in name or "_exps" in name:  # routed experts [E, ...]
            total += n * touched(m.num_experts, m.top_k, batch) / m.num_experts
        elif name.startswith(("embed.", "token_embd.")):
            total += n * batch / cfg.vocab_size
        else:
            total += n
    return int(total)


def model_tensors(model) -> list[tuple[str, int]]:
    return [(k, v.numel() * v.element_size()) for k, v in model.state_dict().items()]


def gguf_tensors(path: Path) -> list[tuple[str, int]]:
    import gguf as gg

    return [(t.name, int(t.n_bytes)) for t in gg.GGUFReader(str(path)).tensors]


def kv_bytes(cfg, batch: int, context: int) -> int:
    """K and V of every layer, 2 bytes each (moekit's bf16 cache, llama.cpp's default F16), read by one step."""
    return 2 * 2 * batch * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context


# ---- llama.cpp, in its own process ----------------------------------------------------------------------

class LlamaWorker:
    """Client of ``python bench/cpu_quant_setup.py --llama-worker THREADS`` (stderr: llama.cpp's log)."""

    def __init__(self, threads: int, log_path: Path):
        self.log_path, self.info = log_path, {}
        with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, __file__, "--llama-worker", str(threads)], text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)

    def call(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(f"llama.cpp worker died (exit status {rc}) during {req['op']}; see {self.log_path}")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"llama.cpp worker: {req['op']}: {res['error']} (log: {self.log_path})")
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


class _Llama:
    """One GGUF and a context for up to ``n_seq`` sequences (non-unified KV: n_ctx / n_seq cells each)."""

    def __init__(self, L, path: str, threads: int, n_seq: int, n_ctx_seq: int, mmap: bool):
        import numpy as np

        self.L, self.np = L, np
        mp = L.llama_model_default_params()
        mp.use_mmap, mp.n_gpu_layers = mmap, 0
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_seq * n_ctx_seq, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(512, 0, 1)

    def decode(self, items) -> None:
        """items: (token, position, sequence, wants logits) of one llama_batch."""
        b = self.batch
        for i, (t, p, s, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, out
            b.seq_id[i][0] = s
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, i: int):
        return self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def generate(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        """Greedy: all prompts in one batch (one sequence id each), then n - 1 steps of one token per sequence;
        also the seconds of those steps (from the first tokens to the last)."""
        self.clear()
        P = len(prompts[0])
        self.decode([(t, p, s, p == P - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)])
        last = [int(self.logits(s * P + P - 1).argmax()) for s in range(len(prompts))]
        out, t0 = [[t] for t in last], time.perf_counter()
        for step in range(n - 1):
            self.decode([(t, P + step, s, True) for s, t in enumerate(last)])
            last = [int(self.logits(s).argmax()) for s in range(len(prompts))]
            for o, t in zip(out, last):
                o.append(t)
        return out, time.perf_counter() - t0

    def prefill(self, ids: list[int]) -> None:
        self.clear()
        self.decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        self.logits(len(ids) - 1)

    def all_logits(self, ids: list[int]):
        self.clear()
        self.decode([(t, p, 0, True) for p, t in enumerate(ids)])
        return self.np.stack([self.logits(i) for i in range(len(ids))])


def worker(threads: int) -> None:
    import llama_cpp as L

    proto, sys.stdout = sys.stdout, sys.stderr  # anything printed goes to the log, not the protocol
    L.llama_backend_init()
    models: dict[str, _Llama] = {}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            op = req["op"]
            if op == "info":
                res = {"system_info": L.llama_print_system_info().decode().strip(), "version": L.__version__}
            elif op == "load":
                models[req["name"]] = _Llama(L, req["path"], threads, req["n_seq"], req["n_ctx_seq"], req["mmap"])
                res = {"n_vocab": models[req["name"]].n_vocab}
            else:
                m, t = models[req["name"]], time.perf_counter()
                if op == "generate":
                    tokens, seconds = m.generate(req["prompts"], req["n"])
                    res = {"seconds": seconds, "decoded": len(tokens) * (req["n"] - 1), "tokens": tokens}
                elif op == "prefill":
                    m.prefill(req["ids"])
                    res = {"seconds": time.perf_counter() - t}
                elif op == "logits":
                    a = m.all_logits(req["ids"]).astype("float32")
                    res = {"shape": list(a.shape), "logits": base64.b64encode(a.tobytes()).decode()}
                else:
                    raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001 (reported to the client, which raises it)
            res = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(res) + "\n")
        proto.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--llama-worker"]:
        worker(int(sys.argv[2]))
    else:
        sys.exit("usage: python bench/cpu_quant_setup.py --llama-worker THREADS (started by bench/cpu_quant.py)")
