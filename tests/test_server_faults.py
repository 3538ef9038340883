"""The server under load and faults, on loopback: 64 concurrent streaming clients (some leaving mid-stream)
interleaved with malformed requests of many kinds. Every valid answer equals the same request sent alone;
every invalid one is a 4xx in OpenAI's error shape naming the problem; afterwards the server is healthy and
every KV block is free. Also the limits: body size (413), queue length (429)."""

import asyncio
import json
import random

import pytest
import torch

from moekit.engine import AsyncEngine, Engine, PagedKVCache
from moekit.server import create_app
from tests.servefixtures import HI, MODEL, httpx, load_default, serving, settled

USER = [{"role": "user", "content": "Write a verse."}]


@pytest.fixture(scope="module")
def lm():
    return load_default()


@pytest.fixture(scope="module")
def server(lm):
    engine = AsyncEngine(Engine(lm.model, eos_token_ids=lm.eos_token_ids))
    with serving(create_app(lm, engine, MODEL, max_body_bytes=1 << 20)) as url:
        yield engine, url
    engine.shutdown()


# (path, body: dict or raw bytes, status, param, a word the message must contain)
MALFORMED = [
    ("chat", b'{"messages": [', 400, None, "JSON"),
    ("chat", b'{"messages": "\xff\xfe"}', 400, None, "UTF-8"),
    ("chat", b"[1, 2]", 400, None, "object"),
    ("chat", b"", 400, None, "JSON"),
    ("chat", {"messages": "hello"}, 400, "messages", "list"),
    ("chat", {"messages": []}, 400, "messages", "at least 1"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "user"),
    ("chat", {"messages": [{"content": "hi"}]}, 400, "messages[0].role", "required"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content", "text"),
    ("chat", {"messages": USER, "temperature": "hot"}, 400, "temperature", "number"),
    ("chat", {"messages": USER, "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", "nan"),
    ("chat", {"messages": USER, "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("chat", {"messages": USER, "min_p": 1.0}, 400, "min_p", "[0, 1)"),
    ("chat", {"messages": USER, "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
    ("chat", {"messages": USER, "frequency_penalty": -2.5}, 400, "frequency_penalty", "[-2, 2]"),
    ("chat", {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("chat", {"messages": USER, "top_k": "many"}, 400, "top_k", "integer"),
    ("chat", {"messages": USER, "n": 1000}, 400, "n", "[1, 16]"),
    ("chat", {"messages": USER, "n": 0}, 400, "n", "[1, 16]"),
    ("chat", {"messages": USER, "n": 1.5}, 400, "n", "integer"),
    ("chat", {"messages": USER, "max_tokens": -3}, 400, "max_tokens", ">= 1"),
    ("chat", {"messages": USER, "max_tokens": 10 ** 12}, 400, "max_tokens", "context"),
    ("chat", {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens", ">= 1"),
    ("chat", {"messages": [{"role": "user", "content": "amen " * 1100}]}, 400, "messages", "context"),
    ("chat", {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "[0, 20]"),
    ("chat", {"messages": USER, "stop": [""]}, 400, "stop", "non-empty"),
    ("chat", {"messages": USER, "stop": 7}, 400, "stop", "string"),
    ("chat", {"messages": USER, "seed": "abc"}, 400, "seed", "integer"),
    ("chat", {"messages": USER, "stream_options": "yes"}, 400, "stream_options", "dictionary"),
    ("chat", {"messages": USER, "model": "gpt-17"}, 404, "model", "gpt-17"),
    ("completions", {}, 400, "prompt", "required"),
    ("completions", {"prompt": []}, 400, "prompt", "empty"),
    ("completions", {"prompt": [[]]}, 400, "prompt", "empty"),
    ("completions", {"prompt": [1, "a"]}, 400, "prompt", "prompt"),
    ("completions", {"prompt": {"text": "hi"}}, 400, "prompt", "prompt"),
    ("completions", {"prompt": [5, 6, 99999]}, 400, "prompt", "vocabulary"),
    ("completions", {"prompt": [-1]}, 400, "prompt", "vocabulary"),
    ("completions", {"prompt": list(range(3, 1100))}, 400, "prompt", "context"),
    ("completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    ("completions", {"prompt": "x", "logprobs": -1}, 400, "logprobs", "[0, 20]"),
    ("completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", ">= 0"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "echo"),
    ("completions", {"prompt": "x", "max_tokens": 0, "echo": True, "stream": True}, 400, "stream", "streamed"),
    ("completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix"),
    ("completions", {"prompt": "x", "model": ""}, 404, "model", "does not exist"),
    ("tokenize", {"prompt": "x", "messages": USER}, 400, "prompt", "exactly one"),
    ("detokenize", {"tokens": [1, 6000]}, 400, "tokens", "vocabulary"),
    ("detokenize", {"tokens": "abc"}, 400, "tokens", "list"),
]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "tokenize": "/tokenize",
         "detokenize": "/detokenize"}


def valid_requests(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    """n streaming requests: chat or completions, greedy or seeded, some with n=2, stop strings, logprobs."""
    prompts = ["In the beginning", "And God said", "白日依山尽", "The LORD is my shepherd", "Blessed are"]
    out = []
    for i in range(n):
        body = {"model": MODEL, "max_tokens": rng.randint(3, 10), "stream": True,
                "stream_options": {"include_usage": True}}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=rng.choice([0.7, 1.0]), top_p=rng.choice([0.9, 1.0]), seed=rng.randrange(1000))
        if rng.random() < 0.2:
            body["n"] = 2
        if rng.random() < 0.2:
            body["stop"] = [rng.choice([" the", ",", "\n", "，"])]
        if i % 2:
            body["messages"] = rng.choice([HI, USER, HI[:2]])
            out.append(("chat", body))
        else:
            body["prompt"] = rng.choice([rng.choice(prompts), rng.sample(prompts, 2),
                                         [rng.randrange(3, 6000) for _ in range(rng.randint(1, 30))]])
            if rng.random() < 0.3:
                body.update(echo=True, logprobs=2)
            out.append(("completions", body))
    return out


def texts_of(kind: str, lines: list[str]) -> dict[int, str]:
    """{choice index: text} from a stream's ``data:`` lines (which must end with [DONE])."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    out = {}
    for chunk in map(json.loads, data[:-1]):
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            out[c["index"]] = out.get(c["index"], "") + (c["delta"].get("content") or "" if kind == "chat"
                                                         else c["text"])
    return out


def whole_texts(kind: str, response: dict) -> dict[int, str]:
    return {c["index"]: c["message"]["content"] if kind == "chat" else c["text"] for c in response["choices"]}


async def post(client, path: str, body) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(path, content=raw, headers={"content-type": "application/json"})


def test_load_with_disconnects_and_malformed_requests(server):
    engine, url = server
    rng = random.Random(2024)
    valid = valid_requests(rng, 64)
    leave_after = {i: rng.randint(1, 4) for i in rng.sample(range(64), 16)}  # chunks read before leaving
    for i in leave_after:  # long answers: only an abort frees the engine in time
        valid[i][1].update(max_tokens=800, ignore_eos=True)
    results: dict[int, dict[int, str]] = {}
    errors: list[str] = []

    async def stream_one(client, i, kind, body):
        await asyncio.sleep(rng.random() * 0.5)
        async with client.stream("POST", PATHS[kind], json=body) as r:
            assert r.status_code == 200, await r.aread()
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if i in leave_after and sum(ln.startswith("data: ") for ln in lines) >= leave_after[i]:
                    return  # closing the response mid-stream drops the connection
        results[i] = texts_of(kind, lines)

    async def malformed(client, j, kind, body, status, param, word):
        await asyncio.sleep(rng.random() * 0.5)
        r = await post(client, PATHS[kind], body)
        err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
        ok = (r.status_code == status and err is not None and set(err) == {"message", "type", "param", "code"}
              and err["param"] == param and word.lower() in err["message"].lower())
        if not ok:
            errors.append(f"{kind} {str(body)[:60]}: {r.status_code} {r.text[:200]}")

    busiest = [0]

    async def watch(done: asyncio.Event):
        while not done.is_set():
            busiest[0] = max(busiest[0], len(engine.engine.scheduler.running))
            await asyncio.sleep(0.01)

    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            jobs = [stream_one(client, i, kind, body) for i, (kind, body) in enumerate(valid)]
            jobs += [malformed(client, j, *case) for j, case in enumerate(MALFORMED * 2)]
            rng.shuffle(jobs)
            done = asyncio.Event()
            watcher = asyncio.ensure_future(watch(done))
            await asyncio.gather(*jobs)
            done.set()
            await watcher

    asyncio.run(main())
    assert not errors, "\n".join(errors)
    assert busiest[0] >= 16, busiest  # the requests did share the engine's batches
    assert len(MALFORMED) >= 20 and len(results) == 64 - len(leave_after)
    assert settled(engine, timeout=5), "requests or KV blocks left behind"
    assert httpx.get(f"{url}/health").status_code == 200

    # each answer equals the same request alone on the idle server, not streamed
    with httpx.Client(base_url=url, timeout=60) as client:
        for i, got in results.items():
            kind, body = valid[i]
            alone = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
            r = client.post(PATHS[kind], json=alone)
            assert r.status_code == 200, r.text
            assert got == whole_texts(kind, r.json()), (i, body)
    assert engine.engine.pool.in_use() == 0


def test_unknown_fields_are_accepted_and_ignored(server):
    _, url = server
    base = {"model": MODEL, "messages": HI, "max_tokens": 8, "temperature": 0}
    extra = {**base, "frobnicate": {"x": [1, 2]}, "tools": [{"type": "function", "function": {"name": "f"}}],
             "logit_bias": {"5": 3}, "user": "someone", "response_format": {"type": "text"}, "best_of": 1}
    with httpx.Client(base_url=url, timeout=60) as client:
        a, b = (client.post("/v1/chat/completions", json=body) for body in (base, extra))
        assert a.status_code == b.status_code == 200, b.text
        assert a.json()["choices"] == b.json()["choices"]
        c = client.post("/v1/completions", json={"prompt": "Amen", "max_tokens": 3, "nonsense": None})
        assert c.status_code == 200, c.text


def test_oversized_bodies_are_413(lm):
    """Over max_body_bytes: 413 from the Content-Length, or, without one, once the limit is read: the app
    reads a 64 MiB chunked body only a little past its 1 MiB limit."""
    engine = AsyncEngine(Engine(lm.model, eos_token_ids=lm.eos_token_ids))
    app, received = create_app(lm, engine, MODEL, max_body_bytes=1 << 20), [0]

    async def counted(scope, receive, send):  # the body bytes the app takes in
        async def tally():
            message = await receive()
            received[0] += len(message.get("body", b""))
            return message

        await app(scope, tally, send)

    big = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode()
    with serving(counted) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert received[0] == 0  # refused on its Content-Length

        block = b" " * (1 << 16)

        def chunks():  # no Content-Length
            yield b'{"prompt": "'
            for _ in range(1024):
                yield block

        r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        assert received[0] < 4 << 20, received  # the limit and the socket reads that passed it, not 64 MiB
        assert client.get("/health").status_code == 200
    engine.shutdown()


def test_a_full_queue_is_429(lm):
    """One request runs at a time and two may wait: a fourth gets 429 rate_limit_error, also when all arrive
    at once; the queue drains and later requests are served."""
    engine = AsyncEngine(Engine(lm.model, eos_token_ids=lm.eos_token_ids, max_num_seqs=1))
    long = {"model": MODEL, "prompt": "In the beginning", "max_tokens": 60, "ignore_eos": True, "temperature": 0}

    async def burst(url, n):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=long) for _ in range(n)))

    with serving(create_app(lm, engine, MODEL, max_waiting=2)) as url:
        codes = sorted(r.status_code for r in asyncio.run(burst(url, 8)))
        assert codes.count(200) >= 1 and codes.count(429) >= 1 and codes.count(200) <= 3, codes
        assert settled(engine)
        for r in asyncio.run(burst(url, 8)):
            if r.status_code == 429:
                err = r.json()["error"]
                assert err["type"] == "rate_limit_error" and err["code"] == "queue_full" and "limit 2" in err["message"]
        assert settled(engine)

        async def leave(url):  # clients that leave at once: streamed, and not streamed
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                for _ in range(3):
                    async with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
                        assert r.status_code == 200
                for _ in range(3):
                    with pytest.raises(httpx.TimeoutException):
                        await client.post("/v1/completions", json=long, timeout=0.05)

        asyncio.run(leave(url))
        assert settled(engine)
        # what they held was given back: the queue takes two again
        codes = sorted(r.status_code for r in asyncio.run(burst(url, 3)))
        assert codes in ([200, 200, 200], [200, 200, 429]), codes
    engine.shutdown()


def test_a_request_larger_than_the_kv_pool_is_a_400(lm):
    """A pool of 4 blocks of 16 tokens holds 64 tokens: a longer request is refused up front, streamed or not."""
    blocks = 5 * PagedKVCache.block_bytes(lm.model.config, 16, torch.float32)
    engine = AsyncEngine(Engine(lm.model, eos_token_ids=lm.eos_token_ids, kv_cache_bytes=blocks))
    with serving(create_app(lm, engine, MODEL)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for stream in (False, True):
            r = client.post("/v1/completions", json={"prompt": "amen " * 80, "max_tokens": 3, "stream": stream})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "prompt" and "KV" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "amen", "max_tokens": 70})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        r = client.post("/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 60})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
        r = client.post("/v1/completions", json={"prompt": "amen", "max_tokens": 3})
        assert r.status_code == 200
        assert client.get("/health").status_code == 200
    engine.shutdown()


def test_an_engine_failure_is_an_error_event_then_503(lm):
    """The engine's step raises mid-answer: a stream ends with an error event and [DONE], a waiting
    non-streamed request gets a 500 in the error shape; /health and new requests answer 503."""
    engine = AsyncEngine(Engine(lm.model, eos_token_ids=lm.eos_token_ids))
    step, calls = engine.engine.step, [0]

    def failing_step():
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("the accelerator fell off the bus")
        return step()

    engine.engine.step = failing_step
    body = {"model": MODEL, "prompt": "In the beginning", "max_tokens": 50, "ignore_eos": True}

    async def both(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def streamed():
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    return r.status_code, [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return await asyncio.gather(streamed(), client.post("/v1/completions", json=body))

    with serving(create_app(lm, engine, MODEL)) as url:
        (status, lines), whole = asyncio.run(both(url))
        assert status == 200 and lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][len("data: "):])["error"]
        assert err["type"] == "internal_error" and set(err) == {"message", "type", "param", "code"}
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "internal_error"
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert engine.engine.pool.in_use() == 0
    engine.shutdown()
