"""The one decoder every family builds from: pre-norm blocks, dense or MoE FFN per layer.

Shape legend: B batch, T tokens, D model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moekit.config import ModelConfig, count_params
from moekit.errors import MoekitError
from moekit.kernels import get_backend
from moekit.kernels.weights import QuantWeight, Weight, weight_views
from moekit.models.layers import MLP, Attention, Norm, Rotary
from moekit.models.moe import MoE


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, kernels):
        super().__init__()
        self.layer = layer
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm_eps, cfg.norm, kernels)
        self.attn = Attention(cfg, kernels)
        self.ffn_norm = Norm(cfg.hidden_size, cfg.norm_eps, cfg.norm, kernels)
        self.ffn = (MoE(cfg, layer, kernels) if cfg.is_moe_layer(layer)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, kernels))

    def forward(self, x_BTD, cos, sin, cache=None):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, cache, self.layer)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class MoEDecoder(nn.Module):
    """Decoder-only LM: ``model(input_ids)`` returns logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, kernels: str = "reference", device=None, dtype=None):
        """kernels: backend name (see :mod:`moekit.kernels`); device, dtype: where and how the weights
        will live (``auto`` picks the Triton kernels for CUDA, the C++ ones for bf16/fp32 on the CPU)."""
        super().__init__()
        self.config = cfg
        self.kernels = get_backend(kernels, count_params(cfg)[0], device, dtype)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(Block(cfg, i, self.kernels) for i in range(cfg.num_layers))
        self.norm = Norm(cfg.hidden_size, cfg.norm_eps, cfg.norm, self.kernels)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.quant = None  # a QuantConfig once quantised (moekit.models.quantize)
        self.offload = None  # the expert cache when loaded with max_memory (moekit.weights.offload)

    @property
    def output_weight(self) -> Weight:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids_BT: torch.Tensor, positions_BT: torch.Tensor | None = None, cache=None,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with ``last_only``, [B, K, V] with ``logits_at``).

        positions_BT: RoPE positions (default 0..T-1, or continuing ``cache``).
        cache: a KV cache that this call appends to (:mod:`moekit.engine.kv_cache`); None runs
            plain causal attention over ``input_ids_BT`` alone.
        logits_at: the K token indices whose logits are wanted (the engine's last token of each
            request, or prompt positions for prompt logprobs).
        """
        B, T = input_ids_BT.shape
        limit = None  # a host-side bound on the positions, when known (spares RoPE a device sync)
        if positions_BT is None:
            if cache is None:
                positions_BT, limit = torch.arange(T, device=input_ids_BT.device).expand(B, T), T
            else:
                positions_BT, limit = cache.positions(T), cache.position_limit(T)
        if cache is not None:
            cache.prepare(T)
        x_BTD = self.embed(input_ids_BT)
        dynamic = self.rotary.scaling is not None and self.rotary.scaling.kind == "dynamic"
        seq_BT = cache.sequence_lengths() if dynamic and hasattr(cache, "sequence_lengths") else None
        cos, sin = self.rotary(positions_BT, x_BTD.dtype, limit, seq_BT)
        for block in self.layers:
            x_BTD = block(x_BTD, cos, sin, cache)
        if cache is not None:
            cache.commit(T)
        if last_only:
            x_BTD = x_BTD[:, -1:]
        elif logits_at is not None:
            x_BTD = x_BTD[:, logits_at]
        return self.kernels.linear(self.norm(x_BTD), self.output_weight)

    def offload_stats(self) -> dict | None:
        """Expert-offload cache statistics (hits, misses, bytes read, ...); None when not offloaded."""
        return None if self.offload is None else self.offload.stats.as_dict()

    def _apply(self, fn, recurse=True):
        if self.offload is not None:  # .to() / .half() would copy every expert stack in full
            raise MoekitError("an expert-offloaded model stays where it was loaded, in its dtype; load it again "
                              "with other dtype= / device= arguments")
        return super()._apply(fn, recurse)

    @contextmanager
    def record_routing(self) -> Iterator[list]:
        """``with model.record_routing() as routing: model(x)``: each MoE layer appends its
        :class:`~moekit.models.moe.Routing` (router logits for the balance losses, choices, drops).

        The list reaches the layers as an attribute, not a forward argument, so wrappers that
        rebuild forward arguments (FSDP2) cannot detach it.
        """
        routing: list = []
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        for m in moes:
            m.sink = routing
        try:
            yield routing
        finally:
            for m in moes:
                m.sink = None

    def named_views(self) -> dict[str, torch.Tensor]:
        """Every checkpoint-level tensor of the model, by moekit's canonical name.

        Plain parameters appear under their own names; stacked tensors appear as
        per-projection views (``layers.3.ffn.experts.5.gate``), which is what
        family name tables map to and from.
        """
        if self.offload is not None:  # most experts are not in memory: a save or export would write zeros
            raise MoekitError("an expert-offloaded model holds only its cached experts; save or convert the "
                              "checkpoint it was loaded from instead")
        out: dict[str, torch.Tensor] = {}
        fused = {}
        for name, module in self.named_modules():
            if hasattr(module, "views") and callable(module.views):
                fused[name] = module
                out.update({f"{name}.{k}": v for k, v in module.views().items()})
        for name, p in self.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if owner not in fused:
                out[name] = p
        for name, module in self.named_modules():  # a quantised weight of its own (the LM head)
            if isinstance(module, QuantWeight) and name.rsplit(".", 1)[0] not in fused:
                out.update(weight_views(module, name))
        return out

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation: N(0, std) matrices, unit norm weights, zero biases and padding."""
        for module in self.modules():
            if isinstance(module, Norm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
        for name, p in self.named_parameters():
            if name.endswith(".attn.bqkv"):
                p.zero_()
            elif "norm." not in name:
                p.normal_(0.0, std, generator=generator)
        for module in self.modules():
            if hasattr(module, "zero_padding"):
                module.zero_padding()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after ``to_empty`` from the meta device)."""
        self.rotary.reset()
