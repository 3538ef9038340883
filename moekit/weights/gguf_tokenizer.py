"""The tokenizer and chat template of a GGUF file as a :class:`moekit.Tokenizer`.

``tokenizer.ggml.model``:

- ``llama`` (SentencePiece): tokens, scores and token types become a SentencePiece BPE
  ModelProto (written on the wire here, so no protobuf dependency). llama.cpp merges the
  highest-scoring pair first, as SentencePiece's BPE does; the normaliser is the identity,
  with the dummy prefix of ``tokenizer.ggml.add_space_prefix`` (default true).
- ``gpt2`` (byte-level BPE): tokens and merges become a ``tokenizers`` BPE whose pre-tokenizer
  is the regex llama.cpp uses for ``tokenizer.ggml.pre`` (src/llama-vocab.cpp) followed by the
  byte-level mapping. An unknown ``pre`` value is refused, as llama.cpp refuses it.

Token types (GGUF = SentencePiece numbering): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control and unknown tokens are special (skipped when decoding); user-defined
ones are matched in the text but decoded. BOS/EOS/padding ids, ``add_bos_token`` /
``add_eos_token`` and ``tokenizer.chat_template`` come from the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from moekit.tokenizer import Tokenizer, TokenizerError, _to_varint
from moekit.weights.gguf_file import Metadata, open_gguf

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = [  # letters of many scripts, punctuation incl. full-width, CJK (escaped: exact code points)
    "[\r\n]",
    ('\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377'
     '\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-'
     '\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-'
     '\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d'
     '\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-'
     '\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134'
     '\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-'
     '\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-'
     '\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2'
     '\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+'),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
]
_DEEPSEEK_V3 = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^""" "\r\n" r"""\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                r"| ?[\p{P}\p{S}]+" "[\r\n]*" r"|\s*" "[\r\n]+" r"|\s+(?!\S)|\s+")
_BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges, add_bos default), from llama.cpp's llama-vocab.cpp
PRE_TOKENIZERS = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], False, False),
    "gpt-2": ([_GPT2], False, False),
    "llama-bpe": ([_LLAMA3], True, True),
    "qwen2": ([_QWEN2], False, False),
    "deepseek-llm": (_DEEPSEEK_LLM, False, False),
    "deepseek-coder": (["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"], False, False),
    "deepseek-v3": ([r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK_V3], False, False),
    "bailingmoe": ([_BAILINGMOE], False, False),
}
ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "phi-2": "gpt-2", "deepseek-r1-qwen": "qwen2",
           "megrez": "qwen2", "llada-moe": "bailingmoe"}


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    """The tokenizer stored in a GGUF file (see the module doc); errors name the file and key."""
    path = Path(path)
    meta = Metadata(open_gguf(path), path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{path}: holds no tokenizer (metadata keys 'tokenizer.ggml.model' and "
                             f"'tokenizer.ggml.tokens')")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: metadata key 'tokenizer.ggml.token_type' has {len(types)} entries for "
                             f"{len(tokens)} tokens")
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    for k, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise TokenizerError(f"{path}: metadata key 'tokenizer.ggml.{k}_token_id'={i} is not a token id "
                                 f"(the vocabulary has {len(tokens)})")
    if kind == "llama":
        backend, add_bos = _sentencepiece(meta, tokens, types, ids), True
        kind = "sentencepiece"
    elif kind == "gpt2":
        backend, add_bos = _byte_level_bpe(meta, tokens, types)
        kind = "tokenizers"
    else:
        raise TokenizerError(f"{path}: metadata key 'tokenizer.ggml.model'={kind!r} is not supported (llama, gpt2)")
    names = {"bos": "bos_token", "eos": "eos_token", "padding": "pad_token", "unknown": "unk_token"}
    config = {names[k]: tokens[i] for k, i in ids.items() if i is not None}
    config.update(add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)),
                  add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                  chat_template=meta.get("tokenizer.chat_template"),
                  added_tokens_decoder={str(i): {"content": tokens[i], "special": t != USER_DEFINED}
                                        for i, t in enumerate(types) if t in (UNKNOWN, CONTROL, USER_DEFINED)})
    model_config = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    return Tokenizer(backend, kind, config, model_config)


# ----------------------------------------------------------------------------- SentencePiece
def _field(number: int, wire: int) -> bytes:
    return _to_varint(number << 3 | wire)


def _int(number: int, value: int) -> bytes:
    return _field(number, 0) + _to_varint(value & (1 << 64) - 1)  # negative int32: ten-byte two's complement


def _bytes(number: int, value: bytes) -> bytes:
    return _field(number, 2) + _to_varint(len(value)) + value


def sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int], ids: dict,
                        add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False) -> bytes:
    """A SentencePiece BPE ModelProto (fields of sentencepiece_model.proto: pieces 1 {piece 1, score 2,
    type 3}, trainer_spec 2, normalizer_spec 3) with the identity normaliser."""
    out = bytearray()
    for piece, score, kind in zip(tokens, scores, types):
        out += _bytes(1, _bytes(1, piece.encode("utf-8")) + _field(2, 5) + struct.pack("<f", score) + _int(3, kind))
    trainer = _int(3, 2) + _int(4, len(tokens)) + _int(35, int(BYTE in types))  # model_type BPE, byte_fallback
    for number, key in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        trainer += _int(number, -1 if ids[key] is None else ids[key])
        if ids[key] is not None:  # unk_piece 45, bos_piece 46, eos_piece 47, pad_piece 48
            trainer += _bytes(number + 5, tokens[ids[key]].encode("utf-8"))
    out += _bytes(2, trainer)
    out += _bytes(3, _bytes(1, b"identity") + _int(3, int(add_dummy_prefix)) + _int(4, int(remove_extra_whitespaces))
                  + _int(5, 1))
    return bytes(out)


def _sentencepiece(meta: Metadata, tokens: list[str], types: list[int], ids: dict):
    import sentencepiece as spm

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise TokenizerError(f"{meta.path}: metadata key 'tokenizer.ggml.scores' is missing or does not have one "
                             f"score per token ({len(tokens)})")
    if ids["unknown"] is None:  # llama.cpp's SentencePiece default
        ids = {**ids, "unknown": next((i for i, t in enumerate(types) if t == UNKNOWN), 0)}
    types = [UNKNOWN if i == ids["unknown"] else CONTROL if t == UNKNOWN else t for i, t in enumerate(types)]
    proto = sentencepiece_proto(tokens, scores, types, ids,
                                bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError, ValueError) as e:  # duplicate pieces, no unknown piece, ...
        raise TokenizerError(f"{meta.path}: its SentencePiece vocabulary is not usable ({e})") from None


# ----------------------------------------------------------------------------- byte-level BPE
def _byte_level_bpe(meta: Metadata, tokens: list[str], types: list[int]):
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if ALIASES.get(pre, pre) not in PRE_TOKENIZERS:
        raise TokenizerError(f"{meta.path}: metadata key 'tokenizer.ggml.pre'={pre!r} is not supported "
                             f"({', '.join(sorted([*PRE_TOKENIZERS, *ALIASES]))})")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError(f"{meta.path}: metadata key 'tokenizer.ggml.merges' is missing (a gpt2 vocabulary "
                             f"needs its merges)")
    try:
        return bpe_tokenizer(tokens, types, merges, pre), PRE_TOKENIZERS[ALIASES.get(pre, pre)][2]
    except Exception as e:  # tokenizers raises plain Exceptions for a vocabulary it cannot take
        raise TokenizerError(f"{meta.path}: its BPE vocabulary is not usable ({e})") from None


def bpe_tokenizer(tokens: list[str], types: list[int], merges: list[str], pre: str):
    """A ``tokenizers`` byte-level BPE: llama.cpp's pre-tokenizer regexes for ``pre`` in turn, then the
    byte-to-unicode mapping; control / unknown tokens special, user-defined ones plain added tokens."""
    from tokenizers import Tokenizer as HFTokenizer

    regexes, ignore_merges, _ = PRE_TOKENIZERS[ALIASES.get(pre, pre)]
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": t != USER_DEFINED}
                         for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    return HFTokenizer.from_str(json.dumps(spec))
