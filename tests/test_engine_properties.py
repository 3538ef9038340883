"""Continuous batching under random arrivals, aborts and preemptions on the real :class:`Engine` and a tiny
model (few examples): every request's tokens (greedy or seeded), finish reason and prompt logprobs equal
the same request run alone on a fresh engine; aborted requests fall silent; nothing is in use when idle.
The scheduler alone, with many more schedules: tests/test_scheduler_properties.py.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from hypothesis import example, given, settings

import moekit
from moekit.engine import Engine, SamplingParams
from moekit.engine.kv_cache import PagedKVCache
from tests.schedules import Spec, Workload, spec, workloads


@pytest.fixture(scope="module")
def tiny(checkpoints):
    """The tiny Mixtral in float64 (no argmax ties from rounding) and a cache of runs alone. One thread:
    on a model this small, a second one costs more than it gives, and far more beside a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield moekit.load(checkpoints("mixtral")[0], dtype=torch.float64), {}
    torch.set_num_threads(threads)


def run_alone(tiny, s: Spec):
    model, cache = tiny
    if (s.prompt, s.params) not in cache:
        engine = Engine(model, eos_token_ids=(), adapt_threads=False)
        cache[s.prompt, s.params] = engine.generate([list(s.prompt)], s.params)[0]
    return cache[s.prompt, s.params]


def run_engine(tiny, w: Workload) -> Engine:
    model, _ = tiny
    engine = Engine(model, eos_token_ids=(), max_num_seqs=w.max_num_seqs,
                    max_num_batched_tokens=w.max_num_batched_tokens, block_size=w.block_size,
                    kv_cache_bytes=w.num_blocks * PagedKVCache.block_bytes(model.config, w.block_size, torch.float64),
                    prefix_caching=w.prefix_caching, cuda_graph=False, adapt_threads=False)
    assert engine.pool.num_blocks == w.num_blocks
    ids: dict[int, int] = {}  # spec index -> request id
    events = defaultdict(list)
    aborted, finished = set(), set()
    t = 0
    while t <= w.last_event() or engine.has_unfinished():
        for i, s in enumerate(w.specs):
            if s.arrive == t:
                ids[i] = engine.add_request(list(s.prompt), s.params, priority=s.priority)
        for i, s in enumerate(w.specs):
            if s.abort == t and i in ids and i not in finished:
                engine.abort(ids[i])
                aborted.add(i)
        if t in w.resets:
            engine.pool.reset_prefix_cache()
        index = {rid: i for i, rid in ids.items()}
        for ev in engine.step():
            i = index[ev.index]
            assert i not in aborted, f"request {i} has an event after its abort"
            assert i not in finished, f"request {i} has an event after its last"
            events[i].append(ev)
            if ev.finish_reason is not None:
                finished.add(i)
        if not engine.has_unfinished():
            assert engine.pool.in_use() == 0, "blocks leak when idle"
        t += 1
        assert t < 400, "no end in sight (livelock)"
    assert engine.pool.in_use() == 0 and not engine.requests
    for i, s in enumerate(w.specs):
        got, want = [ev.token_id for ev in events[i]], run_alone(tiny, s)
        if i in aborted:
            assert got == want.token_ids[:len(got)]
            continue
        assert got == want.token_ids, f"request {i}: batched {got}, alone {want.token_ids}"
        assert events[i][-1].finish_reason == want.finish_reason
        if s.params.prompt_logprobs is not None:
            lp = events[i][0].prompt_logprobs
            assert lp[0] is None and len(lp) == len(want.prompt_logprobs) == len(s.prompt)
            for a, b in zip(lp[1:], want.prompt_logprobs[1:]):
                assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-9)
                assert [tok for tok, _ in a.top] == [tok for tok, _ in b.top]
    return engine


ENGINE_PRESSURE = Workload(block_size=2, num_blocks=8, max_num_seqs=3, max_num_batched_tokens=4, prefix_caching=True,
                           specs=(spec([9, 40, 77, 5, 3, 120], 5), spec([9, 40, 77, 5, 60], 5, arrive=1),
                                  spec([9, 40, 77], 4, priority=1, arrive=1, abort=5),
                                  spec([9, 40, 77, 5, 3, 120, 11], 3, arrive=3, prompt_logprobs=2),
                                  Spec((64, 65), SamplingParams(max_new_tokens=4, temperature=0.8, seed=1), 0, 2)))


def test_engine_pressure_workload_preempts_chunks_and_hits_the_cache(tiny):
    engine = run_engine(tiny, ENGINE_PRESSURE)
    assert engine.stats.preemptions > 0 and engine.pool.hits > 0


@settings(max_examples=100, deadline=None)
@given(w=workloads(vocab=128, block_sizes=[1, 2, 4], max_new=6, max_requests=6, engine=True))
@example(w=ENGINE_PRESSURE)
def test_engine_under_random_arrivals_aborts_and_preemption(tiny, w):
    run_engine(tiny, w)
