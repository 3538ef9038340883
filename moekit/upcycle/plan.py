"""Which dense neurons go to which expert, layer by layer, for each construction method.

Shape legend: W calibration windows, D model width, F dense FFN width, G text groups (= E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moekit.errors import MoekitError
from moekit.models import MoEDecoder
from moekit.upcycle.assemble import LayerPlan
from moekit.upcycle.options import UpcycleOptions
from moekit.upcycle.split import (balanced_kmeans, expert_sizes, importance_split, members, random_split,
                                  select_shared)

Importance = tuple[list[torch.Tensor], torch.Tensor]  # (per layer [W, F] neuron scores, [W, D] window features)


def text_groups(feats_WD: torch.Tensor, groups: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Calibration windows clustered into ``groups`` equal-sized groups by their (normalised) mean hidden state,
    standing in for LLaMA-MoE's clustering of the pretraining text before scoring neurons per group."""
    W = feats_WD.shape[0]
    if W < groups:
        raise MoekitError(f"calibration: {W} windows cannot form {groups} text groups (one per expert); "
                          "give a longer calibration text or more windows")
    labels, _, _ = balanced_kmeans(F.normalize(feats_WD.double(), dim=1), expert_sizes(W, groups), gen)
    return members(labels, groups)


def missing_calibration(o: UpcycleOptions) -> str:
    what = "the importance method" if o.method == "importance" else f"shared={o.shared} (the most important neurons)"
    return f"{what} needs a calibration text (calibration=...)"


def plan_layers(dense: MoEDecoder, o: UpcycleOptions, importance: Importance | None = None,
                progress: bool = False) -> list[LayerPlan]:
    """One :class:`LayerPlan` per layer. ``importance`` (from calibration text) is needed by the
    importance method and by shared experts, which take each layer's most widely important neurons."""
    cfg = dense.config
    Fw, E, N = cfg.intermediate_size, o.experts, o.shared
    o.validate(Fw)
    if not o.partition:
        return [LayerPlan([torch.arange(Fw)] * E, torch.zeros(0, dtype=torch.long)) for _ in dense.layers]
    if o.needs_calibration and importance is None:
        raise MoekitError(missing_calibration(o))
    gen = torch.Generator().manual_seed(o.seed)
    groups = text_groups(importance[1], E, gen) if importance is not None else None
    width = Fw // (E + N)
    plans = []
    for layer, block in enumerate(tqdm(dense.layers, desc=f"{o.method} split", unit="layer", disable=not progress)):
        w13 = block.ffn.w13.detach()
        feat_FD = (w13[Fw:] if o.feature == "up" else w13[:Fw]).double()
        scores_GF = None
        if groups is not None:
            s_WF = importance[0][layer]
            scores_GF = torch.stack([s_WF[g].mean(0) for g in groups])
        shared = select_shared(scores_GF, N * width, width) if N else torch.zeros(0, dtype=torch.long)
        free = torch.ones(Fw, dtype=torch.bool)
        free[shared] = False
        rest = free.nonzero().squeeze(1)
        sizes = expert_sizes(len(rest), E)
        inertia = None
        if o.method == "random":
            labels = random_split(len(rest), sizes, gen)
        elif o.method == "cluster":
            labels, _, inertia = balanced_kmeans(feat_FD[rest], sizes, gen, o.kmeans_iters)
        else:
            labels = importance_split(scores_GF[:, rest], sizes)
        idx = [rest[m] for m in members(labels, E)]
        centroids = torch.stack([feat_FD[ix].mean(0) for ix in idx])
        plans.append(LayerPlan(idx, shared, centroids, inertia))
    return plans
