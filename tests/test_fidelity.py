"""Fidelity to the published files: XVERSE-MoE-Chat's prompt ids, generation_config limits.

Golden ids come from references inside the tests: XVERSE's ``_build_chat_input`` algorithm
re-implemented on the tokenizers library itself, over a tokenizer.json with the published
pipeline (tests/tokfixtures.write_xverse).
"""

import json
import logging

import pytest

from moekit.chat import ChatError, ChatFormat
from moekit.engine import CausalLM
from tests.familyref.checkpoints import make_checkpoint
from tests.tokfixtures import write_xverse

CONTEXT, TRUNCATION = 8192, 6144  # XVERSE-MoE-A4.2B's max_position_embeddings, max_tokenizer_truncation
EOS = 3  # its generation_config eos_token_id


def build_chat_input(hf, messages, max_new_tokens=2048, context=CONTEXT, truncation=TRUNCATION):
    """The algorithm of ``XverseForCausalLM._build_chat_input`` (modeling_xverse.py of the -Chat
    checkpoint), on a ``tokenizers.Tokenizer``: every fragment is encoded on its own, newest round
    first, older rounds dropped once they no longer fit."""
    def encode(text):  # PreTrainedTokenizerFast.encode: add_special_tokens=True, no post-processor here
        return hf.encode(text, add_special_tokens=True).ids

    max_input = min(truncation, max(context // 2, context - max_new_tokens))
    total, round_ = [], []
    system, user, exec_, assist = encode("system: "), encode("user: "), encode("exec: "), encode("assistant: ")
    for i, m in enumerate(messages[::-1]):
        if m["role"] in ("user", "exec"):
            tokens = (user if m["role"] == "user" else exec_) + encode(f"{m['content']}\n")
            if i == 0:
                tokens = tokens[:max_input - len(assist)] + assist
            round_ = tokens + round_
            if i != 0 and len(total) + len(round_) > max_input:
                break
            total = round_ + total
            if i == 0 and len(total) >= max_input:
                break
            round_ = []
        elif m["role"] == "assistant":
            round_ = assist + encode(m["content"]) + [EOS] + round_
        elif m["role"] == "system":
            assert i == len(messages) - 1
            round_ = system + encode(f"{m['content']}\n") + round_
            if len(total) + len(round_) > max_input:
                break
            total = round_ + total
        else:
            raise ValueError(f"message role not supported yet: {m['role']}")
    return total


CONVERSATIONS = {
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, what is your name?"}],
    "multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! My name is moekit."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 2024+1?"}],
    "chinese": [{"role": "user", "content": "北京的景点：故宫、天坛、万里长城等。"},
                {"role": "assistant", "content": "深圳的景点：世界之窗、欢乐谷。"},
                {"role": "user", "content": "你好，请问你叫什么名字？"}],
    "whitespace": [{"role": "system", "content": "  padded system  "},
                   {"role": "user", "content": " leading and trailing \n\n\tindented line\t\n"},
                   {"role": "assistant", "content": "  spaced reply \n\n"}, {"role": "user", "content": "\n"}],
    "single-user": [{"role": "user", "content": "The quick brown fox"}],
    "exec": [{"role": "user", "content": "run it"}, {"role": "assistant", "content": "ok"},
             {"role": "exec", "content": "result: 42"}],
}


@pytest.fixture(scope="module")
def xverse(tmp_path_factory):
    """A tiny XVERSE-MoE checkpoint with the published tokenizer pipeline and generation_config.json."""
    folder = tmp_path_factory.mktemp("xverse-chat")
    write_xverse(folder)
    make_checkpoint("xverse", folder, seed=3, vocab_size=600, dtype="float32", pad_token_id=1, bos_token_id=2,
                    eos_token_id=3, max_position_embeddings=64)
    (folder / "generation_config.json").write_text(json.dumps({  # as published: 20480 > the context
        "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3, "max_new_tokens": 20480, "temperature": 0.5,
        "top_k": 30, "top_p": 0.85, "repetition_penalty": 1.1, "do_sample": False}))
    return folder


@pytest.fixture(scope="module")
def lm(xverse):
    return CausalLM.from_pretrained(xverse, dtype="float32", kernels="reference")


@pytest.fixture(scope="module")
def hf(xverse):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(xverse / "tokenizer.json"))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_xverse_chat_ids_equal_build_chat_input(lm, hf, name):
    messages = CONVERSATIONS[name]
    want = build_chat_input(hf, messages)
    assert lm.chat_format.name == "xverse-moe"
    assert lm.chat_format.encode(lm.tokenizer, messages) == want
    # the one-string encoding loses the "▁" that starts every piece
    one_string = lm.tokenizer.encode(lm.chat_format.render(messages), add_special_tokens=False)
    assert one_string != want


def test_xverse_pieces_start_with_their_own_metaspace(lm):
    ids = lm.chat_format.encode(lm.tokenizer, CONVERSATIONS["system"])
    tokens = [lm.tokenizer.id_to_token(i) for i in ids]
    assert tokens[:3] == ["\u2581system", ":", "\u2581"] and tokens[3] == "\u2581Be"
    assert ids[0] != lm.tokenizer.bos_token_id  # no post-processor: no BOS, as _build_chat_input has it


def test_xverse_system_message_must_come_first(lm):
    with pytest.raises(ChatError, match="system message must be the first"):
        lm.chat_format.encode(lm.tokenizer, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_assistant_token_ids_are_used_verbatim_as_their_piece(lm, hf):
    messages = [dict(m) for m in CONVERSATIONS["multi-turn"]]
    produced = hf.encode("Hello! My name is moekit.").ids
    messages[2]["token_ids"] = produced
    assert lm.chat_format.encode(lm.tokenizer, messages) == build_chat_input(hf, CONVERSATIONS["multi-turn"])
    odd = [7, 8, 9]  # ids no encoding of the text would give: kept as the model produced them
    messages[2]["token_ids"] = odd
    ids = lm.chat_format.encode(lm.tokenizer, messages)
    assist = hf.encode("assistant: ").ids
    at = ids.index(EOS)
    assert ids[at - 3 - len(assist):at] == assist + odd


def test_chat_and_cli_prompts_come_from_chat_format_encode(lm, hf, xverse, monkeypatch, capsys):
    from moekit import cli
    from moekit.engine import text

    seen = []
    real = text.TextGenerator.stream

    def spy(self, prompts, params):
        seen.append(list(prompts[0]))
        return real(self, prompts, params)

    monkeypatch.setattr(text.TextGenerator, "stream", spy)
    msgs = CONVERSATIONS["system"]
    lm.chat(None, msgs, max_new_tokens=2)
    assert seen[-1] == build_chat_input(hf, msgs)
    for extra in ([], ["--stream"]):
        assert cli.main(["generate", "--model", str(xverse), "--prompt", msgs[1]["content"], "--chat", "--system",
                         msgs[0]["content"], "--max-new-tokens", "2", "--kernels", "reference", *extra]) == 0
        assert seen[-1] == build_chat_input(hf, msgs)


# -- generation_config.json limits (max_new_tokens 20480 > the 8192 context) ---------------------------

def test_generation_config_default_is_clamped_to_the_room_left(lm, caplog):
    lm = CausalLM(lm.model, lm.tokenizer, generation_config=lm.generation_config)  # notes once per instance
    ids = lm.tokenizer.encode("Hello")
    room = lm.model.config.max_position_embeddings - len(ids)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        params = lm.sampling(prompt_tokens=len(ids))
        assert params.max_new_tokens == room
        lm.sampling(prompt_tokens=len(ids))
    notes = [r.getMessage() for r in caplog.records if "20480" in r.getMessage()]
    assert len(notes) == 1 and str(room) in notes[0] and "64" in notes[0]  # said once, with the numbers
    assert lm.complete("Hello", stream=False)  # runs without --max-new-tokens
    assert "".join(lm.chat(None, [{"role": "user", "content": "Hi"}], stream=True)) is not None


def test_explicit_max_new_tokens_beyond_the_context_is_an_error(lm):
    with pytest.raises(ValueError, match=r"max_new_tokens=100 exceed the model's context of 64"):
        lm.complete("Hello", max_new_tokens=100)


def test_cli_runs_with_the_published_generation_config(xverse, capsys):
    from moekit import cli

    assert cli.main(["generate", "--model", str(xverse), "--prompt", "Hello", "--kernels", "reference"]) == 0
    err = capsys.readouterr().err
    assert "20480" in err
    assert cli.main(["generate", "--model", str(xverse), "--prompt", "Hello", "--kernels", "reference",
                     "--max-new-tokens", "100"]) == 2
    assert "max_new_tokens=100 exceed the model's context of 64" in capsys.readouterr().err


def test_cli_chat_puts_the_produced_reply_ids_in_the_next_prompt(xverse, monkeypatch, capsys):
    from moekit import cli
    from moekit.engine import text

    prompts, replies = [], []
    real = text.TextGenerator.stream

    def spy(self, prompts_, params):
        prompts.append(list(prompts_[0]))
        replies.append([])
        for ev in real(self, prompts_, params):
            replies[-1].append(ev.token_id)
            yield ev

    monkeypatch.setattr(text.TextGenerator, "stream", spy)
    lines = iter(["Hello", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert cli.main(["chat", "--model", str(xverse), "--max-new-tokens", "6", "--temperature", "0.9", "--seed", "1",
                     "--kernels", "reference", "--ignore-eos"]) == 0
    first, reply = prompts[0], replies[0]
    assert len(reply) == 6  # a random model's ids, whatever encode(decode(ids)) would give
    assert prompts[1][:len(first) + len(reply) + 1] == first + reply + [EOS]


def test_mixtral_without_a_template_or_chatml_tokens_is_warned_about(tmp_path, caplog):
    from moekit.tokenizer import Tokenizer
    from tests.tokfixtures import write_sentencepiece

    write_sentencepiece(tmp_path / "plain")
    write_sentencepiece(tmp_path / "chatml", extra_special=("<|im_start|>", "<|im_end|>"))
    with caplog.at_level(logging.WARNING, logger="moekit"):
        assert ChatFormat.for_model(Tokenizer.from_pretrained(tmp_path / "chatml"), "mixtral").name == "chatml"
        assert not caplog.records
        assert ChatFormat.for_model(Tokenizer.from_pretrained(tmp_path / "plain"), "mixtral").name == "chatml"
        assert ChatFormat.for_model(Tokenizer.from_pretrained(tmp_path / "plain"), "mixtral", "vicuna")
    (note,) = [r.getMessage() for r in caplog.records]
    assert "<|im_start|> is not a token" in note and "--chat-format" in note and "chat_template" in note


def test_system_refused_by_the_template_is_named_as_the_system_flag(tmp_path, capsys):
    from moekit import cli
    from tests.tokfixtures import write_sentencepiece

    make_checkpoint("llama_moe", tmp_path, seed=4, vocab_size=400)
    write_sentencepiece(tmp_path, chat_template=(
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"))
    base = ["--model", str(tmp_path), "--system", "Be brief.", "--max-new-tokens", "2", "--kernels", "reference"]
    assert cli.main(["generate", "--prompt", "Hi", "--chat", *base]) == 2
    err = capsys.readouterr().err
    assert "error: --system: the chat format (tokenizer_config.json) does not accept a system message" in err
    assert "System role not supported" in err
    assert cli.main(["chat", *base]) == 2  # refused before the first turn is read
    assert "--system" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["multi-turn", "chinese", "whitespace", "exec"])
def test_long_conversations_drop_rounds_as_build_chat_input_does(lm, hf, name):
    messages = CONVERSATIONS[name]
    full = len(build_chat_input(hf, messages))
    last = len(build_chat_input(hf, messages[-1:]))
    for budget in range(last, full + 1):  # context 10000 and truncation = budget: max_input is the budget
        want = build_chat_input(hf, messages, context=10_000, truncation=budget)
        assert lm.chat_format.encode(lm.tokenizer, messages, max_tokens=budget) == want, budget
    with pytest.raises(ChatError, match=f"the last message needs {last} prompt tokens, more than the {last - 1}"):
        lm.chat_format.encode(lm.tokenizer, messages, max_tokens=last - 1)


def test_chat_uses_the_published_generation_config_budget(lm, hf, monkeypatch):
    from moekit.engine import text

    seen = []
    real = text.TextGenerator.stream
    monkeypatch.setattr(text.TextGenerator, "stream", lambda self, p, s: seen.append(list(p[0])) or real(self, p, s))
    messages = CONVERSATIONS["multi-turn"] * 2
    messages = messages[:1] + [m for m in messages[1:] if m["role"] != "system"]
    assert lm.prompt_budget() == 32  # max(64 // 2, 64 - 20480), as _build_chat_input computes it
    lm.chat(None, messages)
    want = build_chat_input(hf, messages, max_new_tokens=20480, context=64)
    assert seen[-1] == want and len(want) < len(build_chat_input(hf, messages, context=10_000))
    lm.chat(None, messages, max_new_tokens=8)  # an explicit max_new_tokens leaves 64 - 8 for the prompt
    assert seen[-1] == build_chat_input(hf, messages, max_new_tokens=8, context=64)
