"""OpenAI's response shapes: chat completions (whole and streamed chunks), legacy completions with their
``logprobs`` object (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), model cards."""

from __future__ import annotations

from collections.abc import AsyncIterator

from moekit.engine import TokenLogprob
from moekit.server.generation import Choice, Piece, token_text, token_texts


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "moekit", "root": name, "parent": None,
            "max_model_len": max_model_len, "permission": []}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- chat ----------------------------------------------------------------------------------------------
def _chat_logprob(tok, lp: TokenLogprob) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def chat_response(rid: str, created: int, model: str, choices: list[Choice], prompt_tokens: int, body, tok) -> dict:
    out = []
    for i, c in enumerate(choices):
        logprobs = ({"content": [_chat_logprob(tok, ev.logprob) for ev in c.events if ev.logprob is not None]}
                    if body.logprobs else None)
        out.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": out,
            "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices))}


async def chat_chunks(rid: str, created: int, model: str, gen: AsyncIterator[tuple[int, Piece]], prompt_tokens: int,
                      body, tok) -> AsyncIterator[dict]:
    """A role chunk per choice, content deltas, ``finish_reason`` on each choice's last chunk, then usage if asked."""
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    started, generated = set(), 0
    for i in range(body.n):
        started.add(i)
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    async for i, p in gen:
        generated += 1
        logprobs = ({"content": [_chat_logprob(tok, p.event.logprob)]}
                    if body.logprobs and p.event.logprob is not None else None)
        if not p.text and p.finish_reason is None and logprobs is None:
            continue
        choice = {"index": i, "delta": {"content": p.text} if p.text else {}, "logprobs": logprobs,
                  "finish_reason": p.finish_reason}
        if p.finish_reason is not None:
            choice["stop_reason"] = p.stop_reason
        yield {**head, "choices": [choice]}
    if body.include_usage():
        yield {**head, "choices": [], "usage": usage(prompt_tokens, generated)}


# ---- completions ----------------------------------------------------------------------------------------
class _Legacy:
    """Accumulates OpenAI's legacy logprobs object."""

    def __init__(self, tok, offset: int = 0):
        self.tok, self.offset = tok, offset
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, token_id: int, lp: TokenLogprob | None, text: str | None = None) -> None:
        """``text``: what the token adds to the text (default: the token decoded alone)."""
        text = token_text(self.tok, token_id) if text is None else text
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        if lp is None:  # the first prompt token: nothing before it to condition on
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(lp.logprob)
        top = {token_text(self.tok, t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)  # the chosen token is always listed, as vLLM does
        self.top_logprobs.append(top)

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def completion_response(rid: str, created: int, model: str, choices: list[Choice], jobs, body, tok,
                        score_only: bool) -> dict:
    out, generated = [], 0
    for k, (c, (_, ids, _, _)) in enumerate(zip(choices, jobs)):
        prompt_text = jobs[k][3] if body.echo else ""
        tokens, events = ([], []) if score_only else (c.token_ids, c.events)
        generated += len(tokens)
        logprobs = None
        if body.logprobs is not None:
            legacy = _Legacy(tok)
            texts = token_texts(tok, ids + tokens, 0 if body.echo else len(ids))
            if body.echo:
                prompt_lp = c.events[0].prompt_logprobs or [None] * len(ids)
                for t, lp, text in zip(ids, prompt_lp, texts):
                    legacy.add(t, lp, text)
                texts = texts[len(ids):]
            for ev, text in zip(events, texts):
                legacy.add(ev.token_id, ev.logprob, text)
            logprobs = legacy.body()
        out.append({"index": k, "text": prompt_text + ("" if score_only else c.text), "logprobs": logprobs,
                    "finish_reason": "length" if score_only else c.finish_reason,
                    "stop_reason": None if score_only else c.stop_reason})
    prompt_tokens = sum(len(ids) for i, (_, ids, _, _) in enumerate(jobs) if i % body.n == 0)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": out,
            "usage": usage(prompt_tokens, generated)}


async def completion_chunks(rid: str, created: int, model: str, gen: AsyncIterator[tuple[int, Piece]], jobs, body,
                            tok) -> AsyncIterator[dict]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    generated, echoed = 0, set()
    async for k, p in gen:
        generated += 1
        text = p.text
        if body.echo and k not in echoed:
            echoed.add(k)
            text = jobs[k][3] + text
        logprobs = None
        if body.logprobs is not None and p.event.logprob is not None:
            legacy = _Legacy(tok)
            legacy.add(p.event.token_id, p.event.logprob)
            logprobs = legacy.body()
        if not text and p.finish_reason is None and logprobs is None:
            continue
        yield {**head, "choices": [{"index": k, "text": text, "logprobs": logprobs, "finish_reason": p.finish_reason,
                                    "stop_reason": p.stop_reason}]}
    if body.include_usage():
        prompt_tokens = sum(len(ids) for i, (_, ids, _, _) in enumerate(jobs) if i % body.n == 0)
        yield {**head, "choices": [], "usage": usage(prompt_tokens, generated)}
