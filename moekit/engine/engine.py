"""The generation engine: token ids in, token ids out, many requests at once. It knows nothing about text.

Shape legend: N tokens in a step (all requests back to back), K positions whose logits are
read, V vocabulary, R requests in a step.

``add_request`` queues a request; each ``step()`` asks the :class:`~moekit.engine.scheduler.Scheduler`
which requests run and with how many tokens (decodes, prefill chunks), runs them as one
forward pass over the paged KV cache, samples the requests that reached their last token,
and returns one :class:`TokenEvent` per new token. Requests join and leave between any two
steps. ``generate`` and ``stream`` are loops over ``step()``. docs/generation.md has the picture.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moekit.engine.blocks import BlockPool
from moekit.engine.cuda_graph import GraphRunner, applies
from moekit.engine.kv_cache import PagedBatch, PagedKVCache
from moekit.engine.sampling import SamplingParams, draw_key, sample, top_logprobs
from moekit.engine.scheduler import FINISHED, Request, Scheduled, Scheduler
from moekit.engine.stream import Completion, Stream, TokenEvent, TokenLogprob
from moekit.engine.threads import ThreadGovernor
from moekit.errors import MoekitError
from moekit.models import MoEDecoder

log = logging.getLogger("moekit")
__all__ = ["Completion", "Engine", "EngineStats", "Stream", "TokenEvent", "TokenLogprob"]


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens run through the model
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache
    preemptions: int = 0
    peak_blocks: int = 0  # most blocks referenced at once
    peak_inflight_tokens: int = 0  # most tokens with keys/values in the cache at once (summed over requests)


def _memory_bytes(device: torch.device) -> int:
    """Memory the KV pool may take by default: a quarter of RAM, or 40% of the GPU's free memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.4)
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class Engine:
    """Continuous batching over a :class:`MoEDecoder`: a scheduler, a paged KV cache, vectorised sampling."""

    def __init__(self, model: MoEDecoder, eos_token_ids: Sequence[int] | int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512, kv_cache_bytes: int | None = None,
                 block_size: int = 16, prefix_caching: bool = True, cuda_graph: bool | None = None,
                 adapt_threads: bool = True, fused_decode: bool = True):
        """max_num_seqs: requests running at once; max_num_batched_tokens: tokens per step (decodes +
        prefill chunks); kv_cache_bytes: the KV pool (default: enough for max_num_seqs full contexts,
        at most a quarter of RAM / 40% of free GPU memory); prefix_caching: reuse cached prompt blocks.
        cuda_graph: decode steps through captured CUDA graphs (None = on a CUDA device).
        adapt_threads: on the CPU, use only the cores other processes leave free.
        fused_decode: run pure decode steps as one call into the kernels where the backend can (the CPU
        kernels: moekit/kernels/cpu_decode.py; the same logits as the per-op path); ``decode_path`` says."""
        self.model, cfg = model, model.config
        w = model.embed.weight
        self.device, self.dtype = w.device, w.dtype
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("block_size", block_size)):
            if not isinstance(v, int) or v < 1:
                raise MoekitError(f"Engine: {name}={v!r} must be an integer >= 1")
        block_bytes = PagedKVCache.block_bytes(cfg, block_size, self.dtype)
        if kv_cache_bytes is None:
            want = max_num_seqs * -(-cfg.max_position_embeddings // block_size) + 1
            num_blocks = min(want, max(2, _memory_bytes(self.device) // block_bytes))
        else:
            num_blocks = int(kv_cache_bytes) // block_bytes
            if num_blocks < 2:
                raise MoekitError(f"Engine: kv_cache_bytes={kv_cache_bytes} holds {num_blocks} blocks of "
                                  f"{block_bytes} bytes; at least 2 are needed")
        # dynamic-NTK RoPE rotates by the length of each forward pass: a prompt is prefilled whole, never from
        # cached blocks (they were computed at another length), for transformers' results
        dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic"
        self.pool = BlockPool(num_blocks, block_size, prefix_caching and not dynamic)
        self.kv = PagedKVCache(cfg, num_blocks, block_size, self.dtype, self.device)
        self.block_bytes = block_bytes
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens, chunked_prefill=not dynamic)
        self.governor = ThreadGovernor() if adapt_threads and self.device.type == "cpu" else None
        self._governing = False
        use_graphs = (self.device.type == "cuda" if cuda_graph is None else cuda_graph) and applies(model)
        self.graphs = GraphRunner(self, capture=self.device.type == "cuda") if use_graphs else None
        self.fused, self.decode_path = None, "CUDA graphs" if self.graphs is not None else "per-op forward"
        if self.graphs is None and fused_decode and model.kernels.fused_decoder is not None:
            self.fused, why = model.kernels.fused_decoder(model)
            self.decode_path = "fused: one call per step" if self.fused is not None else f"per-op forward ({why})"
            log.info("moekit engine: decode steps: %s", self.decode_path)
        if eos_token_ids is None:
            eos_token_ids = cfg.eos_token_id if cfg.eos_token_id is not None else ()
        self.eos_token_ids = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        self._outbox: dict[int, list[TokenEvent]] = {}  # events of requests a Stream collects

    # ---- the scheduler API -------------------------------------------------------------------------
    def check_request(self, prompt_ids, params: SamplingParams, what: str = "prompt") -> list[int]:
        """Validate one request (errors name the problem); returns the prompt as a list of ints."""
        if not isinstance(params, SamplingParams):
            raise MoekitError(f"{what}: params must be SamplingParams, got {type(params).__name__}")
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise MoekitError(f"{what} must be a sequence of token ids") from None
        if not prompt:
            raise MoekitError(f"{what} is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise MoekitError(f"{what} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}")
        limit = self.model.config.max_position_embeddings
        if len(prompt) + params.max_new_tokens > limit and self.model.config.rope_scaling is None:
            raise MoekitError(f"{what}: {len(prompt)} prompt tokens + max_new_tokens={params.max_new_tokens} "
                              f"exceed the model's context of {limit}")
        need = -(-(len(prompt) + params.max_new_tokens) // self.pool.block_size)
        if need > self.pool.num_blocks - 1:
            raise MoekitError(f"{what}: {len(prompt)} prompt tokens + max_new_tokens={params.max_new_tokens} need "
                              f"{need} KV blocks; the pool has {self.pool.num_blocks - 1} (raise kv_cache_bytes)")
        return prompt

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), priority: int = 0,
                    request_id: int | None = None) -> int:
        """Queue a request; returns its id (events carry it as ``TokenEvent.index``). Lower priority runs first."""
        prompt = self.check_request(prompt_ids, params)
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests:
            raise MoekitError(f"request id {rid} is already in use")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seeds))
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        req = Request(rid, prompt, params, seed, frozenset(stops), priority)
        if params.prompt_logprobs is not None:  # positions before the start are owed nothing
            req.prompt_logprobs = [None] * min(max(0, params.prompt_logprobs_start - 1), len(prompt) - 1)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def new_request_id(self) -> int:
        return next(self._ids)

    def abort(self, request_id: int) -> None:
        """End a request now (waiting or running); its blocks return to the pool. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None and req.status != FINISHED:
            self.scheduler.finish(req, "abort")
        self._outbox.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One iteration: schedule, run one forward pass over every scheduled token, sample, finish."""
        if self.governor is not None and not self._governing and self.has_unfinished():
            self.governor.start()
            self._governing = True
        plan = self.scheduler.schedule()
        events = self._execute(plan) if plan else []
        if self.governor is not None and self._governing and not self.has_unfinished():
            self.governor.restore()
            self._governing = False
        for ev in events:
            if ev.index in self._outbox:
                self._outbox[ev.index].append(ev)
        return events

    # ---- batch front ends ---------------------------------------------------------------------------
    def _check(self, prompts, params) -> tuple[list[list[int]], list[SamplingParams]]:
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not prompts:
            raise MoekitError("prompts: at least one prompt is needed")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise MoekitError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        prompts = [self.check_request(p, sp, f"prompt {i}") for i, (p, sp) in enumerate(zip(prompts, params))]
        return prompts, list(params)

    def stream(self, prompts, params: SamplingParams | list[SamplingParams] = SamplingParams()) -> Stream:
        """Decode a batch step by step: ``for events in engine.stream(...)`` (events indexed by prompt)."""
        prompts, params = self._check(prompts, params)
        return Stream(self, prompts, params)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Decode a batch to completion."""
        prompts, params = self._check(prompts, params)
        stream = Stream(self, prompts, params)
        out = [Completion(p, [], None) for p in prompts]
        for events in stream:
            for ev in events:
                c = out[ev.index]
                c.token_ids.append(ev.token_id)
                c.finish_reason = ev.finish_reason
                if ev.logprob is not None:
                    c.logprobs.append(ev.logprob)
                if ev.prompt_logprobs is not None:
                    c.prompt_logprobs = ev.prompt_logprobs
        for c, rid in zip(out, stream.ids):
            c.num_cached_tokens = stream.cached.get(rid, 0)
        return out

    # ---- one step -----------------------------------------------------------------------------------
    def _execute(self, plan: list[Scheduled]) -> list[TokenEvent]:
        C = self.pool.block_size
        ids, pos, slots, starts, lens, table = [], [], [], [0], [], []
        rows: list[int] = []  # step token index of each logits row
        samplers: list[tuple[Request, int]] = []  # (request, logits row) of requests drawing a token
        owed: list[tuple[Request, int, int]] = []  # (request, prompt position, logits row) for prompt logprobs
        for s in plan:
            r, c0 = s.request, s.request.num_computed
            c1 = c0 + s.num_new
            base = len(ids)
            ids += r.token_slice(c0, c1)
            pos += range(c0, c1)
            slots += [r.blocks[p // C] * C + p % C for p in range(c0, c1)]
            starts.append(len(ids))
            lens.append(c1)
            table.append(r.blocks)
            if r.params.prompt_logprobs is not None:
                for p in range(max(c0, len(r.prompt_logprobs)), min(c1, len(r.prompt_ids) - 1)):
                    owed.append((r, p, len(rows)))
                    rows.append(base + p - c0)
            if c1 == r.num_tokens:
                samplers.append((r, len(rows)))
                rows.append(base + s.num_new - 1)
        dev, best = self.device, None  # best: each logits row's argmax, where the step gives it
        M = max(map(len, table))
        decode_only = len(ids) == len(plan) and not owed
        if self.governor is not None:
            self.governor.update()
        if self.graphs is not None and decode_only and self.graphs.fits(len(plan), M):
            logits_KV = self.graphs.run(ids, pos, slots, table, lens)
        elif self.fused is not None and decode_only and self.fused.applies(len(ids)):  # on the CPU
            logits_KV, best = self.fused(ids, pos, slots, table, lens, self.kv)
            if len(rows) != len(ids):
                logits_KV, best = logits_KV[rows], [best[k] for k in rows]
        else:
            table_RM = self._table(table, M, dev)
            batch = PagedBatch(self.kv, torch.tensor(pos, device=dev), torch.tensor(slots, device=dev), table_RM,
                               torch.tensor(starts, dtype=torch.int32, device=dev),
                               torch.tensor(lens, dtype=torch.int32, device=dev), max(pos) + 1)
            logits_KV = self.model(torch.tensor([ids], device=dev), cache=batch,
                                   logits_at=torch.tensor(rows, dtype=torch.long, device=dev))[0]
        for s in plan:
            decode = s.num_new == 1 and s.request.output_ids and s.request.num_computed == s.request.num_tokens - 1
            self.stats.prefill_tokens += 0 if decode else s.num_new
            self.scheduler.computed(s.request, s.num_new)
        self._account()
        self._prompt_logprobs(logits_KV, owed)
        return self._sample(logits_KV, samplers, best)

    @staticmethod
    def _table(table: list[list[int]], M: int, dev) -> torch.Tensor:
        """The step's block tables as int32 [R, M], padded with block 0."""
        return torch.tensor([t + [0] * (M - len(t)) for t in table], dtype=torch.int32, device=dev)

    def _prompt_logprobs(self, logits_KV: torch.Tensor, owed: list[tuple[Request, int, int]]) -> None:
        if not owed:
            return
        n = max(r.params.prompt_logprobs for r, _, _ in owed)
        chosen = torch.tensor([r.prompt_ids[p + 1] for r, p, _ in owed], device=logits_KV.device)
        lp, top_ids, top_lp = top_logprobs(logits_KV[[k for _, _, k in owed]], chosen, n)
        for i, (r, p, _) in enumerate(owed):
            if p == len(r.prompt_logprobs):
                m = r.params.prompt_logprobs
                r.prompt_logprobs.append(TokenLogprob(r.prompt_ids[p + 1], float(lp[i]),
                                                      list(zip(top_ids[i, :m].tolist(), top_lp[i, :m].tolist()))))

    def _sample(self, logits_KV: torch.Tensor, samplers: list[tuple[Request, int]], best: list[int] | None
                ) -> list[TokenEvent]:
        if not samplers:
            return []
        reqs = [r for r, _ in samplers]
        params = [r.params for r in reqs]
        rows = [k for _, k in samplers]
        logits_BV = logits_KV if rows == list(range(len(logits_KV))) else logits_KV[rows]  # decode: every row
        B, V = logits_BV.shape
        dev = logits_BV.device
        late = [(b, t) for b, r in enumerate(reqs) if len(r.output_ids) < r.params.min_new_tokens
                for t in r.stops if t < V]
        if best is not None and not late and all(p.greedy and not p.penalised for p in params):
            tokens = best  # the step's argmax is sample()'s greedy pick: no penalty or suppression changes it
        else:
            keys = None if all(p.greedy for p in params) else torch.tensor(  # noise keys: only a draw reads them
                [draw_key(r.seed, len(r.output_ids)) for r in reqs], device=dev)
            seen = counts = suppress = None
            if any(p.penalised for p in params):
                seen = self._token_mask(reqs, lambda r: r.tokens, V, dev).bool()
                counts = self._token_mask(reqs, lambda r: r.output_ids, V, dev)
            if late:
                suppress = torch.zeros(B, V, dtype=torch.bool, device=dev)
                suppress[tuple(torch.tensor(late, device=dev).T)] = True
            tokens = sample(logits_BV, params, keys, seen, counts, suppress).tolist()
        want = [p.logprobs for p in params if p.logprobs is not None]
        if want:
            lp, top_ids, top_lp = (t.tolist() for t in top_logprobs(logits_BV, torch.tensor(tokens, device=dev),
                                                                     max(want)))
        events = []
        first = [not r.output_ids for r in reqs]
        for b, (r, t) in enumerate(zip(reqs, tokens)):
            r.output_ids.append(t)
            self.stats.output_tokens += 1
            n = len(r.output_ids)
            finish = ("stop" if t in r.stops else "length" if n >= r.params.max_new_tokens
                      or r.num_tokens >= self._limit() else None)
            logprob = None
            if r.params.logprobs is not None:
                m = r.params.logprobs
                logprob = TokenLogprob(t, lp[b], list(zip(top_ids[b][:m], top_lp[b][:m])))
            prompt_lp = None
            if first[b] and r.params.prompt_logprobs is not None:
                prompt_lp = [None] + list(r.prompt_logprobs)
            if first[b]:
                self.stats.cached_tokens += r.num_cached
            events.append(TokenEvent(r.id, t, finish, logprob, prompt_lp, r.num_cached if first[b] else None))
            if finish is not None:
                self.scheduler.finish(r, finish)
                self.requests.pop(r.id, None)
        return events

    def _limit(self) -> int:
        cfg = self.model.config
        return cfg.max_position_embeddings if cfg.rope_scaling is None else 1 << 62

    @staticmethod
    def _token_mask(reqs: list[Request], which, V: int, dev) -> torch.Tensor:
        """Per-row counts [B, V] of the token lists ``which(r)``, built with one scatter."""
        lists = [which(r) for r in reqs]
        width = max(1, max(map(len, lists)))
        idx = torch.full((len(reqs), width), V, dtype=torch.long, device=dev)
        for b, ts in enumerate(lists):
            if ts:
                idx[b, :len(ts)] = torch.tensor(ts, device=dev)
        out = torch.zeros(len(reqs), V + 1, device=dev)
        return out.scatter_add_(1, idx, torch.ones_like(idx, dtype=out.dtype))[:, :V]

    def _account(self) -> None:
        st = self.stats
        st.steps += 1
        st.preemptions = self.scheduler.num_preemptions
        st.peak_blocks = max(st.peak_blocks, self.pool.in_use())
        st.peak_inflight_tokens = max(st.peak_inflight_tokens, sum(r.num_computed for r in self.scheduler.running))

    def kv_bytes_in_use(self) -> int:
        """Bytes of the blocks some request references now."""
        return self.pool.in_use() * self.block_bytes
