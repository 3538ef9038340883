"""moekit serve through the official ``openai`` client: a real uvicorn server on a loopback port, serving the
embedded default model, answers what the model gives in-process (text, seeds, logprobs), streams, scores,
names bad parameters in OpenAI's error JSON, and frees a request's KV blocks when its client goes away."""

import contextlib
import signal
import subprocess
import sys

import pytest

import moekit
from moekit.engine import AsyncEngine, Engine
from moekit.engine.text import TextGenerator
from moekit.server import create_app
from tests.servefixtures import HI, MODEL, http_get, httpx, load_default, log_softmax, serve_process, serving, settled

openai = pytest.importorskip("openai")


class Served:
    def __init__(self, lm, engine, url, ref):
        self.lm, self.engine, self.url, self.ref = lm, engine, url, ref
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=url, timeout=60)


@pytest.fixture(scope="module")
def served():
    lm = load_default()
    engine = AsyncEngine(Engine(lm.model, eos_token_ids=lm.eos_token_ids))
    lm.engine = engine.engine
    ref = load_default()  # in-process answers come from a separate copy with its own engine
    with serving(create_app(lm, engine, MODEL)) as url:
        s = Served(lm, engine, url, ref)
        yield s
        s.http.close()
    engine.shutdown()


def generated(ref, prompt_ids: list[int], **sampling):
    """(text, token ids) the in-process engine gives ``prompt_ids`` with the server's sampling defaults."""
    out = TextGenerator(ref.engine, ref.tokenizer).generate([prompt_ids], ref.sampling(len(prompt_ids), **sampling))
    return out[0].text, out[0].token_ids


# ---- chat ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_chat_equals_lm_chat_in_process(served, sampling):
    r = served.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, **sampling)
    want = served.ref.chat(None, HI, max_new_tokens=24, **sampling)
    assert r.choices[0].message.content == want and want.strip()
    assert r.choices[0].message.role == "assistant" and r.model == MODEL and r.object == "chat.completion"
    prompt = served.ref.chat_format.encode(served.ref.tokenizer, HI)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_concatenates_to_the_whole_answer(served):
    kw = {"model": MODEL, "messages": HI, "max_tokens": 20, "temperature": 0.8, "seed": 5}
    whole = served.client.chat.completions.create(**kw)
    chunks = list(served.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()


def test_n_choices_use_seed_plus_index(served):
    r = served.client.chat.completions.create(model=MODEL, messages=HI[:2], n=2, seed=77, temperature=1.0,
                                              max_tokens=16)
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == [served.ref.chat(None, HI[:2], max_new_tokens=16, temperature=1.0, seed=s) for s in (77, 78)]
    assert texts[0] != texts[1]
    prompt = served.ref.chat_format.encode(served.ref.tokenizer, HI[:2])
    lengths = [len(generated(served.ref, prompt, max_new_tokens=16, temperature=1.0, seed=s)[1]) for s in (77, 78)]
    assert r.usage.completion_tokens == sum(lengths) and r.usage.prompt_tokens == len(prompt)
    streamed = {}
    for chunk in served.client.chat.completions.create(model=MODEL, messages=HI[:2], n=2, seed=77, temperature=1.0,
                                                       max_tokens=16, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[0], streamed[1]] == texts


def test_stop_strings_cut_the_text(served):
    kw = {"model": MODEL, "messages": HI[:2], "temperature": 0}
    full = served.client.chat.completions.create(**kw, max_tokens=40).choices[0].message.content
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]  # the third word with its space: the text ends before it
    r = served.client.chat.completions.create(**kw, max_tokens=40, stop=[stop, "never appears"])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].delta.content or "" for c in served.client.chat.completions.create(
        **kw, max_tokens=40, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_max_tokens_and_max_completion_tokens(served):
    kw = {"model": MODEL, "messages": HI[:2], "temperature": 0}
    a = served.client.chat.completions.create(**kw, max_tokens=5)
    b = served.client.chat.completions.create(**kw, max_completion_tokens=5)
    c = served.client.chat.completions.create(**kw, max_tokens=50, max_completion_tokens=5)  # the newer name wins
    assert a.usage.completion_tokens == b.usage.completion_tokens == c.usage.completion_tokens == 5
    assert a.choices[0].message.content == b.choices[0].message.content == c.choices[0].message.content
    assert a.choices[0].finish_reason == "length"


def test_chat_logprobs_equal_the_full_recompute(served):
    r = served.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0.7, seed=9,
                                              logprobs=True, top_logprobs=3)
    prompt = served.http.post("/tokenize", json={"messages": HI}).json()["tokens"]
    assert prompt == served.ref.chat_format.encode(served.ref.tokenizer, HI)
    text, ids = generated(served.ref, prompt, max_new_tokens=12, temperature=0.7, seed=9)
    assert r.choices[0].message.content == text
    entries = r.choices[0].logprobs.content
    assert len(entries) == len(ids) == r.usage.completion_tokens
    lp = log_softmax(served.ref.model, prompt + ids)
    tok = served.ref.tokenizer
    for i, (entry, t) in enumerate(zip(entries, ids)):
        row = lp[len(prompt) - 1 + i]
        assert entry.token == tok.decode([t], skip_special_tokens=False)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert abs(entry.logprob - float(row[t])) < 1e-4
        top = row.topk(3)
        assert [e.token for e in entry.top_logprobs] == [tok.decode([j], skip_special_tokens=False)
                                                         for j in top.indices.tolist()]
        assert max(abs(e.logprob - float(v)) for e, v in zip(entry.top_logprobs, top.values)) < 1e-4
    streamed = [c.choices[0].logprobs.content[0] for c in served.client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=12, temperature=0.7, seed=9, logprobs=True, top_logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]


