"""Tokenizers from checkpoint files, incremental detokenisation, chat formats."""

import pytest

from moekit.chat import ChatError, ChatFormat, TEMPLATES
from moekit.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError
from tests.tokfixtures import write_hf_bpe, write_sentencepiece

TEXTS = ["北京的景点：故宫、天坛、万里长城等。\n深圳的景点：", "Hello, what is your name? 龍 é ✓ 🙂",
         "The quick brown fox. 你好，请问你叫什么名字？"]


@pytest.fixture(scope="module", params=["sentencepiece", "bpe-byte-fallback", "byte-level"])
def tok(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "sentencepiece":
        write_sentencepiece(folder, extra_special=("<|im_start|>", "<|im_end|>"))
    else:
        write_hf_bpe(folder, byte_level=request.param == "byte-level", extra_special=("<|im_start|>",))
    return Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_including_chinese_and_unseen_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_never_emits_a_broken_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.step(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    if tok.kind != "sentencepiece" or any(ord(c) > 0x3000 for c in text):
        assert any(p == "" for p in pieces)  # some tokens were held back mid-character


def test_byte_fallback_pieces_are_really_used(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # an emoji never seen in training: several byte pieces


def test_special_tokens_and_bos(tmp_path):
    write_sentencepiece(tmp_path, extra_special=("<|im_start|>",))
    t = Tokenizer.from_pretrained(tmp_path)
    ids = t.encode("<|im_start|>user hi</s>")
    assert ids[0] == t.bos_token_id == 1 and ids[1] == t.token_to_id("<|im_start|>") and ids[-1] == 2
    assert t.decode(ids) == "user hi"
    assert "<|im_start|>" in t.decode(ids, skip_special_tokens=False)
    batch = t(["a", "longer text"], return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.attention_mask[0, 0] == 0


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
GOLDEN = {  # sources: docs/generation.md
    "xverse-moe": "system: Be brief.\nuser: Hi\nassistant: Hello!<|endoftext|>user: 2+2?\nassistant: ",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "orion": "<s>Human: Be brief.\n\nHi\n\nAssistant: </s>Hello!</s>Human: 2+2?\n\nAssistant: </s>",
    "vicuna": "<s>Be brief. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:",
    "deepseek": "<s>Be brief.\n\nUser: Hi\n\nAssistant: Hello!</s>User: 2+2?\n\nAssistant:",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_chat_format_golden_strings(name):
    eos = {"xverse-moe": "<|endoftext|>", "chatml": "<|im_end|>"}.get(name, "</s>")
    assert ChatFormat(TEMPLATES[name], "<s>", eos, name).render(MSGS) == GOLDEN[name]


def test_vicuna_default_system_message_and_single_turn():
    out = ChatFormat(TEMPLATES["vicuna"], "<s>", "</s>").render([{"role": "user", "content": "Hi"}])
    assert out == ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:")


def test_tokenizer_chat_template_takes_precedence(tmp_path):
    write_hf_bpe(tmp_path, chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    t = Tokenizer.from_pretrained(tmp_path)
    fmt = ChatFormat.for_model(t, family="xverse")
    assert fmt.name == "tokenizer_config.json" and fmt.render(MSGS[1:3]) == "[user]Hi[assistant]Hello!"
    assert ChatFormat.for_model(t, family="xverse", name="chatml").name == "chatml"


def test_chat_encoding_maps_special_strings_to_ids(tmp_path):
    write_hf_bpe(tmp_path)
    t = Tokenizer.from_pretrained(tmp_path)
    ids = ChatFormat.for_model(t, family="xverse").encode(t, MSGS)
    assert ids.count(t.eos_token_id) == 1 and ids[0] != t.bos_token_id  # XVERSE adds no BOS


@pytest.mark.parametrize("messages, message", [
    ([], "a non-empty list"),
    ([{"role": "user"}], r"messages\[0\]: needs 'role' and 'content'"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role='robot'"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
])
def test_bad_messages_are_named(messages, message):
    with pytest.raises(ChatError, match=message):
        ChatFormat(TEMPLATES["chatml"]).render(messages)


def test_family_without_format_is_explained(tmp_path):
    write_hf_bpe(tmp_path)
    with pytest.raises(ChatError, match="no chat format for this model"):
        ChatFormat.for_model(Tokenizer.from_pretrained(tmp_path), family="llama")
