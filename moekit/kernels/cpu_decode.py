"""The CPU backend's fused decode step: a whole model's forward pass over the engine's paged KV cache
in one C++ call (``cpu/decode.cpp``).

Shape legend: N tokens of a step (one per request), R requests, M block-table width, A head width,
V vocabulary; KV pools [L, P, G, C, A].

A decode step of a small MoE model takes a few milliseconds of kernel time, and driving it layer by
layer from Python adds about as much again (some 20 Python-level ops per layer). :func:`build` hands
every layer's weights to a C++ ``Decoder`` once; each step is then one call that runs the per-op
path's kernels in the same order with the same arguments, so the logits are the per-op path's bit
for bit (``tests/test_cpu_decode.py`` checks that, and the reference path). The engine uses it for
pure decode steps of at most :data:`MAX_TOKENS` requests; anything else (prefill chunks, bigger
batches, expert offload, recorded routing) runs the model's own forward.
"""

from __future__ import annotations

import torch

from moekit.kernels import cpu
from moekit.kernels.weights import QuantWeight, Weight

MAX_TOKENS = cpu.MAX_TOKENS  # more tokens take ATen's GEMMs on the per-op path


def _weight(w: Weight | None, name: str) -> dict:
    """The Decoder's entries for one weight: the tensor, and its scales if quantised."""
    if w is None:
        return {}
    if isinstance(w, QuantWeight):
        return {name: w.data, f"{name}_scale": w.scale}
    return {name: w}


def _norm(norm, name: str) -> dict:
    return {name: norm.weight, **({f"{name}_bias": norm.bias} if norm.kind == "layer" else {})}


def _is_moe(ffn) -> bool:
    """An MoE FFN (router, experts) rather than a dense MLP; read from the module, so that the kernels
    need not import the models that import them."""
    return hasattr(ffn, "router") and hasattr(ffn, "experts")


def _layer(block, eps: float) -> dict:
    """One block's weights and routing settings, as decode.cpp's Layer reads them."""
    a, f = block.attn, block.ffn
    d = {"norm_eps": eps, **_norm(block.attn_norm, "attn_norm"), **_norm(block.ffn_norm, "ffn_norm"),
         **_weight(a.wqkv, "wqkv"), **_weight(a.wo, "wo"), "bqkv": a.bqkv, "moe": _is_moe(f)}
    if not _is_moe(f):
        return {**d, **_weight(f.w13, "w13"), **_weight(f.w2, "w2")}
    m, r = f.router.m, f.router
    d.update(**_weight(f.experts.w13, "w13"), **_weight(f.experts.w2, "w2"), router=r.proj.weight,
             router2=None if r.proj2 is None else r.proj2.weight, router_bias=r.bias, router_fp32=m.router_fp32,
             softmax=m.score_func == "softmax", renormalize=m.renormalize, renormalize_eps=m.renormalize_eps,
             top_k=m.top_k, routed_scale=float(f.scale))
    if f.shared is not None:
        d.update(**_weight(f.shared.w13, "shared_w13"), **_weight(f.shared.w2, "shared_w2"),
                 shared_gate=None if f.shared_gate is None else f.shared_gate.weight)
    return d


def _unfit(model) -> str | None:
    """Why the fused step cannot run ``model`` (None when it can)."""
    cfg, w = model.config, model.embed.weight
    if model.offload is not None:
        return "expert offload (experts are paged in from Python per layer)"
    if w.device.type != "cpu" or w.dtype not in cpu.DTYPES:
        return f"{w.device.type} {w.dtype} weights"
    if cfg.head_dim % 16:
        return f"head width {cfg.head_dim} is not a multiple of 16"
    x = torch.zeros(1, cfg.hidden_size, dtype=w.dtype)
    for i, block in enumerate(model.layers):
        f = block.ffn
        mats = [block.attn.wqkv, block.attn.wo]
        plain = [block.attn_norm.weight, block.ffn_norm.weight] + ([] if block.attn.bqkv is None else [block.attn.bqkv])
        if _is_moe(f):
            mats += [f.experts.w13, f.experts.w2] + ([] if f.shared is None else [f.shared.w13, f.shared.w2])
            router = [f.router.proj.weight] + ([] if f.router.proj2 is None else [f.router.proj2.weight])
            if any(isinstance(t, QuantWeight) for t in router):
                return f"layer {i}: a quantised router"
            if not all(t.is_contiguous() for t in router):
                return f"layer {i}: a non-contiguous router weight"
            if f.shared_gate is not None:
                plain.append(f.shared_gate.weight)
        else:
            mats += [f.w13, f.w2]
        why = cpu._unfit_weights(x, *mats, *plain)
        if why:
            return f"layer {i}: {why}"
    return cpu._unfit_weights(x, model.output_weight, model.norm.weight)


class FusedDecoder:
    """``runner(ids, positions, slots, tables, lens, kv)``: logits [N, V] of a pure decode step, and their argmax."""

    def __init__(self, model, aten: bool):
        self.model, cfg = model, model.config
        eps = cfg.norm_eps
        top = {"norm_eps": eps, **_norm(model.norm, "norm"), **_weight(model.output_weight, "lm_head"),
               "embed": model.embed.weight, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
               "head_dim": cfg.head_dim, "aten": aten}
        self.decoder = cpu.extension().Decoder([_layer(b, eps) for b in model.layers], top)
        self.moes = [b.ffn for b in model.layers if _is_moe(b.ffn)]
        scaling = cfg.rope_scaling
        self.dynamic = scaling is not None and scaling.kind == "dynamic"

    def applies(self, num_tokens: int) -> bool:
        """Whether a decode step of this many tokens runs fused now (not while routing is recorded)."""
        return num_tokens <= MAX_TOKENS and not self.model.training and all(m.sink is None for m in self.moes)

    def __call__(self, ids: list[int], pos: list[int], slots: list[int], table: list[list[int]], lens: list[int],
                 kv) -> tuple[torch.Tensor, list[int]]:
        """Logits [N, V] of one token a request (N = R) and each row's argmax (greedy sampling's token, taken
        while the logits are in cache). ids, positions, pool slots, block tables and lengths (cached tokens
        with this one) as Python lists; ``kv``: the engine's PagedKVCache."""
        dtype = self.model.embed.weight.dtype
        if self.dynamic:  # NTK angles depend on each token's sequence: its request's length
            cos, sin = self.model.rotary(torch.tensor(pos)[None], dtype, max(pos) + 1, torch.tensor(lens)[None])
            cos, sin, rows = cos[0], sin[0], list(range(len(pos)))
        else:
            (cos, sin), rows = self.model.rotary.table(dtype, max(pos) + 1, self.model.embed.weight.device), pos
        return self.decoder.step(ids, rows, slots, table, lens, cos, sin, kv.k_LPGCA, kv.v_LPGCA)


def build(model, aten: bool) -> tuple[FusedDecoder | None, str]:
    """(the fused decode step of ``model``, "") or (None, why it cannot run)."""
    with torch.no_grad():  # the engine runs without autograd; parameters may still require grad
        why = _unfit(model)
    return (None, why) if why else (FusedDecoder(model, aten), "")
