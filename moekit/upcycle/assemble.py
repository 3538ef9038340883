"""From a dense model and a per-layer neuron plan to an MoE model: config, layout, expert weights, gates.

Shape legend: D model width, F dense FFN width, E routed experts, Fe expert width (padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.errors import MoekitError
from moekit.families import get_family
from moekit.models import MoEDecoder
from moekit.upcycle.options import UpcycleOptions


@dataclass
class LayerPlan:
    """Which dense neurons each expert of one layer gets."""

    experts: list[torch.Tensor]  # neuron indices of each routed expert (copy: all of them, each time)
    shared: torch.Tensor  # neuron indices of the fused shared expert (empty: none)
    centroids_ED: torch.Tensor | None = None  # mean feature row of each expert's neurons (router init)
    inertia: float | None = None  # balanced k-means mean squared distance (cluster only)


def moe_config(dense: ModelConfig, o: UpcycleOptions, plans: list[LayerPlan]) -> ModelConfig:
    """The MoE config in the chosen family's layout, as that family reads it back (load == in memory)."""
    family = o.family()
    widths = [[len(ix) for ix in p.experts] for p in plans]
    flat = {w for row in widths for w in row}
    width = flat.pop() if len(flat) == 1 else tuple(tuple(row) for row in widths)
    native = family == "llama_moe"  # the only layout with an output scale field (score_scale_factor)
    m = MoEConfig(num_experts=o.experts, top_k=o.top_k, expert_width=width, shared_width=len(plans[0].shared),
                  router=o.gate, router_noise=native, routed_scale=o.routed_scale() if native else 1.0,
                  renormalize_eps=1e-6 if family == "xverse" else 0.0, aux_loss="cv2" if native else "switch",
                  aux_loss_coef=0.01)
    cfg = dense.replace(moe=m, family=family, extra={})
    fam = get_family(family)
    try:
        hf = fam.to_hf(cfg)
    except ConfigError as e:
        raise MoekitError(f"layout={family!r}: {e}") from None
    return fam.to_config(hf, frozenset())


def _default_init(w: torch.Tensor, gen: torch.Generator) -> None:
    """nn.Linear's own initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a seeded generator."""
    bound = 1 / math.sqrt(w.shape[1])
    w.copy_(torch.empty(w.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen))


def _init_router(router, o: UpcycleOptions, plan: LayerPlan, gen: torch.Generator) -> None:
    """zero: logits exactly 0 (uniform weights); with the MLP gate the first Linear stays random and the
    second is zero, so gradients can still reach both. random: nn.Linear's init. centroids: each
    expert's row is the mean feature row of its neurons (MLP gate: then Tanh, then identity)."""
    proj, proj2 = router.proj.weight, None if router.proj2 is None else router.proj2.weight
    if o.gate_init == "centroids":
        proj.copy_(plan.centroids_ED)
        if proj2 is not None:
            proj2.copy_(torch.eye(proj2.shape[0]))
    else:
        _default_init(proj, gen)
        if proj2 is not None:
            _default_init(proj2, gen)
        if o.gate_init == "zero":
            (proj if proj2 is None else proj2).zero_()
    if router.noise is not None:  # LLaMA-MoE initialises the noise projection to zero
        router.noise.weight.zero_()


def _noisy(w: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    if not std:
        return w
    return w + (torch.randn(w.shape, generator=gen, dtype=torch.float64) * std * float(w.double().std())).to(w.dtype)


@torch.no_grad()
def assemble(dense: MoEDecoder, cfg: ModelConfig, plans: list[LayerPlan], o: UpcycleOptions,
             gen: torch.Generator) -> MoEDecoder:
    """The MoE model: every non-FFN tensor copied, experts cut from (or copied from) the dense FFNs.

    In layouts without an output-scale field (all but llama_moe) the routed scale is folded into
    the experts' down projections, which computes the same function.
    """
    from moekit.weights import materialize

    dtype = dense.embed.weight.dtype
    model = materialize(cfg, dtype)
    kept = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(".ffn." not in k for k in missing):
        raise ValueError(f"dense and MoE models differ outside the FFNs: missing {missing}, unexpected {unexpected}")
    fold = 1.0 if cfg.family == "llama_moe" else o.routed_scale()
    for block, dense_block, plan in zip(model.layers, dense.layers, plans):
        F = dense_block.ffn.width
        gate_FD, up_FD, down_DF = dense_block.ffn.w13[:F], dense_block.ffn.w13[F:], dense_block.ffn.w2
        moe = block.ffn
        w13, w2 = moe.experts.w13, moe.experts.w2
        fe = w2.shape[-1]
        w13.zero_()
        w2.zero_()
        for e, ix in enumerate(plan.experts):
            n = len(ix)
            w13[e, :n] = _noisy(gate_FD[ix], o.noise, gen)
            w13[e, fe:fe + n] = _noisy(up_FD[ix], o.noise, gen)
            w2[e, :, :n] = _noisy(down_DF[:, ix], o.noise, gen) * fold
        if moe.shared is not None:
            s = plan.shared
            moe.shared.w13.copy_(torch.cat([gate_FD[s], up_FD[s]]))
            moe.shared.w2.copy_(down_DF[:, s])
        _init_router(moe.router, o, plan, gen)
    return model
