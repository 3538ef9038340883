"""``moekit export``: its arguments and entry point (``moekit.cli`` registers them through :func:`register`;
the work is in gguf_export.py). Heavy imports stay inside ``main``: the command line imports this at startup."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moekit.cliargs import UsageError

HELP = "write a checkpoint as a GGUF file for llama.cpp (docs/gguf.md)"
TYPES = ("f16", "bf16", "q8_0", "q4_0")  # moekit.weights.gguf_export.TYPES, without importing gguf here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--type", default="f16", choices=TYPES,
                   help="tensor type (norms and routers stay f32; q4_0 keeps the output matrix at q8_0)")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--out", required=True, help="the .gguf file to write (replaced only once complete)")


def main(args: argparse.Namespace) -> None:
    from moekit.weights.gguf_export import export_checkpoint

    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model!r}: no such checkpoint folder")
    out = export_checkpoint(args.model, args.out, args.type, progress=None)
    print(f"wrote {out} ({args.type}, {out.stat().st_size / 2**20:,.1f} MiB)", file=sys.stderr)


def register(sub) -> None:
    """Add ``export`` to ``moekit``'s subparsers."""
    p = sub.add_parser("export", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=main)
