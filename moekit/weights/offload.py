"""Expert offload: run a checkpoint larger than memory, routed experts read from disk on demand.

``moekit.load(path, max_memory=GiB)`` keeps every tensor but the routed experts in memory and
gives the experts an LRU cache (moekit/weights/expert_cache.py) sized so that

    max_memory >= resident weights + expert cache + read buffer + working memory

- resident weights: embeddings, attention, norms, routers, shared experts, dense MLPs, LM head
  (and expert stacks whose per-expert size is not a whole number of 4 KiB pages, which cannot be
  paged per expert: tiny models, per-channel int8 scales);
- expert cache: a pool of pages allocated once, at least top_k experts per MoE layer (and a
  whole layer's experts, so that any prompt's experts fit at once);
- read buffer: only when expert tensors are converted on the way in (another dtype on disk, GGUF
  blocks);
- working memory: a quarter of the resident weights, at most WORKING bytes, kept free for the KV cache and
  activations of decoding (measured: 7-22 MiB for a 64-token decode of the 742M bench model).

Not counted: the Python and PyTorch runtime (docs/quantization.md, "Expert offload", has the
measured figures).

The checkpoint is a list of sources (:class:`moekit.weights.expert_cache.Source`), each filling one
or more of the model's views: a safetensors folder's tensors (:class:`Stored`, read here) or a GGUF
file's tensors and expert slices (:class:`moekit.weights.gguf_tensors.GGUFSlice`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import re
import sys
import weakref
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moekit.errors import MoekitError
from moekit.families import NameMap
from moekit.kernels.weights import QuantWeight
from moekit.models import MoEDecoder
from moekit.models.moe import MoE
from moekit.models.quantize import QuantConfig, quantize_model
from moekit.weights.expert_cache import PAGE, Expert, ExpertCache, Stored, buffer_for, size, virtual
from moekit.weights.io import CheckpointError
from moekit.weights.load import (
    SAFE_DTYPES,
    _allocate,
    _check_headers,
    _check_size,
    _on_meta,
    _raise,
    logical_shape,
    read_config,
    stored_format,
    target_names,
)

log = logging.getLogger(__name__)
GIB = 2**30
WORKING = 32 << 20  # bytes of the budget left for the KV cache and activations
TORCH_DTYPES = {v: k for k, v in SAFE_DTYPES.items()}


def _layout(path: Path) -> dict[str, Stored]:
    """Every tensor of a safetensors file with its absolute byte range (header only)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < min(size, 1 << 28) else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a readable safetensors file (bad header)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1))
        dtype = TORCH_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {name!r} has dtype {info.get('dtype')!r}, which moekit does not read")
        shape = tuple(info.get("shape", ()))
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or 8 + n + end > size:
            raise CheckpointError(f"{path.name}: tensor {name!r} has a byte range that does not fit its shape "
                                  "or the file (truncated?)")
        out[name] = Stored(path, name, 8 + n + begin, end - begin, dtype, shape)
    return out


