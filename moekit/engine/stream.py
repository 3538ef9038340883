"""What the engine hands back: token events, completions, and the batch ``Stream`` over ``Engine.step``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from moekit.engine.engine import Engine
    from moekit.engine.sampling import SamplingParams


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (log_softmax of the raw logits) and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class TokenEvent:
    """One new token of request ``index``; ``finish_reason`` is set on its last token.

    ``index``: the request id (``Engine.add_request``), or the prompt's position in a
    ``stream`` / ``generate`` batch. ``prompt_logprobs`` (first event only, when asked for):
    None for the first prompt token, then one :class:`TokenLogprob` per prompt token.
    """

    index: int
    token_id: int
    finish_reason: str | None = None  # "stop" (a stop id), "length" (max_new_tokens / context)
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int | None = None  # first event: prompt tokens the prefix cache supplied


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, including a final stop id if one ended it
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0


class Stream:
    """Iterator over steps (each a list of this batch's :class:`TokenEvent`, indexed by prompt position).

    Other requests may share the engine's steps; their events are not this stream's. ``cancel``
    ends one request early (stop strings); ``close`` (also on garbage collection) aborts the rest.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
        self.engine = engine
        self.ids = []
        for p, sp in zip(prompts, params):
            rid = engine.new_request_id()
            engine._outbox[rid] = []
            self.ids.append(engine.add_request(p, sp, request_id=rid))
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.open = set(self.ids)
        self.cached: dict[int, int] = {}

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        return self

    def __next__(self) -> list[TokenEvent]:
        box = self.engine._outbox
        while self.open:
            if not any(box.get(rid) for rid in self.open):
                if not self.engine.has_unfinished():  # aborted from outside
                    break
                self.engine.step()
            out = []
            for rid in sorted(self.open, key=self.index.get):
                for ev in box.get(rid, []):
                    if ev.num_cached_tokens is not None:
                        self.cached[rid] = ev.num_cached_tokens
                    out.append(TokenEvent(self.index[rid], ev.token_id, ev.finish_reason, ev.logprob,
                                          ev.prompt_logprobs, ev.num_cached_tokens))
                    if ev.finish_reason is not None:
                        self.open.discard(rid)
                        box.pop(rid, None)
                if rid in box:
                    box[rid] = []
            if out:
                return out
        raise StopIteration

    def cancel(self, index: int) -> None:
        """Stop request ``index`` now (used for stop strings)."""
        rid = self.ids[index]
        self.open.discard(rid)
        self.engine.abort(rid)

    def close(self) -> None:
        for rid in list(self.open):
            self.engine.abort(rid)
        self.open.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
