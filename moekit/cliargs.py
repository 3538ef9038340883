"""What every ``moekit`` subcommand's arguments share: argparse types, the one-line usage error, the default model."""

from __future__ import annotations

import argparse

from moekit.errors import MoekitError


class UsageError(MoekitError):
    """A command-line problem that deserves one line, not a traceback."""


def _integer_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a positive integer' if low == 1 else 'an integer >= 0'}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts such as --threads: an integer >= 1."""
    return _integer_at_least(text, 1)


def count(text: str) -> int:
    """argparse type for counts that may be zero (--limit, --num-fewshot): an integer >= 0."""
    return _integer_at_least(text, 0)


def quant_flags(p) -> None:
    """--quantize / --group: quantise a floating-point checkpoint's matrices when loading it."""
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantise the weights at load time (docs/quantization.md)")
    p.add_argument("--group", type=positive_int, help="with --quantize: input columns per scale (int4: 32/64/128)")


def positive_float(text: str) -> float:
    """argparse type for sizes such as --max-memory: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def memory_flags(p) -> None:
    """--max-memory: expert offload for a model larger than memory."""
    p.add_argument("--max-memory", type=positive_float, metavar="GIB",
                   help="memory budget in GiB for the weights: routed experts stay in the safetensors files and are "
                        "read into an LRU cache on demand (docs/quantization.md, Expert offload)")


def offload_summary(model) -> str | None:
    """The expert cache's one-line report (hits, misses, bytes read), or None when not offloaded."""
    cache = getattr(model, "offload", None)
    return None if cache is None else cache.stats.summary()


def default_model() -> str:
    """The embedded default model's folder (moekit/assets/default)."""
    from moekit.assets import default_model_path

    try:
        return str(default_model_path())
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
