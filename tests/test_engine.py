"""The engine: greedy decoding equals a naive full-recompute loop for every family; batching and cancel."""

import pytest
import torch

import moekit
from moekit.engine import Engine, KVCache, SamplingParams
from tests.conftest import CASE_IDS


def naive_greedy(model, prompt, n):
    """Recompute the whole sequence every step, no cache: the definition the engine must match.

    Under dynamic-NTK RoPE past the trained context that definition is a cached one: each forward
    rotates its new keys with the base of the sequence length so far, and cached keys keep theirs (as
    transformers does with a cache), where a full recompute re-rotates every key with the latest base.
    The model's own forward over a contiguous KVCache, a token a call, is then the reference."""
    scaling = model.config.rope_scaling
    if scaling is not None and scaling.kind == "dynamic" and len(prompt) + n > model.config.max_position_embeddings:
        cache = KVCache(model.config, 1, len(prompt) + n, model.embed.weight.dtype)
        out = []
        with torch.no_grad():
            logits = model(torch.tensor([prompt]), cache=cache)
            for _ in range(n):
                out.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([[out[-1]]]), cache=cache)
        return out
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 9, 17], [3, 4, 5, 6, 7, 8, 9, 10, 11], [100], [60, 61]]


@pytest.mark.parametrize("case", CASE_IDS)
def test_greedy_engine_equals_naive_loop(case, checkpoints):
    """A batch of different-length prompts (left-padded, KV-cached) gives the naive loop's tokens exactly."""
    model = moekit.load(checkpoints(case)[0], dtype=torch.float64)  # float64: no ties from rounding
    out = Engine(model, eos_token_ids=()).generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    for o, p in zip(out, PROMPTS):
        assert o.token_ids == naive_greedy(model, p, 10)
        assert o.finish_reason == "length" and o.prompt_ids == p


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return moekit.load(checkpoints("mixtral")[0], dtype=torch.float32)


def test_stop_token_ends_a_row_and_others_continue(tiny):
    greedy = Engine(tiny, eos_token_ids=()).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    stop = greedy[1].token_ids[3]  # the 4th token row 1 produces
    out = Engine(tiny, eos_token_ids=(stop,)).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    assert out[1].token_ids == greedy[1].token_ids[:greedy[1].token_ids.index(stop) + 1]
    assert out[1].finish_reason == "stop"
    for o, g in zip(out, greedy):  # rows that never produce the stop id are unaffected by the others finishing
        if stop not in g.token_ids:
            assert o.token_ids == g.token_ids and o.finish_reason == "length"


def test_ignore_eos_and_min_new_tokens(tiny):
    first = Engine(tiny, eos_token_ids=()).generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, temperature=0))
    eos = first[0].token_ids[0]
    engine = Engine(tiny, eos_token_ids=(eos,))
    assert engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, temperature=0))[0].token_ids == [eos]
    kept = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))[0]
    assert kept.token_ids == first[0].token_ids and kept.finish_reason == "length"
    late = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, temperature=0, min_new_tokens=3))[0]
    assert eos not in late.token_ids[:3]


def test_streaming_yields_the_same_tokens_and_cancel_stops_a_row(tiny):
    engine = Engine(tiny, eos_token_ids=())
    params = SamplingParams(max_new_tokens=6, temperature=0)
    full = engine.generate(PROMPTS, params)
    stream = engine.stream(PROMPTS, params)
    got = {i: [] for i in range(len(PROMPTS))}
    for step, events in enumerate(stream):
        for ev in events:
            got[ev.index].append(ev.token_id)
        if step == 1:
            stream.cancel(2)
    assert got[0] == full[0].token_ids and got[1] == full[1].token_ids
    assert got[2] == full[2].token_ids[:2]


def test_seeded_sampling_is_reproducible_and_seed_matters(tiny):
    engine = Engine(tiny, eos_token_ids=())
    p = SamplingParams(max_new_tokens=12, temperature=1.5, seed=7)
    a = engine.generate(PROMPTS, p)
    b = engine.generate(PROMPTS, p)
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, seed=8))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


@pytest.mark.parametrize("bad, message", [
    ([[]], "prompt 0 is empty"),
    ([[1, 2, 999]], r"prompt 0 has token ids outside the vocabulary \(0\.\.127\): \[999\]"),
])
def test_bad_prompts_are_named(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny).generate(bad)


def test_context_overflow_is_refused(tiny):
    with pytest.raises(ValueError, match=r"exceed the model's context of 256"):
        Engine(tiny).generate([[1] * 200], SamplingParams(max_new_tokens=100))