def _stacks(experts: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every stacked tensor of an Experts module (a quantised one: data and scales)."""
    out = []
    for attr in ("w13", "w2"):
        w = getattr(experts, attr)
        out += [(w, "data"), (w, "scale")] if isinstance(w, QuantWeight) else [(experts, attr)]
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _budget_error(path: Path, max_memory: float, resident: int, need: int, per_expert: dict, cfg) -> MoekitError:
    m = cfg.moe
    cache = (f"the expert cache needs at least {size(need)} (top-{m.top_k} experts x {len(per_expert)} MoE layers, "
             f"and one layer's {m.num_experts}, at {size(max(per_expert.values()))} per expert)" if per_expert else
             "no expert stack can be paged (an expert's bytes must be whole 4 KiB pages)")
    return MoekitError(
        f"max_memory={max_memory:g} GiB is too small for {path}: the weights kept in memory (embeddings, attention, "
        f"norms, routers, shared/dense MLPs, LM head) and working memory take {size(resident)} and {cache}: at least "
        f"{(resident + need) / GIB:.3g} GiB in all (every expert: {size(sum(per_expert.values()) * m.num_experts)})")


def load_offloaded(path: str | Path, max_memory: float, dtype: torch.dtype | str | None = None,
                   device: str | torch.device = "cpu", kernels: str = "auto", progress: bool | None = None,
                   quantize: str | QuantConfig | None = None, group: int | None = None) -> MoEDecoder:
    """Load a safetensors checkpoint folder or a GGUF file within ``max_memory`` GiB (see the module
    doc): the routed experts stay in the files and are read into an LRU cache when a layer routes to
    them. ``model.offload_stats()`` reports hits, misses and bytes read. ``quantize`` / ``group``:
    int8 / int4 matrices, each quantised as it is read (an expert: on every cache miss)."""
    if not isinstance(max_memory, (int, float)) or isinstance(max_memory, bool) or not max_memory > 0:
        raise MoekitError(f"max_memory={max_memory!r}: give the memory budget in GiB, a number > 0")
    if not sys.platform.startswith("linux"):
        raise MoekitError("expert offload (max_memory) needs Linux: the cache moves pages between experts with mremap")
    if torch.device(device).type != "cpu":
        raise MoekitError(f"max_memory on {device}: expert offload computes on the CPU for now")
    if str(path).endswith(".gguf"):
        from moekit.weights.gguf_import import plan_gguf

        plan = plan_gguf(path, dtype, quantize, group)
        meta, dtype = plan.on_meta(device, kernels), plan.dtype
        reads = plan.reads(meta.named_views(), meta.kernels)
    else:
        meta, dtype, reads = _safetensors_sources(Path(path), dtype, device, kernels,
                                                  QuantConfig.requested(quantize, group))
    return _offload(Path(path), meta, dtype, reads, max_memory, progress)


def _safetensors_sources(folder: Path, dtype, device, kernels,
                         wanted: QuantConfig | None = None) -> tuple[MoEDecoder, torch.dtype, list]:
    """The model on the meta device, its dtype, and [(Stored, names of the views it fills)] for every
    tensor of a folder's safetensors files (headers checked against the model); ``wanted``: quantize=,
    each matrix quantised as it is read."""
    cfg, family, files, _ = read_config(folder)
    pickles = [f.name for f in files if f.suffix != ".safetensors"]
    if pickles:
        raise CheckpointError(f"{folder}: expert offload reads each expert at its byte offset in a safetensors file, "
                              f"but {pickles[0]} is a PyTorch pickle (.bin), which can only be loaded whole; convert "
                              "the folder once (moekit.save(moekit.load(folder), new_folder) writes safetensors)")
    dtype, quant = stored_format(folder, cfg, dtype)
    if quant and wanted:
        raise CheckpointError(f"{folder}: already quantised ({quant.format}); load it without quantize=, or "
                              "quantise its floating-point checkpoint")
    _check_size(cfg, folder, files, quant)
    meta = _on_meta(cfg, dtype, device, kernels)
    if quant or wanted:
        quantize_model(meta, quant or wanted, structure_only=True)
    table = NameMap(family.names(cfg))
    model_views = meta.named_views()
    for name in model_views:
        if table.to_hf(name) is None:
            raise CheckpointError(f"family {family.name!r} has no checkpoint name for moekit tensor {name!r}")
    ours = target_names(model_views, table, wanted)
    views = {hf: tuple(model_views[n] for n in ns) for hf, ns in ours.items()}
    _check_headers(folder, files, {n: (logical_shape(t), t[0].dtype if len(t) == 1 else dtype)
                                   for n, t in views.items()})
    stored: dict[str, Stored] = {}
    for f in files:
        stored.update(_layout(f))
    skip = [re.compile(p) for p in family.ignore] + ([re.compile(r"lm_head\.weight")] if cfg.tie_word_embeddings else [])
    _raise([f"{stored[n].path.name}: unexpected tensor {n!r}" for n in stored
            if n not in views and not any(p.fullmatch(n) for p in skip)],
           f"{folder}: tensors that a {family.name} model with this config.json does not have")
    _raise([f"missing tensor {n!r}" for n in views if n not in stored],
           f"{folder}: tensors the config.json requires are absent")
    return meta, dtype, [(dataclasses.replace(stored[n], compute=dtype, kernels=meta.kernels) if len(ours[n]) == 2
                          else stored[n], ours[n]) for n in views]


def _offload(path: Path, meta: MoEDecoder, dtype: torch.dtype, reads: list, max_memory: float,
             progress: bool | None) -> MoEDecoder:
    """Size the cache within the budget, allocate the resident weights, read them, and route every MoE
    layer's experts through the cache. ``reads``: [(source, names of the views it fills)]."""
    meta.to(dtype=dtype)  # the sizes below are those the weights will have
    cfg, views = meta.config, meta.named_views()
    moes = {b.layer: b.ffn for b in meta.layers if isinstance(b.ffn, MoE)}
    paged = {id(getattr(o, a)) for m in moes.values() for o, a in _stacks(m.experts)
             if _nbytes(getattr(o, a)) // cfg.moe.num_experts % PAGE == 0}
    per_expert = {layer: sum(_nbytes(getattr(o, a)) // cfg.moe.num_experts for o, a in _stacks(m.experts)
                             if id(getattr(o, a)) in paged) for layer, m in moes.items()}
    per_expert = {layer: n for layer, n in per_expert.items() if n}
    expert_params = {id(t) for m in moes.values() for t in (*m.experts.parameters(), *m.experts.buffers())}
    resident = sum(_nbytes(t) for t in (*meta.parameters(), *meta.buffers()) if id(t) not in expert_params)
    resident += sum(_nbytes(t) for m in moes.values() for t in (*m.experts.parameters(), *m.experts.buffers())
                    if id(t) not in paged)
    on_demand = [any(id(_root(views[n])) in paged for n in names) for _, names in reads]  # an expert's tensor
    expert_reads = [r for r, paged_read in zip(reads, on_demand) if paged_read]
    scratch = max((src.scratch(tuple(views[n] for n in names)) for src, names in expert_reads), default=0)
    total = sum(per_expert.values()) * cfg.moe.num_experts
    need = max(sum(per_expert.values()) * cfg.moe.top_k, max(per_expert.values(), default=0) * cfg.moe.num_experts)
    budget = int(max_memory * GIB)
    working = min(WORKING, resident // 4)
    capacity = min(total, max(0, budget - resident - scratch - working) // PAGE * PAGE)
    if budget < resident + scratch + working or capacity < need:
        raise _budget_error(path, max_memory, resident + scratch + working, need, per_expert, cfg)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if resident + capacity > ram:
        raise MoekitError(f"max_memory={max_memory:g} GiB: the resident weights and expert cache would take "
                          f"{(resident + capacity) / GIB:.2f} GiB, more than this machine's {ram / GIB:.1f} GiB")

    model, stacks = _materialize(meta, dtype, moes, paged)
    views = model.named_views()
    show = sys.stderr.isatty() if progress is None else progress
    _read_resident(path, [r for r, paged_read in zip(reads, on_demand) if not paged_read], views, show)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the conversions' freed heap back before the cache takes its pages
    cache = ExpertCache(_experts(stacks, expert_reads, views), capacity)
    cache.stats.resident_bytes, cache.stats.working_bytes, cache.stats.buffer_bytes = resident, working, scratch
    weakref.finalize(model, cache.close)
    for layer in stacks:  # the expert kernel of every layer with paged stacks goes through the cache (a layer
        ffn = model.layers[layer].ffn  # whose stacks are not whole pages per expert stays resident)
        ffn.kernels = dataclasses.replace(ffn.kernels, moe_experts=OffloadedExperts(ffn.kernels.moe_experts, cache,
                                                                                      layer))
    model.offload = cache
    log.info("expert offload: %.2f GiB resident, a %.2f GiB cache for %.2f GiB of experts (%.0f%%)",
             resident / GIB, capacity / GIB, total / GIB, 100 * capacity / max(total, 1))
    for line in model.kernels.describe():
        log.info(line)
    return model.eval()


def _root(view: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken from (itself if it is not a view)."""
    return view if view._base is None else view._base


def _materialize(meta: MoEDecoder, dtype: torch.dtype, moes: dict, paged: set) -> tuple[MoEDecoder, dict]:
    """Allocate the resident weights; paged expert stacks become page-less virtual memory.
    Returns the model and {layer: its paged stacks}."""
    experts = {}
    for layer, moe in moes.items():
        experts[layer] = moe.experts
        del moe.experts  # _allocate must not allocate (or zero-pad) them
    model = _allocate(meta, dtype, "cpu")
    stacks: dict[int, list[torch.Tensor]] = {}
    for layer, ex in experts.items():
        for owner, attr in _stacks(ex):
            t = getattr(owner, attr)
            new = virtual(_nbytes(t), t.dtype, t.shape) if id(t) in paged else torch.zeros(t.shape, dtype=t.dtype)
            setattr(owner, attr, nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new)
            if id(t) in paged:
                stacks.setdefault(layer, []).append(getattr(owner, attr))
        model.layers[layer].ffn.experts = ex
    return model, stacks


def _read_resident(path: Path, reads: list, views: dict, show: bool) -> None:
    """Fill the resident weights from their sources, file by file; NaN / infinity is named."""
    by_file: dict[Path, list] = {}
    for source, names in reads:
        by_file.setdefault(source.path, []).append((source, tuple(views[n] for n in names)))
    buffer = buffer_for([r for todo in by_file.values() for r in todo])
    not_finite = []
    with tqdm(total=sum(src.nbytes for src, _ in reads), desc=f"loading {path.name} (experts on demand)",
              unit="B", unit_scale=True, disable=not show) as bar:
        for file, todo in by_file.items():
            fd = os.open(file, os.O_RDONLY)
            try:
                sums = []
                for source, vs in todo:
                    source.fill(fd, vs, buffer=buffer)
                    sums += [(source.name, v, v.sum()) for v in vs if v.is_floating_point()]  # while in cache
                    bar.update(source.nbytes)
            finally:
                os.close(fd)
            if sums and not bool(torch.isfinite(torch.stack([s.float() for _, _, s in sums])).all()):
                not_finite += [f"{file.name}: tensor {name!r} has {int((~torch.isfinite(v)).sum())} NaN or infinite "
                               f"value(s) of {v.numel()}" for name, v, _ in sums if not bool(torch.isfinite(v).all())]
    _raise(not_finite, f"{path}: tensors with values that are not finite numbers")


EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\..+")


def _experts(stacks: dict, reads: list, views: dict) -> dict:
    """(layer, expert) -> :class:`Expert`: its page ranges in the paged stacks and its sources to read."""
    by_key: dict[tuple[int, int], list] = {}
    for source, names in reads:
        m = EXPERT.fullmatch(names[0])
        by_key.setdefault((int(m[1]), int(m[2])), []).append((source, tuple(views[n] for n in names)))
    out, own = {}, {layer: {t.data_ptr() for t in paged} for layer, paged in stacks.items()}
    for (layer, e), rd in by_key.items():
        spans = [(t.data_ptr() + e * _nbytes(t[0]), _nbytes(t[0])) for t in stacks[layer]]
        filled = sum(_nbytes(v) for _, vs in rd for v in vs if _root(v).data_ptr() in own[layer])
        out[(layer, e)] = Expert(spans, rd, filled == sum(n for _, n in spans))
    return out


class OffloadedExperts:
    """One offloaded layer's ``moe_experts``: make the experts it routes to resident, then run the
    backend's kernel on the full stacks."""

    def __init__(self, inner, cache: ExpertCache, layer: int):
        self.inner, self.cache, self.layer = inner, cache, layer

    def __call__(self, x_TD, experts, ids_TK, weights_TK, *args, **kw):
        self.cache.ensure(self.layer, ids_TK)
        return self.inner(x_TD, experts, ids_TK, weights_TK, *args, **kw)
