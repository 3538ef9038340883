"""The serving engine: staggered, chunked, preempted, prefix-cached and batched requests give exactly what
each request gives alone; logprobs are the full-recompute log_softmax."""

import asyncio
import random

import pytest
import torch

import moekit
from moekit.engine import AsyncEngine, Engine, PagedKVCache, SamplingParams
from tests.conftest import CASE_IDS


def workload(seed: int, n: int, vocab: int, shared: list[int] | None = None):
    """n (prompt, max_new_tokens, arrival step) triples; ``shared`` prefixes some prompts."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        if shared and i % 2:
            prompt = shared + prompt
        out.append((prompt, rng.randint(1, 12), rng.randint(0, 10)))
    return out


def run_staggered(engine: Engine, reqs, params_of) -> dict[int, list[int]]:
    """Add request i at its arrival step; returns {i: tokens}."""
    got, ids, step = {}, {}, 0
    last = max(at for _, _, at in reqs)
    while step <= last or engine.has_unfinished():
        for i, (prompt, n, at) in enumerate(reqs):
            if at == step:
                ids[engine.add_request(prompt, params_of(i, n))] = i
        for ev in engine.step():
            got.setdefault(ids[ev.index], []).append(ev.token_id)
        step += 1
        assert step < 10_000
    assert engine.pool.in_use() == 0 and not engine.has_unfinished()
    return {i: got[i] for i in range(len(reqs))}


def alone(model, reqs, params_of) -> dict[int, list[int]]:
    out = {}
    for i, (prompt, n, _) in enumerate(reqs):
        out[i] = Engine(model, eos_token_ids=()).generate([prompt], params_of(i, n))[0].token_ids
    return out


def greedy(i, n):
    return SamplingParams(max_new_tokens=n, temperature=0)


def blocks_for(model, n_blocks: int, block_size: int) -> int:
    return n_blocks * PagedKVCache.block_bytes(model.config, block_size, model.embed.weight.dtype)


@pytest.mark.parametrize("case", CASE_IDS)
def test_staggered_chunked_requests_equal_each_alone(case, checkpoints):
    """Every family, float32: random prompts arriving at random steps, prefilled in chunks of 7 tokens beside
    the decodes of the others, blocks of 4 tokens, give each request's lone tokens."""
    model = moekit.load(checkpoints(case)[0], dtype=torch.float32)
    reqs = workload(hash(case) % 1000, 8, model.config.vocab_size)
    engine = Engine(model, eos_token_ids=(), max_num_batched_tokens=7, block_size=4)
    assert run_staggered(engine, reqs, greedy) == alone(model, reqs, greedy)


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return moekit.load(checkpoints("mixtral")[0], dtype=torch.float32)


def test_seeded_sampling_is_the_same_alone_and_batched(tiny):
    def params_of(i, n):
        return SamplingParams(max_new_tokens=n, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i)

    reqs = workload(1, 8, tiny.config.vocab_size)
    engine = Engine(tiny, eos_token_ids=(), max_num_batched_tokens=16, block_size=4)
    together = run_staggered(engine, reqs, params_of)
    assert together == alone(tiny, reqs, params_of)
    assert together != alone(tiny, reqs, greedy)  # it did sample


def test_penalties_are_per_request_in_a_batch(tiny):
    def params_of(i, n):
        return SamplingParams(max_new_tokens=n + 4, temperature=0, repetition_penalty=1.0 + 0.3 * (i % 3),
                              presence_penalty=0.5 * (i % 2), frequency_penalty=0.4 * (i % 4 == 1))

    reqs = workload(2, 6, tiny.config.vocab_size)
    assert run_staggered(Engine(tiny, eos_token_ids=()), reqs, params_of) == alone(tiny, reqs, params_of)


def test_preempted_requests_equal_uninterrupted_ones(tiny):
    """A pool of 12 blocks of 4 tokens cannot hold 8 requests: the youngest are preempted and recomputed."""
    reqs = workload(3, 8, tiny.config.vocab_size)
    for seeded in (False, True):
        def params_of(i, n, seeded=seeded):
            return SamplingParams(max_new_tokens=n, temperature=0.8 if seeded else 0, seed=i)

        engine = Engine(tiny, eos_token_ids=(), block_size=4, kv_cache_bytes=blocks_for(tiny, 14, 4))
        assert run_staggered(engine, reqs, params_of) == alone(tiny, reqs, params_of)
        assert engine.stats.preemptions > 0


