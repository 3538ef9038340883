"""``moekit quantize``: a checkpoint's matrices to int8 or int4, saved in its family's layout with
float16 scales beside them and ``quantization_config`` in config.json (docs/quantization.md). The
source may be a llama.cpp GGUF file (K-quants too): converted once, its quantised model and its
tokenizer load from the folder without dequantising the file again."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from moekit.cliargs import UsageError, default_model, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="floating-point checkpoint folder, or a llama.cpp GGUF file of any type but "
                                    "all-Q8_0 / all-Q4_0 (default: the embedded model)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4], help="8: int8, 4: int4")
    p.add_argument("--group", type=positive_int,
                   help="input columns per scale: 32, 64 or 128 for int4 (default 64); int8 default: one per row")
    p.add_argument("--no-lm-head", action="store_true", help="keep the LM head in floating point")


def main(args: argparse.Namespace) -> None:
    from moekit.models.quantize import QuantConfig
    from moekit.weights import load, save
    from moekit.weights.io import TOKENIZER_FILES

    src = Path(args.model or default_model())
    gguf = src.suffix == ".gguf"
    if not (src.is_file() if gguf else src.is_dir()):
        raise UsageError(f"--model {str(src)!r}: no such " + ("GGUF file" if gguf else "checkpoint folder"))
    q = QuantConfig.of("int8" if args.bits == 8 else "int4", args.group, lm_head=not args.no_lm_head)
    t0 = time.perf_counter()
    model = load(src, progress=True, quantize=q)  # each matrix quantised as it is read
    with tempfile.TemporaryDirectory() as tmp:
        if gguf:  # the file's vocabulary and chat template, written as a checkpoint folder holds them
            from moekit.tokenizer import Tokenizer, TokenizerError

            try:
                files = Tokenizer.from_pretrained(src).save(tmp)
            except TokenizerError as e:
                print(f"{e}; the checkpoint is written without a tokenizer", file=sys.stderr)
                files = {}
        else:
            files = {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}
        save(model, args.out, files=files)
    size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))  # noqa: E731
    before = src.stat().st_size if gguf else size(src) or sum(f.stat().st_size for f in src.glob("*.bin"))
    print(f"{src} -> {args.out}: {q.format}" + (f", group {q.group}" if q.group else ", one scale per row")
          + f"; {before / 2**20:.1f} -> {size(args.out) / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
