"""Held-out perplexity at bfloat16, int8 and int4 weights (issue 18, item 3; docs/quantization.md).

    python bench/quant_quality.py --model moekit/assets/default --data recipes/embedded/data/kjv.txt \
        recipes/embedded/data/en.txt recipes/embedded/data/zh.txt --separator '\n%\n' \
        --out bench/results/DATE/quant_quality_embedded.json
    python bench/quant_quality.py --model runs/kjv/model --tokenizer recipes/kjv/data/tokenizer \
        --data recipes/kjv/data/kjv.txt --separator '\n\n' --out bench/results/DATE/quant_quality_kjv.json

Every held-out document of each data file (moekit.train.data.is_heldout: every 50th document,
the rule training used with ``heldout: 0.02``) is scored whole, BOS to EOS, in windows of
``--window`` tokens (moekit.models.loss.window_nll). The same weights are loaded once per
variant: the checkpoint in bfloat16, then quantised at load time (int8 per output channel,
int4 with groups of 32 / 64 / 128); the computation runs in bfloat16 on the chosen kernels.

``--llama-quantize TYPE`` (Q4_K_M, Q2_K, ...; needs llama-cpp-python) also scores the checkpoint as
llama.cpp's quantizer writes it: exported to an F16 GGUF by moekit, quantised to TYPE by
``llama_model_quantize``, then loaded as moekit loads such a file (every block dequantised to
bfloat16) and quantised again as it is read (``quantize=``, each variant but bf16): what
``moekit.load("x.Q4_K_M.gguf", quantize="int4")`` costs over the file's own precision.

``--decode`` scores the same tokens one at a time through a KV cache (each window from an empty
cache), so that on ``--kernels cpu`` the decode kernels produce every logit. On ``--kernels cpu`` both
passes quantise the activations to int8 for per-channel int8 and int4 weights (the window pass through
the prefill kernels; docs/quantization.md, "Kernels"); the reference kernels never do.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moekit  # noqa: E402
from moekit.engine.kv_cache import KVCache  # noqa: E402
from moekit.machine import cpu_info  # noqa: E402
from moekit.models.loss import window_nll  # noqa: E402
from moekit.train.data import is_heldout  # noqa: E402

VARIANTS = {"bf16": None, "int8": ("int8", None), "int4-g32": ("int4", 32), "int4-g64": ("int4", 64),
            "int4-g128": ("int4", 128)}


def heldout_rows(tok, files: list[Path], separator: str, fraction: float) -> list[list[int]]:
    rows = []
    for f in files:
        docs = [d.strip() for d in f.read_text(encoding="utf-8").split(separator) if d.strip()]
        rows += [tok.encode(d) + [tok.eos_token_id] for i, d in enumerate(docs) if is_heldout(i, fraction)]
    return rows


def decode_nll(model, ids: list[int]) -> tuple[float, int]:
    """Summed next-token NLL of ids[1:], each logit from a one-token step through a KV cache."""
    cache = KVCache(model.config, 1, len(ids), model.embed.weight.dtype)
    total = 0.0
    for i in range(len(ids) - 1):
        logits = model(torch.tensor([[ids[i]]]), cache=cache)[0, -1].float()
        total -= float(torch.log_softmax(logits, -1)[ids[i + 1]])
    return total, len(ids) - 1


@torch.no_grad()
def mean_loss(model, rows: list[list[int]], window: int, decode: bool = False) -> tuple[float, int]:
    total, count = 0.0, 0
    for ids in rows:
        for s in range(0, len(ids) - 1, window):
            part = ids[s:s + window + 1]
            nll, n = decode_nll(model, part) if decode else window_nll(model, torch.tensor(part)[None])
            total, count = total + float(nll), count + int(n)
    return total / count, count


def llama_quantized(folder: Path, ftype: str) -> Path:
    """``folder`` exported to an F16 GGUF by moekit, then quantised to ``ftype`` by llama.cpp (a temporary file)."""
    import tempfile

    import llama_cpp

    from moekit.weights.gguf_export import export_checkpoint

    out = Path(tempfile.mkdtemp(prefix="moekit-quality-"))
    f16 = export_checkpoint(folder, out / "model-f16.gguf", "f16", progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out / f"model-{ftype}.gguf").encode(), params):
        raise SystemExit(f"llama.cpp could not quantize {f16} to {ftype}")
    return out / f"model-{ftype}.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model's)")
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="text files of the model's training sources")
    ap.add_argument("--separator", default="\n\n\n", help="document separator of the data files")
    ap.add_argument("--heldout", type=float, default=0.02)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--kernels", default="reference")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--decode", action="store_true", help="score token by token through a KV cache (decode kernels)")
    ap.add_argument("--llama-quantize", metavar="TYPE", help="also score a GGUF of the model quantised by llama.cpp")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tok = moekit.Tokenizer.from_pretrained(args.tokenizer or args.model)
    rows = heldout_rows(tok, args.data, args.separator.encode().decode("unicode_escape"), args.heldout)
    print(f"{len(rows)} held-out documents, {sum(len(r) for r in rows) - len(rows)} scored tokens", file=sys.stderr)
    runs = [(name, args.model, name) for name in args.variants.split(",")]
    if args.llama_quantize:
        gguf = llama_quantized(args.model, args.llama_quantize)
        runs += [(f"{args.llama_quantize}" + (f"->{name}" if name != "bf16" else ""), gguf, name)
                 for name in args.variants.split(",")]
    results = {}
    for name, path, variant in runs:
        q = VARIANTS[variant]
        t0 = time.perf_counter()
        model = moekit.load(path, dtype=torch.bfloat16, kernels=args.kernels,
                            quantize=q and q[0], group=q and q[1]).eval()
        loss, n = mean_loss(model, rows, args.window, args.decode)
        size = sum(b.numel() * b.element_size() for b in (*model.parameters(), *model.buffers()))
        results[name] = {"loss": loss, "ppl": math.exp(loss), "tokens": n, "weight_bytes": size}
        base = results.get("bf16", results[name])["ppl"]
        print(f"{name:16s} loss {loss:.4f}  ppl {math.exp(loss):8.3f}  ({100 * (math.exp(loss) / base - 1):+.2f}% "
              f"vs bf16)  weights {size / 2**20:.1f} MiB  [{time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    report = {"date": str(date.today()), "cpu": cpu_info().get("model", platform.processor()), "model": str(args.model),
              "data": [str(d) for d in args.data], "window": args.window, "kernels": args.kernels,
              "decode": args.decode, "llama_quantize": args.llama_quantize, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
