"""``moekit eval``, ``moekit leakage`` and ``moekit route-stats``: each module brings its own arguments
(``add_arguments(parser)``) and entry point (``main(args)``); ``moekit.cli`` registers them here."""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {  # name: (module, help)
    "eval": ("moekit.eval.runner", "score benchmark tasks (loglikelihood, PPL and GEN modes, perplexity)"),
    "leakage": ("moekit.eval.leakage", "benchmark-leakage detection by option shuffling (arXiv 2409.01790)"),
    "route-stats": ("moekit.eval.routestats", "per-layer expert load, imbalance, entropy and co-activation"),
}


def register(sub) -> None:
    """Add the evaluation subcommands to ``moekit``'s subparsers."""
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)


def run(argv: list[str] | None = None) -> int:
    """The evaluation subcommands alone (``python -m moekit.eval.cli leakage ...``), with moekit's error handling."""
    from moekit import cli

    p = argparse.ArgumentParser(prog="moekit")
    register(p.add_subparsers(dest="command", required=True))
    return cli.main(argv, parser=p)


if __name__ == "__main__":
    raise SystemExit(run())
