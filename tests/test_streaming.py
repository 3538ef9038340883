"""Streamed text equals ``decode(reply_ids)``, and a reply put back into the history re-encodes to its ids.

A scripted engine replays fixed token ids, so the checks hold for any model; the engine's
own generation is tested in tests/test_engine.py and tests/test_text.py.
"""

import pytest

from moekit.chat import TEMPLATES, ChatFormat
from moekit.engine import SamplingParams, TextGenerator
from moekit.engine.engine import TokenEvent
from moekit.tokenizer import IncrementalDecoder, Tokenizer
from tests.tokfixtures import write_hf_bpe, write_sentencepiece, write_xverse

REPLIES = ["Hello! My name is moekit.", "北京的景点：故宫、天坛、万里长城等。", "The quick brown fox. 你好 🙂 é"]


@pytest.fixture(scope="module", params=["sentencepiece", "metaspace-json", "xverse", "byte-level"])
def tok(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "sentencepiece":
        write_sentencepiece(folder)
    elif request.param == "xverse":
        write_xverse(folder)
    else:
        write_hf_bpe(folder, byte_level=request.param == "byte-level", extra_special=("<|im_start|>", "<|im_end|>"))
    return Tokenizer.from_pretrained(folder)


class Scripted:
    """Stands in for Engine: every request is answered with the same token ids."""

    def __init__(self, reply: list[int]):
        self.reply = reply

    def _check(self, prompts, params):
        return prompts, [params] * len(prompts) if isinstance(params, SamplingParams) else params

    def stream(self, prompts, params):
        reply = self.reply

        class Steps:
            def __iter__(self):
                for k, t in enumerate(reply):
                    yield [TokenEvent(0, t, "stop" if k == len(reply) - 1 else None)]

            def cancel(self, index):
                pass

            def close(self):
                pass

        return Steps()


def streamed(tok, prompt: list[int], reply: list[int]) -> list[str]:
    gen = TextGenerator(Scripted(reply), tok)
    return [ev.text for ev in gen.stream([prompt], SamplingParams())]


@pytest.mark.parametrize("text", REPLIES)
def test_streamed_reply_equals_decode_of_its_ids(tok, text):
    prompt = tok.encode("USER: Hi ASSISTANT:")
    reply = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    pieces = streamed(tok, prompt, reply)
    assert "".join(pieces) == tok.decode(reply)
    assert not pieces[0].startswith(" ") or tok.kind == "tokenizers" and tok.decode(reply).startswith(" ")
    assert TextGenerator(Scripted(reply), tok).generate([prompt], SamplingParams())[0].text == tok.decode(reply)


def byte_id(tok, b: int) -> int | None:
    return tok.token_to_id(f"<0x{b:02X}>")


def test_invalid_byte_runs_stream_as_decode_has_them(tok):
    if byte_id(tok, 0xE4) is None:
        pytest.skip("byte-level BPE has no <0xNN> pieces")
    word = tok.encode("The", add_special_tokens=False)
    zhong = [byte_id(tok, b) for b in (0xE4, 0xB8, 0xAD)]  # 中 as byte pieces
    cases = [[byte_id(tok, 0xE4)] + word, zhong + word, zhong + [byte_id(tok, 0xE4), byte_id(tok, 0x61)] + word,
             word + [byte_id(tok, 0xE4)], word + zhong[:2], zhong + [byte_id(tok, 0xE4)] + zhong + word]
    for ids in cases:
        dec = IncrementalDecoder(tok)
        pieces = [dec.step(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids), [tok.id_to_token(i) for i in ids]
        assert "".join(streamed(tok, [word[0]], ids)) == tok.decode(ids)


def test_skipped_special_tokens_mid_reply_do_not_change_spacing(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    ids = ids[:1] + [tok.eos_token_id] + ids[1:]
    dec = IncrementalDecoder(tok)
    assert "".join([dec.step(i) for i in ids] + [dec.flush()]) == tok.decode(ids)


@pytest.mark.parametrize("name", ["xverse-moe", "vicuna", "chatml"])
def test_reply_text_in_the_history_re_encodes_to_the_produced_ids(tok, name):
    """The reply ids are those the conversation's own encoding gives (what a model trained on the format
    produces); streamed, shown and put back into the history, they encode to the same ids again."""
    if name == "chatml" and tok.token_to_id("<|im_end|>") is None:
        pytest.skip("this tokenizer has no ChatML tokens")
    if name != "chatml" and tok.kind == "tokenizers" and "Metaspace" not in repr(tok.backend.pre_tokenizer):
        pytest.skip(f"{name} is a SentencePiece / Metaspace family's format: byte-level replies keep their space")
    eos = "<|im_end|>" if name == "chatml" else tok.eos_token
    fmt = ChatFormat(TEMPLATES[name], tok.bos_token, eos, name)
    first = [{"role": "user", "content": "Hi"}]
    prompt = fmt.encode(tok, first)
    for text in REPLIES:
        full = fmt.encode(tok, first + [{"role": "assistant", "content": text}, {"role": "user", "content": "Again"}])
        assert full[:len(prompt)] == prompt
        end = full.index(tok.token_to_id(eos), len(prompt))
        reply = full[len(prompt):end]
        shown = "".join(streamed(tok, prompt, reply + [tok.token_to_id(eos)]))
        assert shown == tok.decode(reply)
        history = first + [{"role": "assistant", "content": shown}, {"role": "user", "content": "Again"}]
        assert fmt.encode(tok, history) == full, text
