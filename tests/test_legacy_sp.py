"""``"legacy": false`` on a real SentencePiece ``tokenizer.model`` (LLaMA-2 family), through Vicuna prompts.

The file is Mistral-7B's ``tokenizer.model`` as the mistral-common package ships it
(``mistral_common/data/tokenizer.model.v1``): a SentencePiece BPE of LLaMA-2's kind (32000
pieces, byte fallback, add_dummy_prefix, identity normaliser). No PyPI package was found that
ships LLaMA-2's own 499,723-byte file.

The reference is transformers 4.x's slow ``LlamaTokenizer.tokenize`` written out on sentencepiece
(below). The installed transformers 5.x is not used as the reference: it converts the model to a
tokenizers pipeline (Metaspace prepend_scheme "first", split off) that disagrees with the 4.x slow
tokenizer for segments starting with spaces (e.g. ``" Hey</s>  x"``); on the Vicuna prompts both agree.
"""

import re
import shutil
from pathlib import Path

import pytest

from moekit.chat import ChatFormat
from moekit.tokenizer import Tokenizer

mistral_common = pytest.importorskip("mistral_common", reason="the real tokenizer.model comes from the mistral-common "
                                     "package (pip install -e '.[test]')")
pytest.importorskip("google.protobuf", reason="the reference edits the model proto with protobuf (the test extra)")
MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
SPECIALS = ("<unk>", "<s>", "</s>")


def reference_ids(text: str, legacy: bool) -> list[int]:
    """transformers 4.x slow LlamaTokenizer: ``encode(text, add_special_tokens=False)``.

    legacy=False: the model's ``add_dummy_prefix`` is turned off; ``▁`` is prepended to the whole
    text (add_prefix_space); special tokens split the text; a segment starting with ``▁``/space is
    encoded as ``unk_token + segment`` with the unk pieces removed; a leading lone ``▁`` before a
    special token is dropped. legacy=True: each segment is encoded by the unmodified model.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(MODEL.read_bytes())
    if not legacy:
        proto.normalizer_spec.add_dummy_prefix = False
    if not legacy and text:  # tokenize() leaves the empty text alone
        text = "\u2581" + text.replace("\u2581", " ")
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    unk_len = len(sp.encode("<unk>", out_type=str))
    tokens = []
    for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if part in SPECIALS:
            tokens.append(part)
        elif part and (legacy or not part.startswith(("\u2581", " "))):
            tokens += sp.encode(part, out_type=str)
        elif part:
            tokens += sp.encode("<unk>" + part, out_type=str)[unk_len:]
    if not legacy and len(tokens) > 1 and tokens[0] == "\u2581" and tokens[1] in SPECIALS:
        tokens = tokens[1:]
    return [sp.piece_to_id(t) for t in tokens]


def folder_with(tmp_path: Path, legacy: bool | None) -> Path:
    import json

    folder = tmp_path / f"legacy-{legacy}"
    folder.mkdir()
    shutil.copy(MODEL, folder / "tokenizer.model")
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False}
    if legacy is not None:
        cfg["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


VICUNA = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 2024+1?"}],
    [{"role": "user", "content": "北京的景点"}, {"role": "assistant", "content": "故宫、天坛。"},
     {"role": "user", "content": "你好"}],
    [{"role": "user", "content": " spaced "}, {"role": "assistant", "content": "\nnew line\t"},
     {"role": "user", "content": "x"}],
]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("turns", range(len(VICUNA)))
def test_vicuna_prompts_match_the_slow_llama_tokenizer(tmp_path, legacy, turns):
    tok = Tokenizer.from_pretrained(folder_with(tmp_path, legacy))
    fmt = ChatFormat.for_model(tok, family="llama_moe")
    assert fmt.name == "vicuna"
    messages = VICUNA[turns]
    assert fmt.encode(tok, messages) == reference_ids(fmt.render(messages), legacy)


def test_legacy_false_drops_the_dummy_prefix_after_special_tokens(tmp_path):
    new, old = (Tokenizer.from_pretrained(folder_with(tmp_path, legacy)) for legacy in (False, None))
    text = "<s>A chat. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:"
    assert [new.id_to_token(i) for i in new.encode(text, add_special_tokens=False)][14:16] == ["</s>", "USER"]
    assert [old.id_to_token(i) for i in old.encode(text, add_special_tokens=False)][14:16] == ["</s>", "\u2581US"]
    assert old.encode(text) == reference_ids(text, legacy=True)  # no flag means legacy, as in transformers
    plain = text.replace("<s>", "").replace("</s>", "")
    assert new.decode(new.encode(text)) == plain  # round trips; the legacy ids decode with a space after </s>
    assert old.decode(old.encode(text)) == plain.replace("!USER", "! USER")
    for odd in (" Hey</s> there", "  two</s>  x", "\u2581odd</s>\nnl", "plain", ""):
        assert new.encode(odd, add_special_tokens=False) == reference_ids(odd, legacy=False), odd


def test_transformers_5_agrees_on_vicuna_prompts(tmp_path):
    transformers = pytest.importorskip("transformers")
    for legacy in (False, True):
        folder = folder_with(tmp_path, legacy)
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        fmt = ChatFormat.for_model(Tokenizer.from_pretrained(folder), family="llama_moe")
        for messages in VICUNA[:3]:
            text = fmt.render(messages)
            assert theirs.encode(text, add_special_tokens=False) == reference_ids(text, legacy)
