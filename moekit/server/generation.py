"""One choice of a request, as text: the engine's token events turned into text deltas, stop strings applied,
metrics observed, and the pieces OpenAI's response formats need (token strings, logprob entries)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moekit.engine import AsyncEngine, SamplingParams, TokenEvent
from moekit.engine.text import TextRow
from moekit.tokenizer import Tokenizer


class Metrics:
    """The server's Prometheus metrics (one registry per app, so tests can build several)."""

    def __init__(self, engine: AsyncEngine):
        self.registry = r = CollectorRegistry()
        sched, pool = engine.engine.scheduler, engine.engine.pool
        Gauge("moekit:num_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: len(sched.running))
        Gauge("moekit:num_requests_waiting", "Requests waiting to be scheduled", registry=r).set_function(
            lambda: len(sched.waiting))
        Gauge("moekit:kv_blocks_in_use", "KV-cache blocks referenced by requests", registry=r).set_function(
            pool.in_use)
        Gauge("moekit:kv_blocks_total", "KV-cache blocks in the pool", registry=r).set_function(
            lambda: pool.num_blocks - 1)
        Gauge("moekit:prefix_cache_hit_rate", "Prompt blocks found in the prefix cache / blocks looked up",
              registry=r).set_function(lambda: pool.hits / pool.queries if pool.queries else 0.0)
        self.prompt_tokens = Counter("moekit:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("moekit:generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("moekit:requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("moekit:time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=r)
        self.itl = Histogram("moekit:inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=buckets, registry=r)


@dataclass
class Piece:
    """A text delta of one choice, with the token that produced it."""

    text: str
    event: TokenEvent
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Choice:
    """A finished (non-streamed) choice."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


async def pieces(engine: AsyncEngine, tok: Tokenizer, metrics: Metrics, prompt: list[int], params: SamplingParams,
                 priority: int = 0, skip_special_tokens: bool = True) -> AsyncIterator[Piece]:
    """Text deltas of one choice; the last has ``finish_reason``. Leaving early aborts the request."""
    row = TextRow(tok, params)
    row.decoder.skip = skip_special_tokens
    start = last = time.monotonic()
    n = 0
    agen = engine.generate(prompt, params, priority)
    try:
        async for ev in agen:
            now = time.monotonic()
            (metrics.ttft if n == 0 else metrics.itl).observe(now - last if n else now - start)
            last, n = now, n + 1
            metrics.generation_tokens.inc()
            text, stop = row.add(row.decoder.step(ev.token_id))
            if stop is not None:
                metrics.requests.labels("stop").inc()
                yield Piece(text, ev, "stop", stop)
                return
            if ev.finish_reason is not None:
                metrics.requests.labels(ev.finish_reason).inc()
                reason = ev.token_id if ev.finish_reason == "stop" else None
                yield Piece(text + row.finish(), ev, ev.finish_reason, reason)
                return
            yield Piece(text, ev)
    finally:
        await agen.aclose()
        metrics.prompt_tokens.inc(len(prompt))


async def collect(gen: AsyncIterator[Piece]) -> Choice:
    c = Choice()
    async for p in gen:
        c.text += p.text
        c.token_ids.append(p.event.token_id)
        c.events.append(p.event)
        c.finish_reason, c.stop_reason = p.finish_reason, p.stop_reason
    return c


async def merged(gens: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) from several choices as they come; cancelling stops them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, gen):
        try:
            async for p in gen:
                await queue.put((i, p))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, p = await queue.get()
            if p is None:
                left -= 1
                if tasks[i].done() and tasks[i].exception() is not None:
                    raise tasks[i].exception()
                continue
            yield i, p
    finally:
        for t in tasks:
            t.cancel()


def token_text(tok: Tokenizer, token_id: int) -> str:
    """A token as text on its own (special tokens included), for alternatives in logprob listings."""
    return tok.decode([token_id], skip_special_tokens=False)


def token_texts(tok: Tokenizer, ids: list[int], start: int = 0, window: int = 6) -> list[str]:
    """The text each of ``ids[start:]`` adds to the decoded sequence (so they concatenate to it, spaces
    included): decode a few tokens of left context with and without the token."""
    out = []
    for i in range(start, len(ids)):
        lo = max(0, i - window)
        out.append(tok.decode(ids[lo:i + 1], skip_special_tokens=False)[
                   len(tok.decode(ids[lo:i], skip_special_tokens=False)):])
    return out