# ---- completions ------------------------------------------------------------------------------------------
def test_completion_prompts_as_strings_lists_and_token_ids(served):
    tok, kw = served.ref.tokenizer, {"model": MODEL, "max_tokens": 10, "temperature": 0}
    prompts = ["In the beginning", "白日依山尽"]
    want = [served.ref.complete(p, max_new_tokens=10, temperature=0) for p in prompts]
    one = served.client.completions.create(prompt=prompts[0], **kw)
    assert one.choices[0].text == want[0] and one.object == "text_completion"
    assert one.usage.prompt_tokens == len(tok.encode(prompts[0]))
    both = served.client.completions.create(prompt=prompts, **kw)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == want
    ids = [tok.encode(p) for p in prompts]
    assert served.client.completions.create(prompt=ids[1], **kw).choices[0].text == want[1]
    by_ids = served.client.completions.create(prompt=ids, **kw)
    assert [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)] == want
    # n per prompt, seeded: choice k is prompt k // n with seed + k % n
    r = served.client.completions.create(prompt=prompts, n=2, seed=3, temperature=0.9, max_tokens=8, model=MODEL)
    got = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert got == [served.ref.complete(p, max_new_tokens=8, temperature=0.9, seed=s) for p in prompts for s in (3, 4)]
    streamed = {}
    for chunk in served.client.completions.create(prompt=prompts, n=2, seed=3, temperature=0.9, max_tokens=8,
                                                  model=MODEL, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[k] for k in range(4)] == got


