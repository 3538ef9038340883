"""Text generation: stop strings across token boundaries, streaming equals batch, the seed-card API."""

import pytest
import torch

from moekit.engine import CausalLM, SamplingParams, TextGenerator


@pytest.fixture(scope="module", params=["xverse", "llama_moe"])
def lm(request, text_checkpoint):
    return CausalLM.from_pretrained(text_checkpoint(request.param), dtype="float32")


def greedy_pieces(lm, prompt_ids, n=40):
    gen = TextGenerator(lm.engine, lm.tokenizer)
    return [ev.text for ev in gen.stream([prompt_ids], SamplingParams(max_new_tokens=n, temperature=0,
                                                                       ignore_eos=True))]


def test_stop_string_spanning_a_token_boundary(lm):
    prompt = lm.tokenizer.encode("Hello world")
    pieces = greedy_pieces(lm, prompt)
    full = "".join(pieces)
    pos, k = 0, None
    for i in range(len(pieces) - 1):  # a stop string made of the end of one piece and the start of the next
        pos += len(pieces[i])
        if pieces[i].strip() and pieces[i + 1].strip():
            k = i
            break
    assert k is not None, f"no two adjacent non-blank pieces in {pieces!r}"
    stop = pieces[k][-1] + pieces[k + 1][0]
    cut = full.index(stop)
    gen = TextGenerator(lm.engine, lm.tokenizer)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, stop=("zzz-never", stop))
    done = gen.generate([prompt], params)[0]
    assert done.text == full[:cut] and done.finish_reason == "stop" and done.stop_reason == stop
    streamed = list(gen.stream([prompt], params))
    assert "".join(ev.text for ev in streamed) == done.text
    assert all(stop not in ev.text for ev in streamed)
    assert streamed[-1].finish_reason == "stop"


def test_streaming_text_equals_batch_text(lm):
    gen = TextGenerator(lm.engine, lm.tokenizer)
    prompts = [lm.tokenizer.encode(t) for t in ("北京的景点：", "Suzhou is famous of", "你好")]
    params = SamplingParams(max_new_tokens=25, temperature=0.8, seed=5)
    batch = gen.generate(prompts, params)
    texts = ["", "", ""]
    for ev in gen.stream(prompts, params):
        texts[ev.index] += ev.text
    assert texts == [c.text for c in batch]
    for c in batch:
        assert c.finish_reason in ("stop", "length")
        assert c.text == lm.tokenizer.decode(c.token_ids)  # invalid byte runs included (a random model emits them)


def test_generate_mirrors_transformers(lm):
    tok = lm.tokenizer
    inputs = tok("北京的景点：故宫、天坛、万里长城等。\n深圳的景点：", return_tensors="pt").input_ids
    out = lm.generate(inputs, max_new_tokens=8, eos_token_id=tok.eos_token_id, repetition_penalty=1.1)
    assert out.shape[0] == 1 and torch.equal(out[0, :inputs.shape[1]], inputs[0])
    assert 1 <= out.shape[1] - inputs.shape[1] <= 8
    batch = tok(["a", "a much longer prompt here"], return_tensors="pt")
    two = lm.generate(**batch, max_new_tokens=4)
    single = lm.generate(tok("a", return_tensors="pt").input_ids, max_new_tokens=4)
    assert two[0, -4:].tolist() == single[0, -4:].tolist()  # left padding does not change row 0's tokens
    with pytest.raises(TypeError, match="unsupported arguments: num_beams"):
        lm.generate(inputs, num_beams=4)
    unpadded = lm.generate(**batch, max_new_tokens=3, eos_token_id=[])  # no eos, no pad id: pads with 0
    assert unpadded.shape == (2, batch["input_ids"].shape[1] + 3)


def test_chat_returns_text_and_streams_the_same(lm):
    msgs = [{"role": "user", "content": "Hello, what is your name?"}]
    text = lm.chat(lm.tokenizer, msgs, max_new_tokens=12, temperature=0)
    streamed = "".join(lm.chat(lm.tokenizer, msgs, stream=True, max_new_tokens=12, temperature=0))
    orion_style = lm.chat(lm.tokenizer, msgs, streaming=False, max_new_tokens=12, temperature=0)
    assert isinstance(text, str) and text == streamed == orion_style
