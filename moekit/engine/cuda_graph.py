"""Decoding with one CUDA graph per (batch, cache size): fixed shapes, a device-side cache length, no per-step sync.

Shape legend: L layers, B rows, G key/value heads, S cache capacity, T new tokens,
A head width, V vocabulary.

A decode step launches hundreds of small kernels (about 17 per layer); replaying them
as one captured graph removes the CPU launch cost. A graph fixes every shape and
pointer, so this path differs from the eager one in three ways:

- the cache (:class:`GraphKVCache`) keeps its length in a device tensor and, in its
  ``static`` mode, writes keys at that position and attends over all S slots with a
  mask built on the device (the eager cache slices ``[:length]`` with a host integer);
- rows never leave the batch: finished rows keep computing and their tokens are ignored
  (the eager loop drops them, which would change the graph's shapes);
- the host reads step n's tokens while step n + 1 already runs: the next step is
  launched from the tokens on the device, then the host waits for step n's copy, emits
  its events, and decides what ends. Greedy rows without penalties pick tokens with one
  on-device argmax; other sampling uses :func:`~moekit.engine.sampling.sample` as the
  eager loop does (with its own small syncs).

Graphs and their caches are kept per (B, capacity rounded up to ``BUCKET``) and reused
by later requests. Off CUDA (tests) the same fixed-shape step runs without capture.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moekit.engine.kv_cache import KVCache
from moekit.engine.sampling import SamplingParams, sample

BUCKET = 256  # cache capacities are rounded up to this, so nearby prompt lengths share a graph


class GraphKVCache(KVCache):
    """A :class:`KVCache` whose length also lives on the device; ``static`` mode has fixed shapes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.length_t = torch.zeros((), dtype=torch.long, device=self.pad_B.device)
        self.static = False  # True while decoding: full-capacity keys, device-side positions and mask

    def reset(self, pad_B: torch.Tensor) -> None:
        """Reuse the buffers for a new batch (in place: a captured graph holds these pointers)."""
        self.length = 0
        self.length_t.zero_()
        self.pad_B.copy_(pad_B)
        self.static = False

    def position_limit(self, T: int) -> int:
        return self.capacity

    def positions(self, T: int) -> torch.Tensor:
        if not self.static:
            return super().positions(T)
        slots = self.length_t + torch.arange(T, device=self.pad_B.device)
        return (slots[None, :] - self.pad_B[:, None]).clamp_min(0)

    def prepare(self, T: int) -> None:
        if not self.static:
            return super().prepare(T)
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} + {T} tokens exceed capacity {self.capacity}")
        q = (self.length_t + torch.arange(T, device=self.pad_B.device))[:, None]  # [T, 1] query slots
        s = torch.arange(self.capacity, device=self.pad_B.device)[None, :]  # [1, S] every key slot
        real = s[None] >= self.pad_B[:, None, None]  # [B, 1, S]
        self._mask_BTS = ((s <= q)[None] & real) | (s == q)[None]

    def update(self, layer: int, k_BGTA: torch.Tensor, v_BGTA: torch.Tensor):
        if not self.static:
            return super().update(layer, k_BGTA, v_BGTA)
        slots = self.length_t + torch.arange(k_BGTA.shape[2], device=self.pad_B.device)
        self.k_LBGSA[layer].index_copy_(2, slots, k_BGTA)
        self.v_LBGSA[layer].index_copy_(2, slots, v_BGTA)
        return self.k_LBGSA[layer], self.v_LBGSA[layer], self._mask_BTS

    def commit(self, T: int) -> None:
        super().commit(T)
        self.length_t += T

    def keep(self, rows) -> None:
        raise RuntimeError("GraphKVCache keeps every row (a captured graph fixes the batch)")