def test_echo_logprobs_equal_the_full_recompute(served):
    text = "In the beginning God created the heaven"
    r = served.client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0, echo=True, logprobs=2)
    ids = served.ref.tokenizer.encode(text)
    gen_text, gen = generated(served.ref, ids, max_new_tokens=4, temperature=0)
    c = r.choices[0]
    assert c.text == text + gen_text
    lps = c.logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(ids) + len(gen) == len(lps.text_offset)
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None  # nothing before the first token
    lp = log_softmax(served.ref.model, ids + gen)
    want = [float(lp[p - 1, t]) for p, t in enumerate(ids + gen) if p > 0]
    assert max(abs(a - b) for a, b in zip(lps.token_logprobs[1:], want)) < 1e-4
    for p in range(1, len(ids) + len(gen)):
        top = lps.top_logprobs[p]
        assert lps.tokens[p] in top and abs(top[lps.tokens[p]] - lps.token_logprobs[p]) < 1e-6
        best = lp[p - 1].topk(2)
        assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)
    assert "".join(lps.tokens[1:]) == text + gen_text  # the first token is the BOS the tokenizer adds


def test_max_tokens_zero_with_echo_scores_the_prompt(served):
    texts = ["And God said, Let there be light", "and there was light"]
    r = served.client.completions.create(model=MODEL, prompt=texts, max_tokens=0, echo=True, logprobs=0,
                                         temperature=0)
    assert r.usage.completion_tokens == 0
    for c in sorted(r.choices, key=lambda c: c.index):
        ids = served.ref.tokenizer.encode(texts[c.index])
        assert c.text == texts[c.index] and c.finish_reason == "length"
        assert len(c.logprobs.token_logprobs) == len(ids) and c.logprobs.token_logprobs[0] is None
        lp = log_softmax(served.ref.model, ids)
        want = sum(float(lp[p - 1, ids[p]]) for p in range(1, len(ids)))
        assert sum(c.logprobs.token_logprobs[1:]) == pytest.approx(want, abs=1e-4)
    assert settled(served.engine)


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, param", [
    (lambda c: c.chat.completions.create(model=MODEL, messages=HI, temperature=-1), "temperature"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=HI, top_p=1.5), "top_p"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=HI, n=0), "n"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=HI, n=1000), "n"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=21), "top_logprobs"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}]),
     "messages[0].role"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[]), "messages"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=0), "max_completion_tokens"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "amen " * 1100}]),
     "messages"),
    (lambda c: c.completions.create(model=MODEL, prompt="x", logprobs=21), "logprobs"),
    (lambda c: c.completions.create(model=MODEL, prompt=list(range(5, 1100))), "prompt"),
    (lambda c: c.completions.create(model=MODEL, prompt="x", max_tokens=5000), "max_tokens"),
    (lambda c: c.completions.create(model=MODEL, prompt=[1, 2, 60000]), "prompt"),
    (lambda c: c.completions.create(model=MODEL, prompt="x", max_tokens=0), "max_tokens"),
    (lambda c: c.completions.create(model=MODEL, prompt="x", stop=[""]), "stop"),
], ids=["temperature", "top_p", "n0", "n1000", "top_logprobs", "role", "empty-messages", "max_completion_tokens",
        "long-chat", "logprobs", "long-prompt", "max_tokens", "vocab", "max_tokens0", "empty-stop"])
def test_bad_requests_are_bad_request_errors_naming_the_param(served, call, param):
    with pytest.raises(openai.BadRequestError) as e:
        call(served.client)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"] and set(err) == {"message", "type", "param", "code"}


def test_context_overflow_has_its_code(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=MODEL, prompt=list(range(5, 1100)))
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]


def test_unknown_model_is_not_found(served):
    with pytest.raises(openai.NotFoundError) as e:
        served.client.chat.completions.create(model="gpt-17", messages=HI)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert "gpt-17" in e.value.body["message"] and MODEL in e.value.body["message"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(served):
    for method, path, status in (("GET", "/v1/nothing", 404), ("POST", "/v2/completions", 404),
                                 ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)):
        r = served.http.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        assert path in r.json()["error"]["message"]


def test_api_key_is_required_when_set(served):
    with serving(create_app(served.lm, served.engine, MODEL, api_key="sesame")) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert httpx.post(f"{url}/tokenize", json={"prompt": "hi"}).status_code == 401
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert right.models.list().data[0].id == MODEL
        assert right.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