def test_prefix_caching_on_equals_off_and_hits(tiny):
    shared = list(range(3, 40))  # 37 tokens: 9 full blocks of 4
    reqs = workload(4, 8, tiny.config.vocab_size, shared=shared)
    reqs = [(p, n, 3 * i) for i, (p, n, _) in enumerate(reqs)]  # later requests find earlier ones' blocks
    on = Engine(tiny, eos_token_ids=(), block_size=4)
    off = Engine(tiny, eos_token_ids=(), block_size=4, prefix_caching=False)
    assert run_staggered(on, reqs, greedy) == run_staggered(off, reqs, greedy)
    assert on.stats.cached_tokens >= 3 * 36 and off.stats.cached_tokens == 0
    assert on.stats.prefill_tokens < off.stats.prefill_tokens
    # a repeated request (multi-turn chat resends its history) reuses all but its last block
    prompt = shared + [7, 8, 9]
    first, again = (on.generate([prompt], greedy(0, 5))[0] for _ in range(2))
    assert again.token_ids == first.token_ids and again.num_cached_tokens == 36


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def test_logprobs_equal_the_full_recompute(tiny):
    prompt = [5, 9, 17, 30, 2, 77, 41]
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=3, logprobs=5, prompt_logprobs=3)
    engine = Engine(tiny, eos_token_ids=(), max_num_batched_tokens=4)  # the prompt arrives in chunks
    other = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=9))  # shares the steps
    out = engine.generate([prompt], params)[0]
    assert engine.requests[other].output_ids  # it ran beside
    lp = full_logits(tiny, prompt + out.token_ids).log_softmax(-1)
    assert len(out.logprobs) == 6
    for i, entry in enumerate(out.logprobs):
        row = lp[len(prompt) - 1 + i]
        assert entry.token_id == out.token_ids[i]
        assert abs(entry.logprob - float(row[entry.token_id])) < 1e-5
        top = row.topk(5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert max(abs(a - b) for (_, a), b in zip(entry.top, top.values.tolist())) < 1e-5
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        assert entry.token_id == prompt[p]
        assert abs(entry.logprob - float(lp[p - 1, prompt[p]])) < 1e-5
        assert [t for t, _ in entry.top] == lp[p - 1].topk(3).indices.tolist()


def test_prompt_logprobs_bypass_the_prefix_cache(tiny):
    prompt = list(range(10, 50))
    engine = Engine(tiny, eos_token_ids=(), block_size=4)
    engine.generate([prompt], greedy(0, 2))
    scored = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert scored.num_cached_tokens == 0 and len(scored.prompt_logprobs) == len(prompt)
    lp = full_logits(tiny, prompt).log_softmax(-1)
    want = [float(lp[p - 1, prompt[p]]) for p in range(1, len(prompt))]
    assert max(abs(e.logprob - w) for e, w in zip(scored.prompt_logprobs[1:], want)) < 1e-5


@pytest.mark.parametrize("start", [1, 13, 20, 21, 39])
def test_prompt_logprobs_from_a_start_reuse_cached_blocks_before_it(tiny, start):
    """Blocks that end before the first owed position come from the cache; the owed logprobs are unchanged."""
    prompt = list(range(10, 50))
    engine = Engine(tiny, eos_token_ids=(), block_size=4)
    engine.generate([prompt], greedy(0, 2))
    params = SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=0, prompt_logprobs_start=start)
    scored = engine.generate([prompt], params)[0]
    assert scored.num_cached_tokens == (start - 1) // 4 * 4  # the blocks wholly before position start - 1
    assert len(scored.prompt_logprobs) == len(prompt) and all(e is None for e in scored.prompt_logprobs[:start])
    lp = full_logits(tiny, prompt).log_softmax(-1)
    got = [(e.token_id, e.logprob) for e in scored.prompt_logprobs[start:]]
    want = [(prompt[p], float(lp[p - 1, prompt[p]])) for p in range(max(start, 1), len(prompt))]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-5


