"""Scoring token sequences through the serving engine: continuation loglikelihoods and rolling loglikelihoods.

Every request is one engine request with prompt logprobs from the continuation's first token on
(``SamplingParams.prompt_logprobs_start``), so a shared context (few-shot examples, a question with
several answers, one question's option permutations) is computed once and then served from the
prefix cache in whole blocks. Log-probabilities are the model's float32 log-softmax, as in
``moekit serve``'s ``echo`` + ``logprobs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moekit.engine import Engine, SamplingParams
from moekit.errors import MoekitError


@dataclass(frozen=True)
class Scored:
    """One continuation: the sum of its tokens' log-probabilities, and whether each token is the argmax."""

    logprob: float
    greedy: bool
    token_logprobs: tuple[float, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled or total < 2, leave=False, dynamic_ncols=True)


class Scorer:
    """Loglikelihoods of many (context, continuation) token pairs, batched by the engine."""

    def __init__(self, engine: Engine, progress: bool = True):
        self.engine = engine
        self.progress = progress

    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "scoring"
                      ) -> list[Scored]:
        """``log p(continuation | context)`` per pair; the context needs at least one token (e.g. BOS)."""
        prompts, params = [], []
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = list(ctx), list(cont)
            if not ctx:
                raise MoekitError(f"request {i}: the context is empty (give at least a BOS token)")
            if not cont:
                raise MoekitError(f"request {i}: the continuation is empty")
            prompts.append(ctx + cont)
            params.append(SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=1,
                                         prompt_logprobs_start=len(ctx)))
        out: list[Scored | None] = [None] * len(prompts)
        if not prompts:
            return []
        stream = self.engine.stream(prompts, params)
        try:
            with _bar(len(prompts), desc, self.progress) as bar:
                for events in stream:
                    for ev in events:
                        if ev.prompt_logprobs is not None:
                            n = len(pairs[ev.index][0])
                            lps = ev.prompt_logprobs[n:]
                            out[ev.index] = Scored(sum(t.logprob for t in lps),
                                                   all(t.top and t.top[0][0] == t.token_id for t in lps),
                                                   tuple(t.logprob for t in lps))
                        if ev.finish_reason is not None:
                            bar.update(1)
        finally:
            stream.close()
        missing = [i for i, s in enumerate(out) if s is None]
        if missing:
            raise MoekitError(f"requests {missing[:5]} finished without prompt logprobs")
        return out

    def rolling(self, ids: Sequence[int], window: int, stride: int | None = None, bos: int | None = None,
                desc: str = "rolling") -> list[float]:
        """Log-probabilities of the tokens of ``ids`` after the first (of all of them when ``bos`` is given:
        the first is then conditioned on it), in engine requests of at most ``window`` tokens that each score
        the next ``stride`` tokens (default ``window - 1``: disjoint windows, as lm-eval's rolling
        loglikelihood; a smaller stride gives every scored token more context).
        """
        seq = ([bos] if bos is not None else []) + list(ids)
        stride = stride or window - 1
        if window < 2 or not 1 <= stride <= window - 1:
            raise MoekitError(f"rolling: window={window} must be >= 2 and stride={stride} in [1, window - 1]")
        pairs, done = [], 1
        while done < len(seq):
            end = min(len(seq), done + stride)
            start = max(0, end - window)
            pairs.append((seq[start:done], seq[done:end]))
            done = end
        return [lp for s in self.loglikelihood(pairs, desc) for lp in s.token_logprobs]
