"""Tokenizer metadata for a GGUF file, from a checkpoint folder's tokenizer files.

llama.cpp has two tokenizers that moekit's families need (``tokenizer.ggml.model``):

- ``llama`` (SentencePiece): pieces, scores and token types. From ``tokenizer.model`` as
  SentencePiece stores it; from a ``tokenizer.json`` BPE with byte fallback (Metaspace, XVERSE's
  and Mistral's kind) with each merged piece scored by its merge rank (earlier merges score
  higher, the order llama.cpp's SPM tokenizer merges in); from a ``tokenizer.json`` Unigram with
  its own scores.
- ``gpt2`` (byte-level BPE): pieces, merges and a ``tokenizer.ggml.pre`` naming the
  pre-tokenizer regex, recognised from the ``tokenizer.json`` pre-tokenizer (an unknown name
  would make llama.cpp refuse the file; one moekit does not recognise is written as ``default``
  with a note).

Token ids beyond the tokenizer's, up to the model's vocab_size, become unused ``[PADn]`` pieces
as llama.cpp's converter writes them. Special ids, add_bos/add_eos and the chat template come
from moekit's own :class:`~moekit.tokenizer.Tokenizer`, so llama.cpp sees what moekit uses.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from moekit.errors import MoekitError
from moekit.tokenizer import Tokenizer, _varint

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Split regexes of tokenizer.json pre-tokenizers -> llama.cpp's name (src/llama-vocab.cpp)
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_DEEPSEEK_LLM = (
    "[\r\n]",
    ("\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌ"
     "ῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"),  # \u escapes: characters NFC would change
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
)
KNOWN_PRE = {(): "gpt-2", (_QWEN2,): "qwen2", (_LLAMA3,): "llama-bpe", _DEEPSEEK_LLM: "deepseek-llm",
             _DEEPSEEK_LLM[:5]: "deepseek-llm"}  # DeepSeek's tokenizer.json splits digits with Digits, not a regex


class VocabError(MoekitError):
    """The tokenizer files cannot be written as GGUF metadata; the message names the file."""


@dataclass
class Vocab:
    """What ``tokenizer.ggml.*`` holds."""

    model: str  # llama | gpt2 | none
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    scores: list[float] | None = None  # llama only
    merges: list[str] | None = None  # gpt2 only
    pre: str | None = None  # gpt2 only
    add_space_prefix: bool | None = None  # llama: SentencePiece's dummy prefix
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / pad / unk -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None

    def write(self, w) -> None:
        """Add the metadata to a ``gguf.GGUFWriter``."""
        w.add_tokenizer_model(self.model)
        if self.model == "none":
            return
        w.add_tokenizer_pre(self.pre or "default")
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id,
                  "unk": w.add_unk_token_id}
        for name, i in self.special.items():
            adders[name](i)
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def read_vocab(folder: str | Path | None, vocab_size: int) -> Vocab:
    """The GGUF tokenizer metadata of ``folder`` for a model of ``vocab_size`` ids.

    A folder without tokenizer files gives ``none`` (llama.cpp then runs on token ids alone).
    Raises :class:`VocabError` naming the file for a tokenizer llama.cpp has no equivalent of,
    or one with more pieces than the model has ids.
    """
    folder = Path(folder) if folder is not None else None
    if folder is None or not ((folder / "tokenizer.model").exists() or (folder / "tokenizer.json").exists()):
        log.warning("no tokenizer.json or tokenizer.model%s: the GGUF file has no vocabulary (token ids only)",
                    f" in {folder}" if folder else "")
        return Vocab("none")
    if (folder / "tokenizer.model").exists():  # SentencePiece's own scores, as llama.cpp's converter prefers
        vocab = _sentencepiece(folder / "tokenizer.model")
    else:
        vocab = _tokenizer_json(folder / "tokenizer.json")
    tok = Tokenizer.from_pretrained(folder)
    _add_tokens(vocab, folder, tok)
    if len(vocab.tokens) > vocab_size:
        source = folder / ("tokenizer.model" if (folder / "tokenizer.model").exists() else "tokenizer.json")
        raise VocabError(f"{source}: {len(vocab.tokens)} tokens, more than the model's vocab_size={vocab_size}")
    pad = vocab_size - len(vocab.tokens)  # ids the embedding has and the tokenizer never produces
    vocab.tokens += [f"[PAD{i}]" for i in range(len(vocab.tokens), vocab_size)]
    vocab.types += [UNUSED] * pad
    if vocab.scores is not None:
        vocab.scores += [-10000.0] * pad
    _specials(vocab, tok)
    return vocab


def _sentencepiece(path: Path) -> Vocab:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise VocabError(f"{path}: cannot be read ({e})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                else BYTE if sp.is_byte(i) else NORMAL)
        types.append(kind)
    prefix, merge_spaces = _normalizer_flags(sp.serialized_model_proto())
    if merge_spaces:
        log.warning("%s: SentencePiece merges repeated spaces (remove_extra_whitespaces) and llama.cpp's SPM "
                    "tokenizer does not, so texts with runs of spaces tokenise differently there", path)
    return Vocab("llama", tokens, types, scores=scores, pre="default", add_space_prefix=prefix)


def _normalizer_flags(proto: bytes) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces) of a SentencePiece ModelProto's normalizer_spec (field 3),
    read on the wire; both default to true."""
    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            wire = key & 7
            if wire == 0:
                value, i = _varint(buf, i)
            elif wire == 2:
                n, i = _varint(buf, i)
                value, i = buf[i:i + n], i + n
            elif wire in (1, 5):
                value, i = None, i + (8 if wire == 1 else 4)
            else:
                return
            yield key >> 3, value

    flags = {3: True, 4: True}
    for num, value in fields(proto):
        if num == 3 and isinstance(value, bytes):
            flags.update({k: bool(v) for k, v in fields(value) if k in flags and isinstance(v, int)})
    return flags[3], flags[4]


