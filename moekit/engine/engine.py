"""The generation engine: token ids in, token ids out. It knows nothing about text.

Shape legend: B rows still generating, P padded prompt length, V vocabulary.

A batch of prompts is left-padded, prefilled in one forward pass into a
static KV cache, then decoded one token per row per step. Finished rows are
dropped from the cache so later steps only compute live rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from moekit.engine.cuda_graph import GraphDecoder
from moekit.engine.cuda_graph import applies as graph_applies
from moekit.engine.kv_cache import KVCache
from moekit.engine.sampling import SamplingParams, sample
from moekit.engine.threads import ThreadGovernor
from moekit.errors import MoekitError
from moekit.models import MoEDecoder


@dataclass
class TokenEvent:
    """One new token of request ``index``; ``finish_reason`` is set on its last token."""

    index: int
    token_id: int
    finish_reason: str | None = None  # "stop" (a stop id) or "length" (max_new_tokens)


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, including a final stop id if one ended it
    finish_reason: str | None


class Stream:
    """Iterator over decoding steps (each a list of :class:`TokenEvent`); ``cancel`` ends a request early."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
        self.cancelled: set[int] = set()
        self._steps = engine._run(prompts, params, self.cancelled)

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        return self._steps

    def __next__(self) -> list[TokenEvent]:
        return next(self._steps)

    def cancel(self, index: int) -> None:
        """Stop request ``index`` before the next step (used for stop strings)."""
        self.cancelled.add(index)


class Engine:
    """Batched prefill + KV-cached decoding over a :class:`MoEDecoder`."""

    def __init__(self, model: MoEDecoder, eos_token_ids: Sequence[int] | int | None = None,
                 cuda_graph: bool | None = None, adapt_threads: bool = True):
        """cuda_graph: decode through captured CUDA graphs (:mod:`moekit.engine.cuda_graph`); None = when
        the model is on a CUDA device. True off CUDA runs the same fixed-shape step without capture.
        adapt_threads: on the CPU, use only the cores other processes leave free
        (:mod:`moekit.engine.threads`)."""
        self.model = model
        on_cuda = model.embed.weight.is_cuda
        on_cpu = model.embed.weight.device.type == "cpu"
        self.governor = ThreadGovernor() if adapt_threads and on_cpu else None
        use_graphs = (on_cuda if cuda_graph is None else cuda_graph) and graph_applies(model)
        self.graphs = GraphDecoder(model, capture=on_cuda) if use_graphs else None
        cfg = model.config
        if eos_token_ids is None:
            eos_token_ids = cfg.eos_token_id
        if eos_token_ids is None:
            eos_token_ids = ()
        self.eos_token_ids = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def _check(self, prompts, params) -> tuple[list[list[int]], list[SamplingParams]]:
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise MoekitError("prompts: at least one prompt is needed")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise MoekitError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise MoekitError(f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise MoekitError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        limit = self.model.config.max_position_embeddings
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if len(p) + sp.max_new_tokens > limit and self.model.config.rope_scaling is None:
                raise MoekitError(f"prompt {i}: {len(p)} prompt tokens + max_new_tokens={sp.max_new_tokens} exceed "
                                  f"the model's context of {limit}")
        return prompts, list(params)

    def stream(self, prompts, params: SamplingParams | list[SamplingParams] = SamplingParams()) -> Stream:
        """Decode a batch step by step: ``for events in engine.stream(...)``."""
        prompts, params = self._check(prompts, params)
        return Stream(self, prompts, params)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Decode a batch to completion."""
        prompts, params = self._check(prompts, params)
        out = [Completion(p, [], None) for p in prompts]
        for events in Stream(self, prompts, params):
            for ev in events:
                out[ev.index].token_ids.append(ev.token_id)
                out[ev.index].finish_reason = ev.finish_reason
        return out

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], cancelled: set[int]
             ) -> Iterator[list[TokenEvent]]:
        if self.governor is None:
            yield from self._steps(prompts, params, cancelled, lambda: None)
            return
        self.governor.start()
        try:
            yield from self._steps(prompts, params, cancelled, self.governor.update)
        finally:
            self.governor.restore()

    @torch.inference_mode()
    def _steps(self, prompts: list[list[int]], params: list[SamplingParams], cancelled: set[int], tick
               ) -> Iterator[list[TokenEvent]]:
        """The run itself; ``tick()`` before each forward pass (the thread governor)."""
        model, cfg = self.model, self.model.config
        device, dtype = model.embed.weight.device, model.embed.weight.dtype
        B, P = len(prompts), max(map(len, prompts))
        pad = torch.tensor([P - len(p) for p in prompts], device=device)
        ids_BP = torch.full((B, P), self.pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids_BP[b, P - len(p):] = torch.tensor(p, device=device)
        capacity = P + max(sp.max_new_tokens for sp in params)
        cache = (KVCache(cfg, B, capacity, dtype, device, pad) if self.graphs is None
                 else self.graphs.cache(B, capacity, pad))
        gens = [None if sp.seed is None else torch.Generator(device).manual_seed(sp.seed) for sp in params]
        if any(g is None and not sp.greedy for g, sp in zip(gens, params)):
            seed = int(torch.randint(0, 2**62, ()))  # unseeded rows still get their own generator
            gens = [g or torch.Generator(device).manual_seed(seed + i) for i, g in enumerate(gens)]
        seen_BV = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen_BV[b, p] = True
        counts_BV = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=device)
        stops = [set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_token_ids)) for sp in params]
        active = list(range(B))  # request index of each cache row
        n_out = [0] * B
        logits_BV = model(ids_BP, cache=cache, last_only=True)[:, -1]
        if self.graphs is not None:
            yield from self.graphs.decode(cache, logits_BV, params, gens, seen_BV, counts_BV, stops, cancelled)
            return
        while True:
            suppress = [tuple(stops[i]) if n_out[i] < params[i].min_new_tokens else () for i in active]
            tok_B = sample(logits_BV, [params[i] for i in active], [gens[i] for i in active], seen_BV, counts_BV,
                           suppress)
            events, keep = [], []
            for r, (i, t) in enumerate(zip(active, tok_B.tolist())):
                n_out[i] += 1
                finish = "stop" if t in stops[i] else "length" if n_out[i] >= params[i].max_new_tokens else None
                events.append(TokenEvent(i, t, finish))
                if finish is None:
                    keep.append(r)
            yield events
            keep = [r for r in keep if active[r] not in cancelled]
            if not keep:
                return
            if len(keep) < len(active):
                cache.keep(keep)
                rows = torch.tensor(keep, device=device)
                seen_BV, counts_BV, tok_B = seen_BV[rows], counts_BV[rows], tok_B[rows]
                active = [active[r] for r in keep]
            seen_BV.scatter_(1, tok_B[:, None], True)
            counts_BV.scatter_add_(1, tok_B[:, None], torch.ones_like(tok_B[:, None], dtype=torch.float32))
            tick()
            logits_BV = model(tok_B[:, None], cache=cache)[:, -1]
