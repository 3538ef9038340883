"""Partitions of one FFN's neurons into experts: random, balanced k-means, importance (LLaMA-MoE).

Every function returns ``labels_N``: the expert of each of N neurons, with exactly
``sizes[e]`` neurons per expert e. Shape legend: N neurons, D neuron feature width,
E experts, G text groups.
"""

from __future__ import annotations

import torch

from moekit.errors import MoekitError


def expert_sizes(neurons: int, experts: int) -> list[int]:
    """Widths as even as possible (they differ by at most one; the wider experts come first)."""
    base, extra = divmod(neurons, experts)
    return [base + (e < extra) for e in range(experts)]


def capacity_assign(cost_NE: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Labels that give expert e exactly ``sizes[e]`` neurons, preferring low cost.

    In rounds: every unplaced neuron proposes its cheapest expert that still has room;
    an expert keeps the cheapest proposals that fit and turns the others away. Each round
    either places everyone or fills an expert, so there are at most E rounds.
    """
    N, E = cost_NE.shape
    if sum(sizes) != N or len(sizes) != E:
        raise MoekitError(f"expert sizes {sizes} do not split {N} neurons into {E} experts")
    cost = cost_NE.double().clone()
    room = torch.tensor(sizes, dtype=torch.long)
    labels = torch.full((N,), -1, dtype=torch.long)
    while True:
        todo = (labels < 0).nonzero().squeeze(1)
        if todo.numel() == 0:
            return labels
        cost[:, room == 0] = float("inf")
        want = cost[todo].argmin(1)
        for e in want.unique().tolist():
            cand = todo[want == e]
            keep = cand[cost[cand, e].argsort(stable=True)[: int(room[e])]]
            labels[keep] = e
            room[e] -= keep.numel()


def random_split(neurons: int, sizes: list[int], generator: torch.Generator) -> torch.Tensor:
    """LLaMA-MoE Independent_Random: shuffle the neurons, cut into consecutive runs of ``sizes``."""
    order = torch.randperm(neurons, generator=generator)
    labels = torch.empty(neurons, dtype=torch.long)
    labels[order] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return labels


def _sq_dist(x_ND: torch.Tensor, c_ED: torch.Tensor) -> torch.Tensor:
    return (x_ND.pow(2).sum(1, keepdim=True) - 2 * x_ND @ c_ED.T + c_ED.pow(2).sum(1)).clamp_min(0)


def balanced_kmeans(x_ND: torch.Tensor, sizes: list[int], generator: torch.Generator, iters: int = 30
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LLaMA-MoE Independent_Clustering: k-means (l2) whose clusters have exactly ``sizes`` members.

    k-means++ seeding, then alternate a capacity-constrained assignment
    (:func:`capacity_assign` on squared distances) with centroid updates until the
    labels stop changing. Returns (labels_N, centroids_ED, mean squared distance).
    """
    x = x_ND.double()
    N, E = x.shape[0], len(sizes)
    first = int(torch.randint(N, (1,), generator=generator))
    centroids = [x[first]]
    d2 = _sq_dist(x, x[first:first + 1]).squeeze(1)
    for _ in range(1, E):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / N)
        pick = int(torch.multinomial(p, 1, generator=generator))
        centroids.append(x[pick])
        d2 = torch.minimum(d2, _sq_dist(x, x[pick:pick + 1]).squeeze(1))
    c_ED = torch.stack(centroids)
    labels = None
    for _ in range(iters):
        new = capacity_assign(_sq_dist(x, c_ED), sizes)
        c_ED = torch.zeros_like(c_ED).index_add_(0, new, x) / torch.tensor(sizes, dtype=x.dtype)[:, None]
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
    inertia = float(_sq_dist(x, c_ED).gather(1, labels[:, None]).mean())
    return labels, c_ED.to(x_ND.dtype), inertia


def select_shared(scores_GN: torch.Tensor, count: int, expert_size: int) -> torch.Tensor:
    """LLaMA-MoE Sharing-Inter residual neurons: the ``count`` neurons important to the most text groups.

    Repeatedly take each group's ``expert_size`` most important remaining neurons, and move
    those chosen by the largest number of groups (ties: larger total score) to the shared set.
    Returns the shared neuron indices, sorted.
    """
    G, N = scores_GN.shape
    total = scores_GN.sum(0)
    free = torch.ones(N, dtype=torch.bool)
    shared: list[int] = []
    while len(shared) < count:
        masked = scores_GN.masked_fill(~free, float("-inf"))
        top = masked.topk(min(expert_size, int(free.sum())), dim=1).indices
        votes = torch.bincount(top.reshape(-1), minlength=N)
        best = (votes == votes.max()) & free
        cand = best.nonzero().squeeze(1)
        cand = cand[total[cand].argsort(descending=True, stable=True)][: count - len(shared)]
        shared += cand.tolist()
        free[cand] = False
    return torch.tensor(sorted(shared), dtype=torch.long)


def importance_split(scores_GN: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """LLaMA-MoE's neuron-independent gradient split: expert e is text group e's most important
    neurons, greedily, each neuron used once (scores normalised per group)."""
    s = scores_GN.double()
    s = s / s.sum(1, keepdim=True).clamp_min(1e-30)
    return capacity_assign(-s.T, sizes)


def members(labels_N: torch.Tensor, experts: int) -> list[torch.Tensor]:
    """The sorted neuron indices of each expert."""
    return [(labels_N == e).nonzero().squeeze(1) for e in range(experts)]