def test_a_long_prompt_does_not_freeze_running_streams(tiny):
    """While a 200-token prompt is prefilled in chunks of 16, every running request gets a token every step."""
    engine = Engine(tiny, eos_token_ids=(), max_num_batched_tokens=16)
    runners = [engine.add_request([i + 1, i + 2], SamplingParams(max_new_tokens=40, temperature=0))
               for i in range(3)]
    for _ in range(2):
        engine.step()
    long = engine.add_request([i % 120 + 1 for i in range(200)], SamplingParams(max_new_tokens=2, temperature=0))
    for _ in range(12):  # (200 tokens) / (16 - 3 decodes per step) > 12 steps of prefill
        events = engine.step()
        assert sorted(ev.index for ev in events) == runners
    assert engine.requests[long].num_computed == 12 * 13


def test_abort_frees_blocks_and_others_continue(tiny):
    engine = Engine(tiny, eos_token_ids=())
    want = engine.generate([[4, 5, 6]], greedy(0, 8))[0].token_ids
    keep = engine.add_request([4, 5, 6], greedy(0, 8))
    drop = engine.add_request(list(range(1, 60)), greedy(0, 8))
    got = []
    for step in range(20):
        if step == 2:
            engine.abort(drop)
        for ev in engine.step():
            assert ev.index != drop or step < 2
            if ev.index == keep:
                got.append(ev.token_id)
        if not engine.has_unfinished():
            break
    assert got == want and engine.pool.in_use() == 0


def test_async_engine_serves_concurrent_requests_and_cancels(tiny):
    reqs = workload(5, 6, tiny.config.vocab_size)
    want = alone(tiny, reqs, greedy)
    engine = AsyncEngine(Engine(tiny, eos_token_ids=()))

    async def one(i):
        prompt, n, at = reqs[i]
        await asyncio.sleep(0.01 * at)
        return [ev.token_id async for ev in engine.generate(prompt, greedy(i, n))]

    async def abandon():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_new_tokens=200, temperature=0)):
            break  # the consumer goes away after one token

    async def main():
        got = await asyncio.gather(*(one(i) for i in range(len(reqs))), abandon())
        for _ in range(100):  # the abort reaches the worker between steps
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        return got

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert {i: got[i] for i in range(len(reqs))} == want
    assert not engine.engine.has_unfinished() and engine.engine.pool.in_use() == 0


def test_bad_requests_name_the_problem(tiny):
    engine = Engine(tiny, eos_token_ids=(), kv_cache_bytes=blocks_for(tiny, 4, 16))
    with pytest.raises(ValueError, match=r"need 4 KV blocks; the pool has 3 \(raise kv_cache_bytes\)"):
        engine.add_request(list(range(1, 40)), SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)
    with pytest.raises(ValueError, match="max_num_batched_tokens=0"):
        Engine(tiny, max_num_batched_tokens=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_serve_what_the_reference_serves(checkpoints, dtype):
    """The C++ backend (paged attention through block tables, fused MoE) in the same staggered, chunked,
    preempting run: float32 equals the reference kernels token for token; bfloat16 agrees on the first tokens."""
    from moekit.kernels import cpu

    if not cpu.supported():
        pytest.skip("the C++ kernels need an x86-64 CPU with AVX-512")
    folder = checkpoints("qwen2_moe")[0]
    fast = moekit.load(folder, dtype=dtype, kernels="cpu")
    ref = moekit.load(folder, dtype=dtype, kernels="reference")
    reqs = workload(6, 8, fast.config.vocab_size)
    runs = []
    for model in (fast, ref):
        engine = Engine(model, eos_token_ids=(), max_num_batched_tokens=9, block_size=4,
                        kv_cache_bytes=blocks_for(model, 16, 4))
        runs.append(run_staggered(engine, reqs, greedy))
        assert engine.stats.preemptions > 0
    if dtype == torch.float32:
        assert runs[0] == runs[1]
    else:
        assert sum(a[:2] == b[:2] for a, b in zip(runs[0].values(), runs[1].values())) >= 6
