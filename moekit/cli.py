"""The ``moekit`` command: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moekit.config import ConfigError
from moekit.weights.io import CheckpointError


class UsageError(Exception):
    """A command-line problem that deserves one line, not a traceback."""


def cmd_info(args: argparse.Namespace) -> None:
    from moekit.describe import describe
    from moekit.presets import PRESETS, preset
    from moekit.weights import read_config

    target = args.model
    if target in PRESETS:
        cfg, name = preset(target), target
    elif Path(target).exists():
        cfg, _, files, _ = read_config(target)
        size = sum(f.stat().st_size for f in files)
        name = f"{target} ({len(files)} shard{'s' * (len(files) > 1)}, {size / 2**20:,.1f} MiB)"
    else:
        raise UsageError(f"{target!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})")
    print("\n".join(describe(cfg, name)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts language models.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="architecture, layer layout and parameter counts")
    info.add_argument("model", help="checkpoint folder or preset name")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, CheckpointError) as e:
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