def _tokenizer_json(path: Path) -> Vocab:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VocabError(f"{path}: cannot be read ({e})") from None
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "Unigram":  # SentencePiece's unigram, as tokenizers stores it: [piece, score] pairs
        tokens = [p for p, _ in model["vocab"]]
        unk = model.get("unk_id")
        types = [UNKNOWN if i == unk else BYTE if BYTE_PIECE.fullmatch(t) else NORMAL for i, t in enumerate(tokens)]
        return Vocab("llama", tokens, types, scores=[float(s) for _, s in model["vocab"]], pre="default",
                     add_space_prefix=_metaspace_prefix(spec))
    if kind != "BPE":
        raise VocabError(f"{path}: a {kind} tokenizer has no llama.cpp equivalent (BPE and Unigram do)")
    vocab = model.get("vocab") or {}
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        tokens[i] = piece
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if _has(spec.get("pre_tokenizer"), "ByteLevel") or _has(spec.get("decoder"), "ByteLevel"):
        return Vocab("gpt2", tokens, [NORMAL] * len(tokens), merges=merges, pre=_pre(spec, path))
    if not model.get("byte_fallback") and not _has(spec.get("pre_tokenizer"), "Metaspace"):
        raise VocabError(f"{path}: a BPE tokenizer that is neither byte-level nor SentencePiece-style (Metaspace, "
                         "byte fallback) has no llama.cpp equivalent")
    # SentencePiece-style BPE: llama.cpp's SPM tokenizer merges the best-scored adjacent pair, so a
    # piece scores minus the rank of the merge that makes it; pieces no merge makes score 0
    scores = [0.0] * len(tokens)
    for rank, m in enumerate(merges):
        i = vocab.get(m.replace(" ", "", 1) if " " in m else m)
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    unk = model.get("unk_token")
    types = [UNKNOWN if t == unk else BYTE if BYTE_PIECE.fullmatch(t) else NORMAL for t in tokens]
    return Vocab("llama", tokens, types, scores=scores, pre="default", add_space_prefix=_metaspace_prefix(spec))


def _has(node, kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) includes one of type ``kind``."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has(n, kind) for n in node.get("pretokenizers") or node.get("decoders") or [])


def _nodes(node) -> list[dict]:
    if not isinstance(node, dict):
        return []
    return [node] if node.get("type") != "Sequence" else [n for c in node.get("pretokenizers", []) for n in _nodes(c)]


def _metaspace_prefix(spec: dict) -> bool | None:
    for n in _nodes(spec.get("pre_tokenizer")):
        if n.get("type") == "Metaspace":
            return n.get("prepend_scheme", "always" if n.get("add_prefix_space", True) else "never") != "never"
    return None


def _pre(spec: dict, path: Path) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer regexes."""
    nodes = _nodes(spec.get("pre_tokenizer"))
    splits = tuple(n.get("pattern", {}).get("Regex") for n in nodes if n.get("type") == "Split")
    byte_level = [n for n in nodes if n.get("type") == "ByteLevel"]
    if not splits and not (byte_level and byte_level[0].get("use_regex", True)):
        splits = (None,)  # ByteLevel without its GPT-2 regex and no Split: nothing known
    name = KNOWN_PRE.get(splits)
    if name is None:
        log.warning("%s: pre-tokenizer not recognised; written as 'default' (llama.cpp then splits text with "
                    "its default rules, so its token ids for a text may differ from moekit's)", path)
        return "default"
    return name


def _add_tokens(vocab: Vocab, folder: Path, tok: Tokenizer) -> None:
    """Added tokens (tokenizer.json's, tokenizer_config.json's added_tokens_decoder) as control or
    user-defined pieces, at their ids."""
    added: dict[int, tuple[str, bool]] = {}
    if not (folder / "tokenizer.model").exists():  # the vocabulary came from tokenizer.json
        try:
            spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            spec = {}
        added.update({int(t["id"]): (t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or []})
    for text, i in tok.added.items():
        added.setdefault(i, (text, i in tok.special_ids))
    for i, (text, special) in sorted(added.items()):
        while len(vocab.tokens) <= i:
            vocab.tokens.append(f"[PAD{len(vocab.tokens)}]")
            vocab.types.append(UNUSED)
            if vocab.scores is not None:
                vocab.scores.append(-10000.0)
        if vocab.types[i] in (UNKNOWN, BYTE):
            continue
        vocab.tokens[i] = text
        vocab.types[i] = CONTROL if special else USER_DEFINED
        if vocab.scores is not None and vocab.types[i] == USER_DEFINED:
            vocab.scores[i] = -1000.0


def _specials(vocab: Vocab, tok: Tokenizer) -> None:
    """Special ids, add_bos/add_eos and the chat template as moekit's tokenizer uses them."""
    unk = tok.token_to_id(tok.config.get("unk_token") if isinstance(tok.config.get("unk_token"), str)
                          else (tok.config.get("unk_token") or {}).get("content"))
    if unk is None and UNKNOWN in vocab.types:
        unk = vocab.types.index(UNKNOWN)
    for name, i in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id), ("unk", unk)):
        if i is not None:
            vocab.special[name] = int(i)
    probe = "a"  # does encoding add BOS / EOS (a flag, or tokenizer.json's post-processor)?
    plain, full = tok.encode(probe, add_special_tokens=False), tok.encode(probe)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    vocab.add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    vocab.add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    vocab.chat_template = tok.chat_template
