"""Loss and expert-load curves from a training log (log.jsonl) as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import MoekitError


def read_log(path: str | Path) -> list[dict]:
    """The records of a log.jsonl; a line that is not JSON is an error naming the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MoekitError(f"{path}: cannot be read as a log.jsonl ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MoekitError(f"{path}:{n}: not a JSON log record ({e})") from None
    return out


def plot_log(logs: dict[str, str | Path], out: str | Path, title: str = "") -> Path:
    """One PNG: training/held-out loss, mean expert imbalance, and the last step's per-layer expert load.

    ``logs`` maps a label to a log.jsonl, so runs (say, balance loss on vs off) can be compared.
    """
    try:
        import matplotlib
    except ImportError:
        raise MoekitError("plotting needs matplotlib, which is not installed: pip install 'moekit[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: read_log(p) for label, p in logs.items()}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    baseline_drawn = False
    for label, recs in runs.items():
        unigram = [v for r in recs for k, v in r.items() if k.startswith("unigram_loss/")]
        if unigram and not baseline_drawn:  # the held-out loss of a unigram model: the bar to clear
            axes[0].axhline(sum(unigram) / len(unigram), color="grey", ls=":", label="unigram baseline")
            baseline_drawn = True
        recs = [r for r in recs if "loss" in r]
        steps = [r["step"] for r in recs]
        line, = axes[0].plot(steps, [r["loss"] for r in recs], lw=1, label=f"{label} train")
        ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        if ev:
            axes[0].plot(*zip(*ev), "o--", color=line.get_color(), label=f"{label} held-out")
        imb = [(r["step"], sum(r["imbalance"]) / len(r["imbalance"])) for r in recs if r.get("imbalance")]
        if imb:
            axes[1].plot(*zip(*imb), lw=1, label=label)
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    axes[1].set(xlabel="step", ylabel="max load / mean load", title="expert imbalance (mean over layers)")
    axes[1].axhline(1.0, color="grey", lw=0.5)
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    label, recs = next(iter(runs.items()))  # the first run's final per-layer load
    last = next((r for r in reversed(recs) if r.get("load")), None)
    if last:
        im = axes[2].imshow(last["load"], aspect="auto", cmap="viridis")
        axes[2].set_yticks(range(len(last["load"])))
        axes[2].set(xlabel="expert", ylabel="layer", title=f"{label}: expert load at step {last['step']}")
        fig.colorbar(im, ax=axes[2], label="fraction of routed slots")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
