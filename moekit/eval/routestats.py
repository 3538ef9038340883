"""``moekit route-stats``: how a model's routers spread text over the experts, per MoE layer and per data file.

Each text file is encoded as one text and cut into consecutive windows of ``seq_len`` tokens (each
window seen without earlier context, as in training); every token of every window is routed by
every MoE layer, in eval mode (no router noise), and the routers' own decisions are read through
:meth:`MoEDecoder.record_routing`. Per layer and file:

- load: routed (token, expert) slots per expert, summing to tokens x top_k; load_fraction = load / sum;
- imbalance: max(load) / mean(load) (1 = perfectly even, E / top_k = every token on the same experts);
- token_entropy: mean over tokens of the entropy (nats) of the router's distribution over all E
  experts (softmax of the logits; sigmoid scores divided by their sum for sigmoid routers; a
  selection-only balancing bias is not part of it); at most ln E;
- load_entropy: entropy (nats) of load_fraction; at most ln E (even load);
- coactivation: E x E counts of tokens that chose both expert i and expert j among their top_k;
  symmetric, its diagonal is the load, each row sums to top_k x load.

With two or more files, load_divergence gives per layer the Jensen-Shannon divergence (nats, at most
ln 2) between each file's load_fraction and the first file's.

Shape legend: T tokens, E routed experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from moekit.errors import MoekitError

SCHEMA = "moekit.route-stats/1"


# ----------------------------------------------------------------------------- statistics
def router_probs(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The router's distribution over all experts [T, E], float64: softmax, or sigmoid scores normalised."""
    logits_TE = logits_TE.double()
    if score_func == "softmax":
        return logits_TE.softmax(-1)
    s_TE = logits_TE.sigmoid()
    return s_TE / s_TE.sum(-1, keepdim=True)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension (0 log 0 = 0)."""
    return torch.special.entr(p.double()).sum(-1)


class LayerCounts:
    """Running totals of one MoE layer over one file: load [E], co-activation [E, E], summed token entropy."""

    def __init__(self, num_experts: int):
        self.load_E = torch.zeros(num_experts, dtype=torch.int64)
        self.coact_EE = torch.zeros(num_experts, num_experts, dtype=torch.int64)
        self.entropy_sum, self.tokens = 0.0, 0

    def add(self, ids_TK: torch.Tensor, logits_TE: torch.Tensor, score_func: str) -> None:
        E = self.load_E.numel()
        chosen_TE = torch.zeros(ids_TK.shape[0], E, dtype=torch.float64).scatter_(1, ids_TK.cpu(), 1.0)
        self.load_E += chosen_TE.sum(0).long()
        self.coact_EE += (chosen_TE.t() @ chosen_TE).round().long()  # exact: integer counts far below 2^53
        self.entropy_sum += float(entropy(router_probs(logits_TE.cpu(), score_func)).sum())
        self.tokens += ids_TK.shape[0]

    def summary(self, layer: int) -> dict:
        """This layer's JSON entry (the module docstring defines each field)."""
        load = self.load_E.double()
        frac = load / load.sum() if load.sum() > 0 else load
        return {"layer": layer, "load": self.load_E.tolist(), "load_fraction": frac.tolist(),
                "imbalance": float(load.max() / load.mean()) if load.sum() > 0 else float("nan"),
                "token_entropy": self.entropy_sum / self.tokens if self.tokens else float("nan"),
                "load_entropy": float(entropy(frac)), "coactivation": self.coact_EE.tolist()}


