"""Requests and the scheduler: who runs in the next step, and with how many tokens.

A request's tokens are its prompt followed by what it generated; ``num_computed`` of them
have keys/values in the cache. A step gives each scheduled request some new tokens:

- running requests that are decoding (one token left to compute) come first, oldest first;
- then running requests still prefilling, a chunk each, within ``max_num_batched_tokens``;
- then waiting requests are admitted in (priority, arrival) order while there is room in the
  token budget, in ``max_num_seqs`` and in the block pool. An admitted request first takes
  whatever its prompt's full blocks find in the prefix cache.

When a running request needs a block and none is left, the youngest running request is
preempted: its blocks go back to the pool (their full blocks stay in the prefix cache) and it
waits at the head of its priority class to be recomputed from its prompt and the tokens it has
already produced. Nothing is ever allocated past the pool, so memory cannot run out.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from moekit.engine.blocks import BlockPool, block_hash
from moekit.engine.sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Request:
    """Everything the engine knows about one request."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the noise seed of its draws (params.seed, or drawn at arrival)
    stops: frozenset[int]  # token ids that end it
    priority: int = 0  # lower runs first
    arrival: int = 0
    status: str = WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks, in order
    num_cached: int = 0  # prompt tokens its first admission found in the prefix cache
    num_preemptions: int = 0
    finish_reason: str | None = None
    prompt_logprobs: list = field(default_factory=list)  # per prompt position after the first

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without building the whole list (a decode step needs one token)."""
        P = len(self.prompt_ids)
        if start >= P:
            return self.output_ids[start - P:end - P]
        return self.prompt_ids[start:end] + (self.output_ids[:end - P] if end > P else [])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def sort_key(self) -> tuple[int, int]:
        return self.priority, self.arrival


@dataclass
class Scheduled:
    request: Request
    num_new: int  # tokens computed for it in this step, from ``request.num_computed``


class Scheduler:
    """Admission, chunked prefill and preemption over one :class:`BlockPool`."""

    def __init__(self, pool: BlockPool, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 chunked_prefill: bool = True):
        """chunked_prefill=False: a prompt is prefilled in one step, alone in the budget if it exceeds it
        (dynamic-NTK RoPE scales by the length of each forward, so chunks would change the result)."""
        self.pool, self.C, self.chunked = pool, pool.block_size, chunked_prefill
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []  # in admission order
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.arrival = next(self._arrivals)
        self._wait(req)

    def _wait(self, req: Request) -> None:
        req.status = WAITING
        keys = [r.sort_key() for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, req.sort_key()), req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """End ``req`` (running or waiting) and return its blocks."""
        if req.status == RUNNING:
            self.running.remove(req)
        elif req.status == WAITING:
            self.waiting.remove(req)
        self._free(req)
        req.status, req.finish_reason = FINISHED, reason

    def _free(self, req: Request) -> None:
        for b in reversed(req.blocks):  # the tail is released first: it is the least likely to be shared
            self.pool.release(b)
        req.blocks = []

    def _grow(self, req: Request, n_tokens: int) -> bool:
        """Give ``req`` blocks for ``n_tokens`` tokens; False (nothing taken) if the pool is short."""
        need = -(-n_tokens // self.C) - len(req.blocks)
        if need > self.pool.available():
            return False
        req.blocks += [self.pool.allocate() for _ in range(need)]
        return True

    def _preempt(self, req: Request, plan: list[Scheduled]) -> int:
        """Send ``req`` back to waiting for a recompute; returns the step tokens it gave back."""
        self.running.remove(req)
        self._free(req)
        req.num_computed, req.keys = 0, req.keys[:0]
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._wait(req)
        given = sum(s.num_new for s in plan if s.request is req)
        plan[:] = [s for s in plan if s.request is not req]
        return given

    def schedule(self) -> list[Scheduled]:
        """The next step's requests and token counts."""
        budget, plan, preempted = self.max_num_batched_tokens, [], False
        decoding = [r for r in self.running if r.num_tokens - r.num_computed == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed > 1]
        for req in decoding + prefilling:
            if req.status != RUNNING or budget <= 0:
                continue
            n = self._chunk(req, req.num_computed, budget)
            if n == 0:
                continue
            while not self._grow(req, req.num_computed + n):
                victim = self.running[-1]  # the youngest
                budget += self._preempt(victim, plan)
                preempted = True
                if victim is req:
                    break
            if req.status == RUNNING:
                plan.append(Scheduled(req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            if not self._admit(req, budget, plan):
                break
            budget -= plan[-1].num_new
        return plan

    def _chunk(self, req: Request, start: int, budget: int) -> int:
        """Tokens ``req`` gets this step from ``start`` (0: none fit)."""
        left = req.num_tokens - start
        if self.chunked or left <= budget:
            return min(left, budget)
        return left if budget == self.max_num_batched_tokens else 0  # whole, and alone

    def _admit(self, req: Request, budget: int, plan: list[Scheduled]) -> bool:
        """Start (or restart) ``req`` with what the prefix cache holds plus one chunk, if the pool allows."""
        hits = self._prefix_hits(req)
        for b in hits:
            self.pool.share(b)
        req.blocks = list(hits)
        start = len(hits) * self.C
        n = self._chunk(req, start, budget)
        if n == 0 or not self._grow(req, start + n):
            self._free(req)
            return False
        if req.num_preemptions == 0:
            req.num_cached = start
        req.num_computed = start
        req.keys = req.keys[:len(hits)]
        self.waiting.pop(0)
        req.status = RUNNING
        self.running.append(req)
        plan.append(Scheduled(req, n))
        return True

    def _prefix_hits(self, req: Request) -> list[int]:
        """Cached blocks equal to ``req``'s leading full blocks (never its last token: that one's logits are
        needed). A request still owed prompt logprobs takes only blocks that end before the first owed position."""
        usable = (req.num_tokens - 1) // self.C
        if req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_ids) - 1:
            usable = min(usable, len(req.prompt_logprobs) // self.C)
        if not self.pool.prefix_caching or usable == 0:
            return []
        tokens, hits = req.tokens, []
        self.pool.queries += usable
        for i in range(usable):
            if i == len(req.keys):
                req.keys.append(block_hash(req.keys[-1] if req.keys else None, tokens[i * self.C:(i + 1) * self.C]))
            b = self.pool.lookup(req.keys[i])
            if b is None:
                break
            hits.append(b)
        self.pool.hits += len(hits)
        return hits

    def computed(self, req: Request, n: int) -> None:
        """``req``'s next ``n`` tokens are now in the cache: register its newly full blocks."""
        req.num_computed += n
        if not self.pool.prefix_caching:
            return
        tokens = req.tokens if req.num_computed // self.C > len(req.keys) else None
        for i in range(len(req.keys), req.num_computed // self.C):  # blocks that just became full
            req.keys.append(block_hash(req.keys[-1] if req.keys else None, tokens[i * self.C:(i + 1) * self.C]))
            self.pool.register(req.blocks[i], req.keys[i])
