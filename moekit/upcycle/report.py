"""The upcycling report: neurons per expert per layer and the calibration loss, as a dict, JSON and markdown."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from moekit.config import count_params
from moekit.models import MoEDecoder
from moekit.upcycle.assemble import LayerPlan
from moekit.upcycle.options import UpcycleOptions
from moekit.weights.io import atomic_write_text


def build_report(o: UpcycleOptions, dense: MoEDecoder, model: MoEDecoder, plans: list[LayerPlan],
                 calibration: dict | None) -> dict:
    """Everything a reader needs to judge the upcycle; ``partition`` lists the neuron indices."""
    d_total, _ = count_params(dense.config)
    total, active = count_params(model.config)
    native = model.config.family == "llama_moe"
    rep = {
        "method": o.method, "experts": o.experts, "top_k": o.top_k, "shared": o.shared, "gate": o.gate,
        "gate_init": o.gate_init, "scale": o.routed_scale(),
        "scale_stored_as": "score_scale_factor" if native else "folded into the experts' down_proj",
        "noise": o.noise, "feature": o.feature, "seed": o.seed, "layout": model.config.family,
        "dense": {"ffn_width": dense.config.intermediate_size, "layers": dense.config.num_layers,
                  "params": d_total},
        "moe": {"params_total": total, "params_active": active},
        "layers": [{"layer": i, "expert_neurons": [len(ix) for ix in p.experts], "shared_neurons": len(p.shared),
                    **({"kmeans_mean_sq_dist": p.inertia} if p.inertia is not None else {})}
                   for i, p in enumerate(plans)],
        "calibration": calibration,
    }
    if o.partition:
        rep["partition"] = [{"experts": [ix.tolist() for ix in p.experts], "shared": p.shared.tolist()}
                            for p in plans]
    return rep


def _sizes(sizes: list[int]) -> str:
    runs = sorted(Counter(sizes).items(), reverse=True)
    return ", ".join(f"{n} x {w}" for w, n in runs)


def to_markdown(rep: dict) -> str:
    """A short human-readable summary (the partition itself stays in the JSON)."""
    d, m = rep["dense"], rep["moe"]
    shared = f" + {rep['shared']} shared" if rep["shared"] else ""
    lines = [
        "# Upcycling report", "",
        f"- dense: {d['layers']} layers, FFN width {d['ffn_width']}, {d['params'] / 1e6:.2f}M parameters",
        f"- method: {rep['method']}; {rep['experts']} routed experts{shared}, top-{rep['top_k']}; "
        f"{rep['gate']} gate, {rep['gate_init']} init; scale {rep['scale']:g} ({rep['scale_stored_as']})"
        + (f"; noise {rep['noise']:g}" if rep["noise"] else ""),
        f"- layout: {rep['layout']}; {m['params_total'] / 1e6:.2f}M parameters, {m['params_active'] / 1e6:.2f}M active",
        "", "| layer | neurons per expert (experts x width) | shared neurons | k-means mean sq. distance |",
        "| --- | --- | --- | --- |",
    ]
    for row in rep["layers"]:
        km = row.get("kmeans_mean_sq_dist")
        lines.append(f"| {row['layer']} | {_sizes(row['expert_neurons'])} | {row['shared_neurons']} | "
                     f"{'' if km is None else f'{km:.4g}'} |")
    cal = rep["calibration"]
    lines.append("")
    if cal is None:
        lines.append("No calibration text: losses not measured.")
    else:
        gap = cal["upcycled_loss"] - cal["dense_loss"]
        lines.append(f"Calibration loss ({cal['windows']} windows x {cal['seq_len']} tokens of {cal['text']}): "
                     f"dense {cal['dense_loss']:.4f}, upcycled before training {cal['upcycled_loss']:.4f} "
                     f"({gap:+.4f} nats/token)")
    return "\n".join(lines) + "\n"


def write_report(rep: dict, folder: str | Path) -> list[Path]:
    """``upcycle_report.json``, ``upcycle_report.md`` and (partitions) ``upcycle_partition.json``
    with the neuron indices of every expert, in ``folder``; each written atomically."""
    folder = Path(folder)
    out = [folder / "upcycle_report.json", folder / "upcycle_report.md"]
    atomic_write_text(out[0], json.dumps({k: v for k, v in rep.items() if k != "partition"}, indent=1) + "\n")
    atomic_write_text(out[1], to_markdown(rep))
    if "partition" in rep:
        out.append(folder / "upcycle_partition.json")
        atomic_write_text(out[2], json.dumps(rep["partition"], separators=(",", ":")) + "\n")
    return out
