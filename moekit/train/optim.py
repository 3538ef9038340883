"""AdamW with decoupled weight decay on matrices only, and warm-up + cosine or WSD learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.config import ConfigError


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # final learning rate (cosine) / after decay (wsd)
    betas: tuple[float, float] = (0.9, 0.95)  # Orion's AdamW settings
    weight_decay: float = 0.1  # on 2-D+ weights only (not norms, biases)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    warmup: int = 100  # linear warm-up steps
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, decay) | constant
    decay: float = 0.2  # wsd: fraction of the run spent decaying
    fused: bool | None = None  # fused AdamW kernel; None: when no parameter is sharded (DTensor)

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r} must be cosine, wsd or constant")
        if not (0 < self.lr and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"optim.lr={self.lr} / min_lr={self.min_lr} must satisfy 0 <= min_lr <= lr, lr > 0")
        if self.warmup < 0 or not 0 <= self.decay <= 1 or self.grad_clip < 0:
            raise ConfigError(f"optim.warmup={self.warmup} must be >= 0, optim.decay={self.decay} in [0, 1] and "
                              f"optim.grad_clip={self.grad_clip} >= 0")
        self.betas = tuple(self.betas)


def lr_at(step: int, total: int, c: OptimConfig) -> float:
    """Learning rate for 0-based ``step`` of ``total`` (wsd's last step runs at min_lr)."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    if c.schedule == "constant":
        return c.lr
    if c.schedule == "cosine":
        t = (step - c.warmup) / max(1, total - c.warmup)
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))
    decay_from = total - max(1, round(c.decay * total))  # wsd: stable, then linear decay reaching min_lr
    if step < decay_from:
        return c.lr
    t = (step + 1 - decay_from) / (total - decay_from)
    return c.lr + (c.min_lr - c.lr) * min(1.0, t)


def build_optimizer(model: torch.nn.Module, c: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA) is one pass over each tensor instead of a dozen elementwise ops;
    # it cannot mix DTensor (FSDP2 / expert-parallel) parameters with plain ones, so sharded runs loop
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in decay + no_decay)
    if c.fused and sharded:
        raise ConfigError("optim.fused=true cannot update sharded (FSDP2 / expert-parallel) parameters")
    fused = not sharded if c.fused is None else c.fused
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps, fused=fused,
                             foreach=None if fused else False)
