"""The OpenAI-compatible HTTP API on FastAPI, over one :class:`~moekit.engine.AsyncEngine`.

Endpoints (vLLM's names and semantics): ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``POST /tokenize``,
``POST /detokenize``, ``GET /version``, and the web chat page at ``/``. Bodies are parsed here
(not by FastAPI's validation) so that every bad request gets OpenAI's error JSON naming the
parameter; streamed answers are server-sent events through sse-starlette.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.engine import AsyncEngine
from moekit.errors import MoekitError
from moekit.server import formats
from moekit.server.generation import Metrics, collect, merged, pieces
from moekit.server.protocol import (MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS, ChatRequest, CompletionRequest,
                                    DetokenizeRequest, RequestError, TokenizeRequest, check_logprobs, check_n,
                                    sampling_params)

log = logging.getLogger("moekit.server")
STATIC = Path(__file__).parent / "static"


class ClientGone(Exception):
    pass


def _is_type_tag(part: str) -> bool:
    """Whether a pydantic error location part names a union member's type (our fields are lowercase names)."""
    return part in ("str", "int", "float", "bool", "dict", "list") or "[" in part or part[:1].isupper()


def create_app(lm, engine: AsyncEngine, model_name: str, api_key: str | None = None, max_waiting: int = 512,
               max_body_bytes: int = 8 << 20) -> FastAPI:
    """The app for ``lm`` (a :class:`~moekit.engine.CausalLM`) served by ``engine`` as ``model_name``."""
    from moekit import __version__

    app = FastAPI(title="moekit", version=__version__, docs_url=None, redoc_url=None)
    tok, cfg = lm.tokenizer, lm.model.config
    metrics = Metrics(engine)
    created = int(time.time())
    app.state.engine, app.state.metrics = engine, metrics

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(RequestError(f"{request.method} {request.url.path}: {e.detail}", None, e.status_code, code=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(RequestError(f"internal error: {type(e).__name__}", None, 500, "internal_error"))

    def refusal(scope) -> RequestError | None:
        """A body too large by its Content-Length, or a missing API key."""
        headers, path = Headers(scope=scope), scope["path"]
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return RequestError(f"request body of {length} bytes exceeds the limit of {max_body_bytes}",
                                None, 413, code="request_too_large")
        protected = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
        if api_key and protected and headers.get("authorization") != f"Bearer {api_key}":
            return RequestError("invalid or missing API key (Authorization: Bearer KEY)", None, 401,
                                "authentication_error", "invalid_api_key")
        return None

    class Guard:
        """:func:`refusal` as plain ASGI middleware: Starlette's ``@app.middleware("http")`` wraps ``receive``
        so that ``request.is_disconnected()`` never turns true, and a non-streamed request would not be
        aborted when its client leaves."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            problem = refusal(scope) if scope["type"] == "http" else None
            if problem is not None:
                return await error(problem)(scope, receive, send)
            await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    async def body_of(request: Request, model_cls):
        raw = bytearray()
        async for chunk in request.stream():  # a body without Content-Length stops at the limit, not in memory
            raw += chunk
            if len(raw) > max_body_bytes:
                raise RequestError(f"request body exceeds the limit of {max_body_bytes} bytes", None, 413,
                                   code="request_too_large")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RequestError(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise RequestError(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            body = model_cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model is not None and body.model != model_name:
            raise RequestError(f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                               "model", 404, code="model_not_found")
        return body

    def validation_error(e: ValidationError) -> RequestError:
        """The first problem, named by its field. A value that fits none of a union's types fails once per
        type, pydantic adding the type's tag to the location (('prompt', 'str'), ('prompt', 'list[int]', 1)):
        the field is named without the tag, with what each type wanted."""
        errors = e.errors()
        loc, msg = list(errors[0]["loc"]), errors[0]["msg"]
        tag = next((k for k, p in enumerate(loc) if isinstance(p, str) and _is_type_tag(p)), None)
        if tag is not None:
            loc = loc[:tag]
            wanted = dict.fromkeys(err["msg"] for err in errors if list(err["loc"][:tag]) == loc)
            msg = f"fits none of the accepted types ({'; '.join(wanted)})"
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        return RequestError(f"{param or 'body'}: {msg}", param or None)

    admitted = [0]  # choices of responses not yet over; the engine learns of them only once they start

    def admit(n: int):
        """Admit n choices or refuse (429 when too many wait); returns the release to call once the response
        is over. Waiting = admitted less running: the scheduler's own queue misses requests admitted and not
        yet handed to the engine's worker, so a burst would pass a limit that only counted it."""
        sched = engine.engine.scheduler
        waiting = max(len(sched.waiting), admitted[0] - len(sched.running))
        if engine.error is not None or not engine.alive():
            raise RequestError("the engine has stopped", None, 503, "server_error", "engine_dead")
        if n > max_waiting:  # could never be admitted: not a retry-later
            raise RequestError(f"the request needs {n} sequences (n x prompts); this server queues at most "
                               f"{max_waiting}", "n")
        if waiting + n > max_waiting:
            raise RequestError(f"the server is busy: {waiting} requests are waiting (limit {max_waiting}); retry later",
                               None, 429, "rate_limit_error", "queue_full")
        admitted[0] += n
        held = [n]

        def release():
            admitted[0] -= held[0]
            held[0] = 0

        return release

    async def until_done(request: Request, coro):
        """Run ``coro``; cancel it (aborting its requests) if the client disconnects first."""
        task = asyncio.ensure_future(coro)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its CancelledError is expected
                raise ClientGone

    def stream(gen, request: Request, release) -> EventSourceResponse:
        async def events():
            try:
                async for chunk in gen:
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
            except RequestError as e:  # a failure after the stream began: an error event, as vLLM sends
                yield {"data": json.dumps(e.body())}
            except Exception as e:  # the engine failed: the same, rather than a stream that just stops
                log.exception("internal error in a stream on %s", request.url.path)
                yield {"data": json.dumps(RequestError(f"internal error: {type(e).__name__}", None, 500,
                                                       "internal_error").body())}
            finally:
                release()
            yield {"data": "[DONE]"}

        # the background task releases a stream whose client left before it started
        return EventSourceResponse(events(), sep="\n", ping=15, background=BackgroundTask(release))

    async def respond(request: Request, gens, release) -> list:
        """The choices of a non-streamed response (ClientGone if the client leaves first)."""
        try:
            return await until_done(request, asyncio.gather(*(collect(g) for g in gens)))
        finally:
            release()

    # ---- informational ---------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.exists():
            raise RequestError("the web chat page is not installed", None, 404, code="not_found")
        return FileResponse(page, media_type="text/html")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.error is None and engine.alive() else 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [formats.model_card(model_name, created, cfg.max_position_embeddings)]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request, TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            msgs = ChatRequest(messages=body.messages).text_messages()
            ids = chat_ids(msgs, body.add_generation_prompt)
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": cfg.max_position_embeddings, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request, DetokenizeRequest)
        check_ids(body.tokens, "tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    def check_fits(ids: list[int], params, prompt_param: str, max_param: str = "max_tokens") -> None:
        """The engine's own limits (the KV pool's size among them), checked before anything is admitted: once
        the response has begun, a refusal could only be a 500 or a cut stream."""
        pool = engine.engine.pool
        need = -(-(len(ids) + params.max_new_tokens) // pool.block_size)
        if need > pool.num_blocks - 1:
            alone = -(-(len(ids) + 1) // pool.block_size) > pool.num_blocks - 1
            raise RequestError(f"{len(ids)} prompt tokens + {max_param}={params.max_new_tokens} need {need} KV-cache "
                               f"blocks of {pool.block_size} tokens; the server's KV cache has {pool.num_blocks - 1}",
                               prompt_param if alone else max_param, code="context_length_exceeded")
        try:
            engine.engine.check_request(ids, params)
        except MoekitError as e:
            raise RequestError(str(e), prompt_param) from None

    def check_ids(ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"{param}: token ids outside the vocabulary (0..{cfg.vocab_size - 1}): {bad[:5]}", param)

    def chat_ids(messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            return lm.chat_format.encode(tok, messages, add_generation_prompt=add_generation_prompt)
        except (MoekitError, ValueError) as e:
            raise RequestError(f"messages: {e}", "messages") from None

    # ---- chat --------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request, ChatRequest)
        check_n(body.n)
        if body.top_logprobs is not None:
            check_logprobs(body.top_logprobs, "top_logprobs", MAX_TOP_LOGPROBS)
        prompt = chat_ids(body.text_messages(), body.add_generation_prompt)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(body, max_param)
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = [sampling_params(lm, body, len(prompt), max_tokens, logprobs=lp, seed_offset=i, max_param=max_param)
                  for i in range(body.n)]
        check_fits(prompt, params[0], "messages", max_param)
        release = admit(body.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        gens = [pieces(engine, tok, metrics, prompt, p, body.priority, body.skip_special_tokens) for p in params]
        if body.stream:
            chunks = formats.chat_chunks(rid, now, model_name, merged(gens), len(prompt), body, tok)
            return stream(chunks, request, release)
        try:
            choices = await respond(request, gens, release)
        except ClientGone:
            return Response(status_code=499)
        return formats.chat_response(rid, now, model_name, choices, len(prompt), body, tok)

    # ---- completions ---------------------------------------------------------------------------------------
    def prompts_of(body: CompletionRequest) -> list[tuple[list[int], str]]:
        """(ids, text) of each prompt (text: as given, or the ids decoded)."""
        p = body.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise RequestError("prompt: must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            p = [p]
        out = []
        for i, x in enumerate(p):
            ids = tok.encode(x) if isinstance(x, str) else list(x)
            if not ids:
                raise RequestError(f"prompt[{i}] is empty", "prompt")
            check_ids(ids, "prompt")
            out.append((ids, x if isinstance(x, str) else tok.decode(ids, skip_special_tokens=False)))
        return out

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, CompletionRequest)
        check_n(body.n)
        check_logprobs(body.logprobs, "logprobs", MAX_COMPLETION_LOGPROBS)
        if body.suffix:
            raise RequestError("suffix is not supported", "suffix")
        if body.max_tokens is not None and body.max_tokens < 0:
            raise RequestError(f"max_tokens={body.max_tokens} is invalid: must be >= 0", "max_tokens")
        score_only = body.max_tokens == 0
        if score_only and not body.echo:
            raise RequestError("max_tokens=0 needs echo=true (scoring the prompt)", "max_tokens")
        if body.stream and score_only:
            raise RequestError("max_tokens=0 cannot be streamed", "stream")
        prompts = prompts_of(body)
        want_prompt_lp = body.echo and body.logprobs is not None
        jobs = []
        for i, (ids, text) in enumerate(prompts):
            for j in range(body.n):
                jobs.append((i, ids, sampling_params(
                    lm, body, len(ids), 1 if score_only else body.max_tokens, logprobs=body.logprobs,
                    prompt_logprobs=body.logprobs if want_prompt_lp else None, seed_offset=j), text))
            check_fits(ids, jobs[-1][2], "prompt")
        release = admit(len(jobs))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        gens = [pieces(engine, tok, metrics, ids, p, body.priority, body.skip_special_tokens)
                for _, ids, p, _ in jobs]
        if body.stream:
            chunks = formats.completion_chunks(rid, now, model_name, merged(gens), jobs, body, tok)
            return stream(chunks, request, release)
        try:
            choices = await respond(request, gens, release)
        except ClientGone:
            return Response(status_code=499)
        return formats.completion_response(rid, now, model_name, choices, jobs, body, tok, score_only)

    return app
