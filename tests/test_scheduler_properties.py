"""Continuous batching under random arrivals, aborts and preemptions, at the level of the :class:`Scheduler`
and :class:`BlockPool` alone, driven by a simulated executor (fast, many examples): no block leaks, no
keys/values crossing between requests, first come first served within a priority, and always an end.

The simulated "KV cache" records, for every slot, the whole token prefix it was computed from (real
keys/values depend on every earlier token), and a request's fake next token is a hash of what it reads
back through its block table, so a crossed or stale slot changes its output. The same schedules on the
real engine: tests/test_engine_properties.py.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

from hypothesis import example, given, settings

from moekit.engine.blocks import BlockPool, block_hash
from moekit.engine.scheduler import FINISHED, RUNNING, WAITING, Request, Scheduler
from tests.schedules import Workload, blocks_for, spec, workloads


# ---- layer 1: scheduler + block pool with a simulated executor ----------------------------------------
def fake_token(view: tuple, vocab: int) -> int:
    """The "model": a hash of every prefix the request reads back from its slots."""
    return zlib.crc32(repr(view).encode()) % vocab


def prefixes(tokens) -> tuple:
    return tuple(tuple(tokens[:p + 1]) for p in range(len(tokens)))


def alone(prompt, n: int, vocab: int) -> list[int]:
    """What a request generates with the cache to itself."""
    out: list[int] = []
    for _ in range(n):
        out.append(fake_token(prefixes(list(prompt) + out), vocab))
    return out


class Sim:
    """A scheduler, its pool, and a shadow KV cache: slot -> the token prefix its keys/values encode."""

    def __init__(self, w: Workload, vocab: int):
        self.w, self.vocab, self.C = w, vocab, w.block_size
        self.pool = BlockPool(w.num_blocks, w.block_size, w.prefix_caching)
        self.sched = Scheduler(self.pool, w.max_num_seqs, w.max_num_batched_tokens, w.chunked_prefill)
        self.kv: dict[int, tuple] = {}
        self.key_tokens: dict[bytes, tuple] = {}  # prefix-cache key -> the tokens it was registered for
        self.first_admitted: dict[int, int] = {}  # request id -> step

    def slot(self, r: Request, p: int) -> int:
        return r.blocks[p // self.C] * self.C + p % self.C

    def view(self, r: Request, n: int) -> tuple:
        return tuple(self.kv.get(self.slot(r, p)) for p in range(n))

    # -- one step ---------------------------------------------------------------------------------------
    def step(self, t: int) -> list:
        sched, pool, C = self.sched, self.pool, self.C
        old_running, old_waiting = list(sched.running), list(sched.waiting)
        owed = {r.id: len(r.prompt_logprobs) for r in old_waiting if r.params.prompt_logprobs is not None
                and len(r.prompt_logprobs) < len(r.prompt_ids) - 1}  # id: the first position still owed
        preemptions = sched.num_preemptions
        plan = sched.schedule()
        self.check_plan(t, plan, old_running, old_waiting, owed, sched.num_preemptions - preemptions)
        for s in plan:  # the forward pass: every scheduled token's keys/values go to its slot
            r, c0 = s.request, s.request.num_computed
            for p in range(c0, c0 + s.num_new):
                b = r.blocks[p // C]
                assert b != 0, "block 0 is the scratch page"
                assert pool.refs[b] == 1 and pool.key[b] is None, f"block {b} is shared or cached, yet written"
                self.kv[self.slot(r, p)] = tuple(r.tokens[:p + 1])
            if r.params.prompt_logprobs is not None:  # as the engine collects them
                for p in range(max(c0, len(r.prompt_logprobs)), min(c0 + s.num_new, len(r.prompt_ids) - 1)):
                    r.prompt_logprobs.append(p)
        for s in plan:
            sched.computed(s.request, s.num_new)
        for s in plan:
            r = s.request
            for i, b in enumerate(r.blocks):  # what each prefix-cache key was registered for
                if pool.key[b] is not None:
                    assert self.key_tokens.setdefault(pool.key[b], tuple(r.tokens[:(i + 1) * C])) \
                           == tuple(r.tokens[:(i + 1) * C])
        for s in plan:  # sampling: requests that reached their last token draw one from what they read
            r = s.request
            if r.num_computed == r.num_tokens:
                view = self.view(r, r.num_tokens)
                assert view == prefixes(r.tokens), f"request {r.id} reads another request's keys/values"
                r.output_ids.append(fake_token(view, self.vocab))
                if len(r.output_ids) >= r.params.max_new_tokens:
                    sched.finish(r, "length")
        self.check_state()
        return plan

    # -- invariants -------------------------------------------------------------------------------------
    def check_plan(self, t, plan, old_running, old_waiting, owed, preempted):
        sched, C, budget = self.sched, self.C, self.sched.max_num_batched_tokens
        spent = sum(s.num_new for s in plan)
        if not self.w.chunked_prefill:  # prompts whole: a prompt over the budget runs alone
            assert all(s.num_new == s.request.num_tokens - s.request.num_computed for s in plan)
            assert spent <= budget or len(plan) == 1
        else:
            assert spent <= budget
        assert len(sched.running) <= sched.max_num_seqs
        assert len({id(s.request) for s in plan}) == len(plan), "a request scheduled twice in one step"
        planned = {id(s.request) for s in plan}
        for s in plan:
            r = s.request
            assert r.status == RUNNING and r in sched.running
            assert 1 <= s.num_new <= r.num_tokens - r.num_computed
            assert len(r.blocks) == blocks_for(r.num_computed + s.num_new, C), "blocks beyond the step's tokens"
        idle = [r for r in sched.running if id(r) not in planned]
        for r in idle:
            assert len(r.blocks) == blocks_for(r.num_computed, C)
        if idle and self.w.chunked_prefill:  # a running request only sits out a step whose budget is spent
            assert spent == budget
        if any(r.num_tokens - r.num_computed == 1 for r in idle):  # decodes go before prefill chunks
            assert spent >= budget
            assert all(s.num_new == 1 and s.request.num_tokens - s.request.num_computed == 1 for s in plan)
        # preemption takes the youngest first: the victims are the tail of the running list
        victims = [r for r in old_running if r.status == WAITING]
        assert len(victims) == preempted
        survivors = old_running[:len(old_running) - len(victims)]
        assert old_running[len(survivors):] == victims, "an older request was preempted before a younger one"
        assert sched.running[:len(survivors)] == survivors
        admitted = sched.running[len(survivors):]
        assert not (victims and admitted), "a step that preempts admits nobody"
        if not plan and sched.has_unfinished():
            assert victims, "an empty step with work waiting and nothing preempted"
        # admission in (priority, arrival) order: nobody admitted while an earlier request still waits
        assert [r.sort_key() for r in admitted] == sorted(r.sort_key() for r in admitted)
        for r in admitted:
            assert r in old_waiting
            assert all(w.sort_key() > r.sort_key() for w in sched.waiting), \
                f"request {r.id} {r.sort_key()} admitted before a waiting earlier one"
            if r.id in owed:  # cached blocks only before the first owed position: its logits must be computed
                assert r.num_computed <= owed[r.id] // C * C, "a request took cached blocks it owes logprobs in"
            self.first_admitted.setdefault(r.id, t)

    def check_state(self):
        sched, pool, C, P = self.sched, self.pool, self.C, self.pool.num_blocks
        holders: dict[int, list[tuple[Request, int]]] = defaultdict(list)
        for r in sched.running + sched.waiting:
            assert len(set(r.blocks)) == len(r.blocks)
            for i, b in enumerate(r.blocks):
                holders[b].append((r, i))
        for r in sched.waiting:
            assert r.status == WAITING and r.blocks == [] and r.num_computed == 0
        for r in sched.running:
            assert r.status == RUNNING
            assert 0 <= r.num_computed < r.num_tokens
            assert len(r.blocks) == blocks_for(r.num_computed, C), "blocks do not follow the tokens in flight"
            assert self.view(r, r.num_computed) == prefixes(r.tokens[:r.num_computed]), \
                f"request {r.id}'s cached keys/values were overwritten"
        # the pool's books: every block in exactly one place, reference counts = holders
        free, lru = pool.free, set(pool.lru)
        assert len(set(free)) == len(free) and not set(free) & lru
        assert pool.refs[0] == 0 and 0 not in holders and 0 not in free and 0 not in lru and pool.key[0] is None
        for b in range(1, P):
            assert pool.refs[b] == len(holders[b]), f"block {b}: {pool.refs[b]} references, {len(holders[b])} holders"
            assert (b in free) + (b in lru) + (pool.refs[b] > 0) == 1, f"block {b} is in no place or in two"
            if b in lru:
                assert pool.key[b] is not None
            if b in free:
                assert pool.key[b] is None
        assert pool.available() + pool.in_use() == P - 1
        assert pool.in_use() == len([b for b in holders if holders[b]])
        assert {k: b for k, b in pool.cached.items()} == {pool.key[b]: b for b in range(P) if pool.key[b] is not None}
        # sharing: only full, keyed prefix blocks, at the same place in every table, over equal tokens
        for b, hs in holders.items():
            if len(hs) > 1:
                assert pool.key[b] is not None, f"unkeyed block {b} held by {len(hs)} requests"
                (i,) = {i for _, i in hs}
                assert len({tuple(r.tokens[:(i + 1) * C]) for r, _ in hs}) == 1
                assert all(r.num_computed >= (i + 1) * C for r, _ in hs)
        # a keyed block (held or cached) holds exactly the prefix its chain hash names
        for b in range(1, P):
            k = pool.key[b]
            if k is None:
                continue
            tokens = self.key_tokens[k]
            chain = None
            for j in range(0, len(tokens), C):
                chain = block_hash(chain, tokens[j:j + C])
            assert chain == k
            base = len(tokens) - C
            assert [self.kv.get(b * C + j) for j in range(C)] == [tokens[:base + j + 1] for j in range(C)]


def simulate(w: Workload, vocab: int = 3) -> Sim:
    sim = Sim(w, vocab)
    sched, pool = sim.sched, sim.pool
    reqs = [Request(i, list(s.prompt), s.params, seed=0, stops=frozenset(), priority=s.priority)
            for i, s in enumerate(w.specs)]
    arrived, aborted = set(), set()
    total = sum(len(s.prompt) + s.params.max_new_tokens for s in w.specs)
    limit = w.last_event() + 10 * total * (len(w.specs) + 1)
    t = 0
    while t <= w.last_event() or sched.has_unfinished():
        for i, s in enumerate(w.specs):
            if s.arrive == t:
                sched.add(reqs[i])
                arrived.add(i)
        for i, s in enumerate(w.specs):
            if s.abort == t and i in arrived and reqs[i].status != FINISHED:
                sched.finish(reqs[i], "abort")
                aborted.add(i)
        if t in w.resets:
            pool.reset_prefix_cache()
        sim.check_state()
        sim.step(t)
        if not sched.has_unfinished():
            assert pool.in_use() == 0 and pool.available() == pool.num_blocks - 1, "blocks leak when idle"
        t += 1
        assert t < limit, "no end in sight (livelock)"
    for i, (r, s) in enumerate(zip(reqs, w.specs)):
        assert r.status == FINISHED and r.blocks == []
        want = alone(s.prompt, s.params.max_new_tokens, vocab)
        if i in aborted:
            assert r.finish_reason == "abort" and r.output_ids == want[:len(r.output_ids)]
        else:
            assert r.finish_reason == "length" and r.output_ids == want, f"request {i}'s tokens changed"
            if s.params.prompt_logprobs is not None:
                assert r.prompt_logprobs == list(range(len(s.prompt) - 1))
    # first come, first served within a priority, over the whole run
    for x in sim.first_admitted:
        for y in sim.first_admitted:
            if reqs[x].priority == reqs[y].priority and reqs[x].arrival < reqs[y].arrival:
                assert sim.first_admitted[x] <= sim.first_admitted[y]
    assert pool.in_use() == 0
    return sim


# Two long requests over a shared stem, in a pool that only holds one of them, behind a small budget.
PRESSURE = Workload(block_size=2, num_blocks=7, max_num_seqs=3, max_num_batched_tokens=3, prefix_caching=True,
                    specs=(spec([1, 2, 1, 2, 0], 6), spec([1, 2, 1, 2, 1, 1], 5, arrive=1),
                           spec([2], 2, priority=1, arrive=1), spec([1, 2, 1], 2, arrive=2, abort=6),
                           spec([1, 2, 1, 2], 3, arrive=9, prompt_logprobs=1)))


def test_the_pressure_workload_preempts_chunks_and_hits_the_cache():
    """The examples below exercise what the properties are about (hypothesis may not draw it every run)."""
    sim = simulate(PRESSURE)
    assert sim.sched.num_preemptions > 0 and sim.pool.hits > 0


@settings(max_examples=1000, deadline=None)
@given(workloads(vocab=3, block_sizes=[1, 2, 3, 4], max_new=8, max_requests=8, engine=False))
@example(PRESSURE)
def test_scheduler_properties(w):
    simulate(w)
