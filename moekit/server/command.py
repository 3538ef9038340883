"""``moekit serve``: its arguments and entry point (``moekit.cli`` registers them; the work is in launch.py).
Heavy imports stay inside ``main``: the command line imports this module at startup."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moekit.cliargs import UsageError, default_model, memory_flags, offload_summary, positive_int, quant_flags


def add_arguments(sv: argparse.ArgumentParser) -> None:
    sv.add_argument("--model", help="checkpoint folder (default: the embedded demo model)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 and the tokenizer endpoints")
    sv.add_argument("--served-model-name", help="the model id clients ask for (default: the folder's name)")
    sv.add_argument("--max-num-seqs", type=positive_int, default=64, help="requests running at once")
    sv.add_argument("--max-num-batched-tokens", type=positive_int, default=512, help="tokens per engine step")
    sv.add_argument("--kv-memory", type=float, help="KV-cache pool in GiB (default: 1/4 of RAM at most)")
    sv.add_argument("--max-model-len", type=positive_int, help="context length to serve (<= the model's)")
    sv.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="weights dtype (default: the config's)")
    sv.add_argument("--kernels", default="auto", choices=["auto", "cpu", "reference"], help="kernel backend")
    quant_flags(sv)
    memory_flags(sv)
    sv.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    sv.add_argument("--chat-format", help="override the checkpoint's chat format")


def main(args: argparse.Namespace) -> None:
    """The OpenAI-compatible server and the web chat page (moekit/server/), until SIGTERM or Ctrl-C."""
    import torch

    from moekit.engine import CausalLM
    from moekit.server.launch import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or default_model()
    if not (Path(model).is_dir() or model.endswith(".gguf") and Path(model).is_file()):
        raise UsageError(f"--model {model!r}: no such checkpoint folder or .gguf file")
    t0 = time.perf_counter()
    lm = CausalLM.from_pretrained(model, dtype=args.dtype, kernels=args.kernels, chat_format=args.chat_format,
                                  progress=True, quantize=args.quantize, group=args.group,
                                  max_memory=args.max_memory)
    print(f"loaded {model} ({lm.model.config.family}, {lm.model.embed.weight.dtype}) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        serve(lm, args.served_model_name or ("moekit-default" if not args.model else Path(model).name), args.host,
              args.port, args.api_key, args.max_num_seqs, args.max_num_batched_tokens,
              None if args.kv_memory is None else int(args.kv_memory * 2**30), args.max_model_len)
    finally:
        if line := offload_summary(lm.model):
            print(line, file=sys.stderr)