# ---- informational endpoints ---------------------------------------------------------------------------
def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_health_metrics_version_models(served):
    r = served.http.get("/health")
    assert r.status_code == 200 and r.content == b""
    before = served.http.get("/metrics").text
    for name in ("moekit:num_requests_running", "moekit:num_requests_waiting", "moekit:kv_blocks_in_use",
                 "moekit:kv_blocks_total", "moekit:prompt_tokens_total", "moekit:generation_tokens_total",
                 "moekit:time_to_first_token_seconds", "moekit:prefix_cache_hit_rate"):
        assert name in before
    served.client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=7, temperature=0)
    after = served.http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert metric(after.text, "moekit:generation_tokens_total") == metric(before, "moekit:generation_tokens_total") + 7
    assert metric(after.text, "moekit:prompt_tokens_total") == metric(before, "moekit:prompt_tokens_total") + 4
    assert metric(after.text, 'moekit:requests_total{finish_reason="length"}') == 1 + metric(
        before, 'moekit:requests_total{finish_reason="length"}')
    assert metric(after.text, "moekit:time_to_first_token_seconds_count") > 0
    assert served.http.get("/version").json() == {"version": moekit.__version__}
    models = served.client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].object == "model"
    assert models[0].model_extra["max_model_len"] == 1024


def test_tokenize_detokenize_roundtrip(served):
    text = "In the beginning 白日依山尽"
    r = served.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == served.ref.tokenizer.encode(text, add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    assert served.http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    with_bos = served.http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert with_bos == [served.ref.tokenizer.bos_token_id] + r["tokens"]
    bad = served.http.post("/detokenize", json={"tokens": [1, -3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---- clients that go away -----------------------------------------------------------------------------
def test_a_client_leaving_mid_stream_aborts_its_request(served):
    assert settled(served.engine)
    stream = served.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=900, stream=True,
                                                   extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 3:
            break
    assert served.engine.engine.has_unfinished()  # it was still generating
    stream.close()
    assert settled(served.engine, timeout=5), "the abandoned request still holds the engine"
    # a non-streamed request whose client times out is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{served.url}/v1/completions", timeout=0.5,
                   json={"prompt": "In the beginning", "max_tokens": 900, "ignore_eos": True})
    assert settled(served.engine, timeout=5)
    assert served.http.get("/health").status_code == 200


def test_serve_subprocess_exits_0_on_sigterm_mid_stream(tmp_path):
    log = tmp_path / "serve.log"
    with serve_process(log, "--kernels", "reference", "--max-model-len", "512") as (proc, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=200, stream=True,
                                           extra_body={"ignore_eos": True})
        texts = []
        for chunk in stream:
            texts.append(chunk.choices[0].text if chunk.choices else "")
            if len(texts) == 3:
                proc.send_signal(signal.SIGTERM)
                break
        with contextlib.suppress(openai.APIError, httpx.TransportError):
            for chunk in stream:  # in-flight streams end (or are cut) while the server shuts down
                pass
        assert proc.wait(timeout=30) == 0, log.read_text()


def test_serve_subprocess_ctrl_c_exits_130_and_a_taken_port_is_one_line(tmp_path):
    log = tmp_path / "serve.log"
    # a shell's background job (CI started with &) inherits SIGINT ignored: give the server the terminal's default
    with serve_process(log, "--kernels", "reference", "--max-model-len", "512",
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as (proc, url):
        port = url.rsplit(":", 1)[1]
        taken = subprocess.run([sys.executable, "-m", "moekit.cli", "serve", "--port", port, "--kernels",
                                "reference"], capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and "Traceback" not in taken.stderr, taken.stderr
        assert f"cannot serve on http://127.0.0.1:{port}" in taken.stderr.splitlines()[-1]
        assert http_get(url + "/health")[0] == 200  # the first server is unaffected
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, log.read_text()
    assert "Traceback" not in log.read_text()
