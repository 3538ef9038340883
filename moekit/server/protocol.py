"""Request bodies of the OpenAI-compatible API (vLLM's names and defaults) and their sampling parameters.

Unknown fields are accepted and ignored, as vLLM does. Every invalid value ends as a
:class:`RequestError` that names the parameter; the app turns it into OpenAI's error JSON.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moekit.engine.sampling import MAX_LOGPROBS, SamplingParams
from moekit.errors import MoekitError

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs
MAX_COMPLETION_LOGPROBS = 20  # vLLM's default --max-logprobs is larger; OpenAI's legacy limit was 5


class RequestError(ValueError):
    """A 4xx answer: ``status``, a message naming the problem, the parameter, an OpenAI error type and code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    user: str | None = None
    priority: int = 0

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "exec", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def text_messages(self) -> list[dict]:
        """Messages with string content (OpenAI's list-of-parts content joined; only text parts allowed)."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise RequestError(f"messages[{i}].content: only text parts are supported, got "
                                           f"{part.get('type')!r}", f"messages[{i}].content")
                    parts.append(part["text"])
                content = "".join(parts)
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": content or ""})
        return out


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = 16  # OpenAI's legacy default
    suffix: str | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]


def check_n(n: int) -> None:
    if not 1 <= n <= MAX_N:
        raise RequestError(f"n={n} is invalid: must be an integer in [1, {MAX_N}]", "n")


def sampling_params(lm, body: _Body, prompt_tokens: int, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, seed_offset: int = 0,
                    max_param: str = "max_tokens") -> SamplingParams:
    """SamplingParams for one choice: generation_config.json defaults (as vLLM applies them), the request's
    values over them; ``max_tokens`` None = the room the context leaves. ``max_param``: the field that gave
    ``max_tokens`` (chat's max_completion_tokens or max_tokens), for error messages."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise RequestError("stop: stop strings must be non-empty", "stop")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"{max_param}={max_tokens} is invalid: must be >= 1", max_param)
    room = lm.model.config.max_position_embeddings - prompt_tokens
    if lm.model.config.rope_scaling is None:
        if room < 1:
            raise RequestError(f"the prompt has {prompt_tokens} tokens; the model's context is "
                               f"{lm.model.config.max_position_embeddings}", "messages" if hasattr(body, "messages")
                               else "prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise RequestError(f"{max_param}={max_tokens} is too large: the prompt has {prompt_tokens} tokens and the "
                               f"model's context is {lm.model.config.max_position_embeddings} (at most {room})",
                               max_param, code="context_length_exceeded")
    kw = dict(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
              min_p=body.min_p, repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
              frequency_penalty=body.frequency_penalty, stop=tuple(stop), ignore_eos=body.ignore_eos,
              min_new_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
              seed=None if body.seed is None else body.seed + seed_offset,
              stop_token_ids=tuple(body.stop_token_ids or ()))
    if body.top_k is not None and body.top_k < 0:  # vLLM: -1 (or 0) disables top-k
        kw["top_k"] = 0
    try:
        return lm.sampling(prompt_tokens, **kw)
    except MoekitError as e:  # "sampling parameter NAME=VALUE is invalid: must be ..."
        msg = str(e)
        for ours, api in (("max_new_tokens", "max_tokens"), ("min_new_tokens", "min_tokens")):
            msg = msg.replace(f"parameter {ours}=", f"parameter {api}=")
        name = msg.removeprefix("sampling parameter ").split("=")[0] if msg.startswith("sampling parameter ") else None
        raise RequestError(msg, name) from None


def check_logprobs(value: int | None, param: str, limit: int) -> None:
    if value is not None and not 0 <= value <= min(limit, MAX_LOGPROBS):
        raise RequestError(f"{param}={value} is invalid: must be an integer in [0, {limit}]", param)