class DecodeStep:
    """One decode step (logits of B new tokens) over a static :class:`GraphKVCache`, captured when on CUDA."""

    def __init__(self, model, cache: GraphKVCache, capture: bool):
        self.model, self.cache = model, cache
        self.tok_B1 = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.pad_B.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_BV: torch.Tensor | None = None
        self.capture = capture
        self.busy = False  # serving a request (concurrent streams each get their own step and cache)

    def _forward(self) -> torch.Tensor:
        return self.model(self.tok_B1, cache=self.cache)[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (autotuning, allocator), then capture; the cache is left as it was."""
        cache, length = self.cache, self.cache.length
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # writes this step's slot, which the real step overwrites
                self._forward()
                cache.length = length
                cache.length_t.fill_(length)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV = self._forward()
        cache.length = length  # capture ran the Python once; replays advance the device length only
        cache.length_t.fill_(length)
        # the graph reads the RoPE tables it saw; if a longer request regrows them later, these must stay alive
        self.rope_tables = list(self.model.rotary._table.values())

    def __call__(self, tok_B: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for tokens [B] (the returned buffer is overwritten by the next call)."""
        self.tok_B1.copy_(tok_B[:, None])
        if not self.capture:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.cache.length += 1
        return self.logits_BV


def applies(model) -> bool:
    """Whether the fixed-shape decode step can run this model (dynamic-NTK RoPE needs the true max position)."""
    scaling = model.config.rope_scaling
    return scaling is None or scaling.kind != "dynamic"


def _plain_greedy(params: list[SamplingParams]) -> bool:
    return all(p.greedy and p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
               and p.min_new_tokens == 0 for p in params)


class GraphDecoder:
    """The engine's CUDA-graph decode path: caches and captured steps, kept per (batch, capacity bucket)."""

    def __init__(self, model, capture: bool):
        self.model, self.capture = model, capture
        self._steps: dict[tuple[int, int], list[DecodeStep]] = {}

    def cache(self, batch: int, length: int, pad_B: torch.Tensor) -> GraphKVCache:
        """A reset cache of at least ``length`` slots for ``batch`` rows, reserved until ``decode`` ends."""
        capacity = -(-length // BUCKET) * BUCKET
        steps = self._steps.setdefault((batch, capacity), [])
        step = next((s for s in steps if not s.busy), None)
        if step is None:
            w = self.model.embed.weight
            step = DecodeStep(self.model, GraphKVCache(self.model.config, batch, capacity, w.dtype, w.device, pad_B),
                              self.capture)
            steps.append(step)
        step.busy = True
        step.cache.reset(pad_B)
        return step.cache

    def decode(self, cache: GraphKVCache, logits_BV: torch.Tensor, params: list[SamplingParams], gens: list,
               seen_BV: torch.Tensor, counts_BV: torch.Tensor, stops: list[set[int]], cancelled: set[int]
               ) -> Iterator[list]:
        """Steps after the prefill (``logits_BV``: its last-position logits), as the eager loop yields them."""
        from moekit.engine.engine import TokenEvent

        step = next(s for s in self._steps[(cache.batch, cache.capacity)] if s.cache is cache)
        B = cache.batch
        greedy = _plain_greedy(params)
        penalties = not greedy
        n_out, done = [0] * B, [False] * B

        def pick(logits: torch.Tensor, ahead: int = 0) -> torch.Tensor:
            """Next tokens; ``ahead``: tokens already sampled that the host has not counted yet."""
            if greedy:
                return logits.argmax(-1)
            suppress = [tuple(stops[i]) if n_out[i] + ahead < params[i].min_new_tokens else () for i in range(B)]
            return sample(logits, params, gens, seen_BV, counts_BV, suppress)

        pinned = torch.empty(B, dtype=torch.long, pin_memory=cache.pad_B.is_cuda)
        tok_B = pick(logits_BV)
        cache.static = True
        try:
            while True:
                pinned.copy_(tok_B, non_blocking=True)
                copied = torch.cuda.Event() if tok_B.is_cuda else None
                if copied is not None:
                    copied.record()
                more = any(not done[i] and n_out[i] + 1 < params[i].max_new_tokens for i in range(B))
                if more:  # launch step n + 1 before the host looks at step n's tokens
                    if penalties:
                        seen_BV.scatter_(1, tok_B[:, None], True)
                        counts_BV.scatter_add_(1, tok_B[:, None], torch.ones_like(tok_B[:, None], dtype=torch.float32))
                    next_B = pick(step(tok_B), ahead=1)
                if copied is not None:
                    copied.synchronize()
                events = []
                for i, t in enumerate(pinned.tolist()):
                    if done[i]:
                        continue
                    n_out[i] += 1
                    finish = "stop" if t in stops[i] else "length" if n_out[i] >= params[i].max_new_tokens else None
                    events.append(TokenEvent(i, t, finish))
                    done[i] = finish is not None
                yield events
                for i in cancelled:
                    done[i] = True
                if all(done):
                    return
                tok_B = next_B
        finally:
            cache.static = False
            step.busy = False
