"""Text on top of the token engine: incremental detokenisation and stop strings.

Stop strings are matched on the decoded text, so they may span token
boundaries. While the tail of the text could still become a stop string it is
held back, so a stream never emits text that is later cut; streamed deltas
always concatenate to the final text, which is ``tokenizer.decode(token_ids)``
(cut at a stop string): no space before the first word of a reply.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from moekit.engine.engine import Engine
from moekit.engine.sampling import SamplingParams
from moekit.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class TextEvent:
    index: int  # which request
    text: str  # new text (may be empty while a character or a possible stop string is pending)
    token_id: int
    finish_reason: str | None = None  # "stop" or "length" on the request's last event
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class TextCompletion:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None


class TextRow:
    """One request's text: incremental decoding, stop strings, text held back while a stop may follow."""

    def __init__(self, tok: Tokenizer, params: SamplingParams):
        self.decoder = IncrementalDecoder(tok)
        self.stops, self.text, self.sent = params.stop, "", 0
        self.longest = max((len(s) for s in self.stops), default=0)

    def add(self, piece: str) -> tuple[str, str | None]:
        """Append decoded text; return (text safe to emit now, stop string hit or None)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if self.stops:
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                cut, stop = min(hits)
                self.text = self.text[:cut]
                return self._emit(len(self.text)), stop
        hold = 0
        for s in self.stops:  # longest suffix of the text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._emit(len(self.text) - hold), None

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._emit(len(self.text))


class TextGenerator:
    """Generate text from token-id prompts, honouring stop strings; ``stream`` yields text deltas."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    def stream(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> Iterator[TextEvent]:
        prompts, params = self.engine._check(prompts, params)
        rows = [TextRow(self.tokenizer, sp) for sp in params]
        steps = self.engine.stream(prompts, params)
        try:
            yield from self._events(steps, rows)
        finally:  # the consumer stopped early: its requests leave the engine
            steps.close()

    def _events(self, steps, rows) -> Iterator[TextEvent]:
        for events in steps:
            for ev in events:
                row = rows[ev.index]
                text, stop = row.add(row.decoder.step(ev.token_id))
                if stop is not None:  # the engine drops the row before its next step
                    steps.cancel(ev.index)
                    yield TextEvent(ev.index, text, ev.token_id, "stop", stop)
                elif ev.finish_reason is not None:
                    reason = ev.token_id if ev.finish_reason == "stop" else None
                    yield TextEvent(ev.index, text + row.finish(), ev.token_id, ev.finish_reason, reason)
                else:
                    yield TextEvent(ev.index, text, ev.token_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[TextCompletion]:
        prompts, params = self.engine._check(prompts, params)
        out = [TextCompletion("", [], p, None) for p in prompts]
        for ev in self.stream(prompts, params):
            c = out[ev.index]
            c.text += ev.text
            c.token_ids.append(ev.token_id)
            if ev.finish_reason is not None:
                c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
        return out

