"""torch.distributed for training: data parallel (FSDP2 or replicated) and expert parallel over a (dp, ep) mesh.

Shape legend: T local tokens, K experts per token, N routed slots (T*K), D width, E experts,
El experts per rank, F expert width.

Every rank optimises world_size x the global objective through its own autograd paths;
gradients are then averaged over ranks (FSDP2 does this for the parameters it shards), which
gives exactly the single-process gradient of the global batch. Expert weights are DTensors
sharded on the ``ep`` mesh dimension (replicated over ``dp``), so distributed checkpoints
reshard to any process count. Tokens reach their experts with all-to-all (autograd through
``torch.distributed.nn.functional.all_to_all_single``). gloo on CPU, NCCL on GPUs: the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moekit.config import ConfigError
from moekit.kernels import reference
from moekit.kernels.weights import ExpertWeights
from moekit.models.moe import MoE


@dataclass
class ParallelConfig:
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2 (fully_shard)
    ep: int = 1  # expert-parallel degree: experts split over this many ranks (must divide world and E)
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: parameters/gradients/optimizer state in host memory


@dataclass
class Dist:
    rank: int
    world: int
    mesh: object  # DeviceMesh with dims ("dp", "ep")
    device: torch.device

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")


def init_distributed(cfg: ParallelConfig) -> Dist | None:
    """Join the process group torchrun set up (None when running as a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if cfg.ep != 1 or cfg.fsdp:
            raise ConfigError("parallel.ep / parallel.fsdp need several processes: launch with torchrun")
        return None
    if world % cfg.ep:
        raise ConfigError(f"parallel.ep={cfg.ep} must divide the number of processes ({world})")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // cfg.ep, cfg.ep), mesh_dim_names=("dp", "ep"))
    return Dist(dist.get_rank(), world, mesh, device)


def shutdown_distributed() -> None:
    """Leave the process group cleanly: wait for every rank, free finished work, then destroy
    the groups (a gloo group torn down by the interpreter at exit can abort the process)."""
    if dist.is_initialized():
        import gc

        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def global_sum(x: torch.Tensor, d: Dist | None) -> torch.Tensor:
    """Sum of ``x`` over all ranks, differentiable through this rank's ``x`` only."""
    if d is None:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


# ---------------------------------------------------------------------------------- expert parallel

def _a2a(x: torch.Tensor, send: list[int], recv: list[int], group, grad: bool) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    if grad:
        import torch.distributed.nn.functional as dnf

        return dnf.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class ExpertParallel:
    """The kernel namespace of an MoE layer whose experts are split over the ``ep`` ranks."""

    def __init__(self, base, d: Dist, num_experts: int):
        self.base, self.d = base, d
        self.ep = d.mesh["ep"].size()
        self.local = num_experts // self.ep
        self.ep_rank = d.mesh["ep"].get_local_rank()

    def __getattr__(self, name):
        return getattr(self.base, name)

    def moe_experts(self, x_TD, experts: ExpertWeights, ids_TK, weights_TK, act=reference.silu_mul):
        """Dispatch each (token, slot) to the rank owning its expert, compute there, bring results back."""
        group, El = self.d.ep_group, self.local
        w13_l, w2_l = experts.w13.to_local().unbind(0), experts.w2.to_local().unbind(0)  # cheap backward (one stack)
        T, K = ids_TK.shape
        flat = ids_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)  # grouped by expert, hence by destination rank
        tok, expert = order // K, flat[order]
        send = torch.bincount(expert // El, minlength=self.ep)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        send_l, recv_l = send.tolist(), recv.tolist()
        grad = torch.is_grad_enabled()
        x_in = _a2a(x_TD[tok], send_l, recv_l, group, grad)
        e_in = _a2a(expert % El, send_l, recv_l, group, False)
        y_in = x_in.new_zeros(x_in.shape)
        for j in range(El):  # local experts over the tokens every rank sent them
            rows = (e_in == j).nonzero().squeeze(1)
            if rows.numel():
                y_in = y_in.index_copy(0, rows, reference.mlp(x_in[rows], w13_l[j], w2_l[j], act))
        y_out = _a2a(y_in, recv_l, send_l, group, grad)
        w = weights_TK.reshape(-1)[order].to(x_TD.dtype)
        y_TD = torch.zeros_like(x_TD).index_add(0, tok, y_out * w[:, None])
        if experts.has_shared:
            gate_T = experts.shared_gate_T
            s_TD = reference.mlp(x_TD, experts.shared_w13, experts.shared_w2, act)
            y_TD = y_TD + (s_TD if gate_T is None else gate_T.to(s_TD.dtype)[:, None] * s_TD)
        return y_TD


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, MoE) for p in (m.experts.w13, m.experts.w2)]


def parallelize(model: nn.Module, d: Dist, cfg: ParallelConfig) -> nn.Module:
    """Apply expert parallelism and FSDP2 (or replicated data parallelism) in place."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if cfg.ep > 1:
        for m in moes:
            E = m.experts.w13.shape[0]
            if E % cfg.ep:
                raise ConfigError(f"parallel.ep={cfg.ep} must divide the number of experts ({E})")
            for name in ("w13", "w2"):
                full = getattr(m.experts, name).data
                setattr(m.experts, name, nn.Parameter(distribute_tensor(full, d.mesh, [Replicate(), Shard(0)])))
            m.kernels = ExpertParallel(m.kernels, d, E)
    if cfg.fsdp:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        flat = d.mesh._flatten("dp_ep") if cfg.ep > 1 else d.mesh["dp"]
        ignored = set(expert_params(model)) if cfg.ep > 1 else None
        policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy()
        for block in model.layers:
            fully_shard(block, mesh=flat, ignored_params=ignored, offload_policy=policy)
        fully_shard(model, mesh=flat, ignored_params=ignored, offload_policy=policy)
    return model


def sync_gradients(model: nn.Module, d: Dist, cfg: ParallelConfig) -> None:
    """Average what FSDP2 does not: replicated parameters over all ranks, expert shards over ``dp``."""
    experts = set(expert_params(model)) if cfg.ep > 1 else set()
    for p in model.parameters():
        if p.grad is None:
            continue
        if p in experts:  # this rank's shard: summed over the dp replicas, averaged over every rank
            g = p.grad.to_local()
            dist.all_reduce(g, group=d.dp_group)
            g.div_(d.world)
        elif not cfg.fsdp:
            dist.all_reduce(p.grad)
            p.grad.div_(d.world)
