"""Random request schedules for the continuous-batching property tests (tests/test_scheduler_properties.py,
tests/test_engine_properties.py): who arrives when, with what prompt and priority, and who is aborted when."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from moekit.engine import SamplingParams


def blocks_for(tokens: int, C: int) -> int:
    return -(-tokens // C)


# ---- a workload: who arrives when, with what, and who is aborted when ---------------------------------
@dataclass(frozen=True)
class Spec:
    prompt: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    arrive: int = 0  # step before which it is added
    abort: int | None = None  # step before which it is aborted (if it has arrived and not finished)


@dataclass(frozen=True)
class Workload:
    block_size: int
    num_blocks: int  # block 0 included
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_caching: bool
    specs: tuple[Spec, ...]
    resets: frozenset[int] = frozenset()  # steps before which the prefix cache is reset
    chunked_prefill: bool = True  # False: prompts prefilled whole (the engine's dynamic-NTK RoPE mode)

    def last_event(self) -> int:
        return max([s.arrive for s in self.specs] + [s.abort or 0 for s in self.specs] + list(self.resets))


@st.composite
def workloads(draw, vocab: int, block_sizes, max_new: int, max_requests: int, engine: bool):
    """Prompts cut from a few shared stems (prefix-cache hits), pools that only just hold the largest
    request (preemption), small token budgets (chunked prefill). ``engine``: for the real engine, which
    also samples (seeded) and decides chunking itself."""
    C = draw(st.sampled_from(block_sizes))
    token = st.integers(0, vocab - 1)
    stems = draw(st.lists(st.lists(token, max_size=3 * C), min_size=1, max_size=3))
    specs = []
    for _ in range(draw(st.integers(2, max_requests))):
        stem = draw(st.sampled_from(stems))
        stem = stem[:draw(st.integers(0, len(stem)) | st.just(len(stem)))]
        prompt = stem + draw(st.lists(token, min_size=0 if stem else 1, max_size=2 * C))
        sampled = engine and draw(st.booleans())
        params = SamplingParams(max_new_tokens=draw(st.integers(1, max_new)), temperature=0.8 if sampled else 0,
                                seed=draw(st.integers(0, 3)) if sampled else None,
                                prompt_logprobs=draw(st.sampled_from([None, None, None, 2])))
        abort = draw(st.integers(0, 24)) if draw(st.integers(0, 3)) == 0 else None  # a quarter are aborted
        specs.append(Spec(tuple(prompt), params, draw(st.integers(0, 2)), draw(st.integers(0, 4)), abort))
    largest = max(blocks_for(len(s.prompt) + s.params.max_new_tokens, C) for s in specs)
    mostly = st.booleans() | st.just(True)
    return Workload(block_size=C, num_blocks=largest + 1 + draw(st.integers(0, 1)),
                    max_num_seqs=draw(st.integers(1, 4)), max_num_batched_tokens=draw(st.integers(1, 12)),
                    prefix_caching=draw(mostly), specs=tuple(specs),
                    resets=draw(st.frozensets(st.integers(0, 30), max_size=2)),
                    chunked_prefill=engine or draw(mostly))


def spec(prompt, n, priority=0, arrive=0, abort=None, prompt_logprobs=None):
    return Spec(tuple(prompt), SamplingParams(max_new_tokens=n, temperature=0, prompt_logprobs=prompt_logprobs),
                priority, arrive, abort)