def js_divergence(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence (nats) of two distributions."""
    p_, q_ = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    m = (p_ + q_) / 2
    return float(entropy(m) - (entropy(p_) + entropy(q_)) / 2)


def moe_layers(model) -> list[int]:
    """Indices of the decoder blocks whose FFN is an MoE layer."""
    from moekit.models.moe import MoE

    return [b.layer for b in model.layers if isinstance(b.ffn, MoE)]


@torch.no_grad()
def route_windows(model, windows: list[torch.Tensor], batch: int = 8) -> list[LayerCounts]:
    """Route every window [T_w] of token ids through ``model``; one :class:`LayerCounts` per MoE layer."""
    m = model.config.moe
    layers = moe_layers(model)
    if not layers:
        raise MoekitError("the model has no MoE layers: there is no routing to measure")
    counts = [LayerCounts(m.num_experts) for _ in layers]
    was = model.training
    model.eval()
    try:
        by_len: dict[int, list[torch.Tensor]] = {}
        for w in windows:
            by_len.setdefault(len(w), []).append(w)
        for group in by_len.values():
            for i in range(0, len(group), batch):
                x_BT = torch.stack(group[i:i + batch]).to(model.embed.weight.device)
                with model.record_routing() as routing:
                    model(x_BT, last_only=True)  # the routing is all we need, not the full logits
                for c, r in zip(counts, routing, strict=True):
                    c.add(r.ids_TK, r.logits_TE, m.score_func)
    finally:
        model.train(was)
    return counts


def text_windows(path: Path, tokenizer, seq_len: int, max_tokens: int | None) -> list[torch.Tensor]:
    """The first ``max_tokens`` tokens of a UTF-8 text file, cut into windows of ``seq_len`` (the last may be shorter)."""
    if not path.is_file():
        raise MoekitError(f"{path}: no such data file")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise MoekitError(f"{path}: the data file is empty")
    ids = tokenizer.encode(text)[:max_tokens]
    return list(torch.tensor(ids, dtype=torch.long).split(seq_len))


def route_stats(model, tokenizer, files: list[str | Path], seq_len: int = 256, max_tokens: int | None = 20000,
                batch: int = 8, progress: bool = False) -> dict:
    """The statistics of every file as one JSON-ready dict (schema in the module docstring and docs/evaluation.md)."""
    from tqdm.auto import tqdm

    m, layers = model.config.moe, moe_layers(model)
    if m is None or not layers:
        raise MoekitError("the model has no MoE layers: there is no routing to measure")
    out = {"schema": SCHEMA, "num_experts": m.num_experts, "top_k": m.top_k, "score_func": m.score_func,
           "max_entropy": math.log(m.num_experts), "seq_len": seq_len, "max_tokens": max_tokens,
           "layers": layers, "files": []}
    texts = [(Path(f), text_windows(Path(f), tokenizer, seq_len, max_tokens)) for f in files]  # bad files first
    for path, windows in tqdm(texts, desc="route-stats", unit="file", disable=not progress):
        counts = route_windows(model, windows, batch)
        per_layer = [c.summary(layer) for c, layer in zip(counts, layers)]
        out["files"].append({"path": str(path), "name": path.stem, "tokens": sum(map(len, windows)),
                             "windows": len(windows), "layers": per_layer,
                             "mean": {k: sum(e[k] for e in per_layer) / len(per_layer)
                                      for k in ("imbalance", "token_entropy", "load_entropy")}})
    first = out["files"][0]
    out["load_divergence"] = [
        {"reference": first["name"], "file": f["name"],
         "js": [js_divergence(a["load_fraction"], b["load_fraction"]) for a, b in zip(first["layers"], f["layers"])]}
        for f in out["files"][1:]]
    return out


# ----------------------------------------------------------------------------- report
def table(stats: dict) -> str:
    """Per layer and file: imbalance, token entropy and load entropy (plus the JS divergence to the first file)."""
    files = stats["files"]
    head1 = f"{'':>5} " + "".join(f"| {f['name'][:22]:<22} " for f in files)
    head2 = f"{'layer':>5} " + "| imbal  H_tok H_load " * len(files)
    js = {d["file"]: d["js"] for d in stats["load_divergence"]}
    if js:
        head1 += "| JS to " + files[0]["name"][:10]
        head2 += "| " + " ".join(f"{f['name'][:8]:>8}" for f in files[1:])
    lines = [head1, head2]
    for i, layer in enumerate(stats["layers"]):
        row = f"{layer:>5} " + "".join(f"| {f['layers'][i]['imbalance']:5.2f} {f['layers'][i]['token_entropy']:6.3f} "
                                     f"{f['layers'][i]['load_entropy']:6.3f} " for f in files)
        if js:
            row += "| " + " ".join(f"{js[f['name']][i]:8.4f}" for f in files[1:])
        lines.append(row)
    lines.append("tokens: " + ", ".join(f"{f['name']} {f['tokens']:,}" for f in files) +
                 f"; E = {stats['num_experts']}, top_k = {stats['top_k']}, max entropy ln E = {stats['max_entropy']:.3f}")
    return "\n".join(lines)


def plot(stats: dict, out: Path, layer: int | None = None) -> list[Path]:
    """route_load.png (layers x experts load per file, and B - A when there are two files) and
    route_coact.png (co-activation of one layer per file, as a fraction of tokens, diagonal left blank)."""
    try:
        import matplotlib
    except ImportError:
        raise MoekitError("route-stats plots need matplotlib, which is not installed: pip install 'moekit[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files, layers = stats["files"], stats["layers"]
    layer = layers[-1] if layer is None else layer
    if layer not in layers:
        raise MoekitError(f"--layer {layer}: not an MoE layer (MoE layers: {layers})")
    E = stats["num_experts"]
    loads = [np.array([e["load_fraction"] for e in f["layers"]]) for f in files]
    diff = len(files) == 2
    fig, axes = plt.subplots(1, len(files) + diff, figsize=(0.35 * E * (len(files) + diff) + 2, 0.5 * len(layers) + 2),
                             squeeze=False, layout="constrained")
    ticks = range(0, E, max(1, E // 8))
    top = max(a.max() for a in loads)
    for ax, f, a in zip(axes[0], files, loads):
        im = ax.imshow(a, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        ax.set(title=f"{f['name']} ({f['tokens']:,} tokens)", xlabel="expert", ylabel="layer", xticks=ticks,
               yticks=range(len(layers)), yticklabels=layers)
    fig.colorbar(im, ax=axes[0, :len(files)].tolist(), label="load fraction", shrink=0.9)
    if diff:
        d = loads[1] - loads[0]
        lim = float(np.abs(d).max()) or 1.0
        ax = axes[0, -1]
        im = ax.imshow(d, vmin=-lim, vmax=lim, cmap="RdBu_r", aspect="auto")
        ax.set(title=f"{files[1]['name']} - {files[0]['name']}", xlabel="expert", xticks=ticks,
               yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(im, ax=ax, label="load fraction difference", shrink=0.9)
    fig.suptitle(f"expert load per MoE layer (top-{stats['top_k']} of {E}; even = {1 / E:.3f})")
    paths = [out / "route_load.png"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    plt.close(fig)

    i = layers.index(layer)
    mats = []
    for f in files:
        c = np.array(f["layers"][i]["coactivation"], dtype=float) / f["tokens"]
        np.fill_diagonal(c, np.nan)
        mats.append(c)
    fig, axes = plt.subplots(1, len(files), figsize=(5.2 * len(files) + 1, 4.6), squeeze=False, layout="constrained")
    top = max(np.nanmax(c) for c in mats)
    for ax, f, c in zip(axes[0], files, mats):
        im = ax.imshow(c, vmin=0, vmax=top, cmap="magma", interpolation="nearest")
        ax.set(title=f"{f['name']}", xlabel="expert", ylabel="expert", xticks=ticks, yticks=ticks)
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of tokens routed to both", shrink=0.9)
    k = stats["top_k"]
    fig.suptitle(f"layer {layer}: top-{k} co-activation (independent uniform choice: {k * (k - 1) / (E * (E - 1)):.3f})")
    paths.append(out / "route_coact.png")
    fig.savefig(paths[1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, compared side by side")
    p.add_argument("--max-tokens", type=int, default=20000, help="tokens per file at most (default 20000)")
    p.add_argument("--seq-len", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--layer", type=int, help="MoE layer of the co-activation plot (default: the last)")
    p.add_argument("--out", default="route-stats", help="output folder: route_stats.json, route_load.png, "
                                                        "route_coact.png (default ./route-stats)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"], help="weights dtype")
    p.add_argument("--kernels", default="reference", choices=["auto", "cpu", "reference"], help="kernel backend")
    p.add_argument("--no-plots", action="store_true", help="write the JSON and print the table only")


def main(args: argparse.Namespace) -> None:
    import moekit

    for name in ("max_tokens", "seq_len", "batch"):
        if getattr(args, name) < 1:
            raise MoekitError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    folder = args.model or str(moekit.default_model_path())
    model = moekit.load(folder, dtype=args.dtype, kernels=args.kernels)
    if model.config.moe is None or not moe_layers(model):
        raise MoekitError(f"{folder}: the model has no MoE layers: there is no routing to measure")
    if args.layer is not None and args.layer not in moe_layers(model):
        raise MoekitError(f"--layer {args.layer}: not an MoE layer of {folder} (MoE layers: {moe_layers(model)})")
    tok = moekit.Tokenizer.from_pretrained(folder)
    stats = {"model": folder, **route_stats(model, tok, args.data, args.seq_len, args.max_tokens, args.batch,
                                            progress=True)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "route_stats.json").write_text(json.dumps(stats, indent=1))
    print(table(stats))
    written = [out / "route_stats.json"] + ([] if args.no_plots else plot(stats, out, args.layer))
    print("wrote " + ", ".join(map(str, written)))
