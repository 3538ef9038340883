"""Tokenizers from a checkpoint folder: Hugging Face ``tokenizer.json`` or SentencePiece ``tokenizer.model``.

Special tokens, BOS/EOS handling and the chat template come from the folder's
``tokenizer_config.json`` / ``special_tokens_map.json`` (and ``config.json``
ids as a fallback), as transformers reads them. ``"legacy": false`` on a
SentencePiece model is honoured as transformers 4.x's LlamaTokenizer does it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from moekit.errors import MoekitError


class TokenizerError(MoekitError):
    """A tokenizer folder is unusable; the message names the file."""


def _content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror or e})") from None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _to_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def without_dummy_prefix(proto: bytes) -> bytes:
    """A SentencePiece ModelProto with ``normalizer_spec.add_dummy_prefix = false``, edited on the wire
    (field 3 of field 3; protobuf keeps the last value of a repeated scalar), so no protobuf dependency."""
    out, i, found = bytearray(), 0, False
    while i < len(proto):
        start = i
        key, i = _varint(proto, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(proto, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            n, body = _varint(proto, i)
            i = body + n
            if key >> 3 == 3:  # normalizer_spec
                spec = proto[body:i] + b"\x18\x00"
                out += _to_varint(key) + _to_varint(len(spec)) + spec
                found = True
                continue
        else:
            raise TokenizerError(f"tokenizer.model: unexpected protobuf wire type {wire}")
        out += proto[start:i]
    return bytes(out if found else out + b"\x1a\x02\x18\x00")


def _write(path: Path, data: bytes) -> Path:
    """Write a file whole or not at all (a temporary name, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


class Tokenizer:
    """encode / decode with the checkpoint's special tokens; ``IncrementalDecoder`` for streaming."""

    def __init__(self, backend, kind: str, config: dict, model_config: dict | None = None):
        self.backend, self.kind, self.config = backend, kind, config
        added = {int(i): _content(t) for i, t in config.get("added_tokens_decoder", {}).items()}
        self.added = {s: i for i, s in added.items() if s is not None}  # added token text -> id
        specials = {k: _content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        mc = model_config or {}

        def tid(name: str) -> int | None:
            text = specials[name]
            i = self.token_to_id(text) if text else None
            fallback = mc.get(f"{name}_id")
            return i if i is not None else (fallback[0] if isinstance(fallback, list) else fallback)

        self.bos_token_id, self.eos_token_id, self.pad_token_id = tid("bos_token"), tid("eos_token"), tid("pad_token")
        self.bos_token = specials["bos_token"] or self.id_to_token(self.bos_token_id)
        self.eos_token = specials["eos_token"] or self.id_to_token(self.eos_token_id)
        self.add_bos = config.get("add_bos_token", kind == "sentencepiece")
        self.add_eos = config.get("add_eos_token", False)
        flagged = {int(i) for i, t in config.get("added_tokens_decoder", {}).items()
                   if isinstance(t, dict) and t.get("special")}
        self.special_ids = {i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None}
        self.special_ids |= flagged | (backend.special_ids() if hasattr(backend, "special_ids") else set())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        specials_text = sorted({*self.added, *(s for s in specials.values() if s)}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials_text)) + ")") if specials_text else None
        # transformers 4.x LlamaTokenizer with legacy=False: no dummy prefix after special tokens (below)
        self.legacy = kind != "sentencepiece" or config.get("legacy") is not False
        if not self.legacy:
            import sentencepiece as spm

            self._plain = spm.SentencePieceProcessor(model_proto=without_dummy_prefix(backend.serialized_model_proto()))
            self._unk = specials["unk_token"] or "<unk>"
            self._unk_len = len(self._plain.encode(self._unk))
            self._prefix_space = config.get("add_prefix_space", True)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        if str(folder).endswith(".gguf"):  # a llama.cpp file: its tokenizer.ggml.* metadata
            from moekit.weights.gguf_tokenizer import tokenizer_from_gguf

            return tokenizer_from_gguf(folder)
        folder = Path(folder)
        config = _read(folder / "tokenizer_config.json")
        for k, v in _read(folder / "special_tokens_map.json").items():
            config.setdefault(k, v)
        model_config = _read(folder / "config.json")
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot be read ({e})") from None
            return cls(backend, "tokenizers", config, model_config)
        if (folder / "tokenizer.model").exists():
            import sentencepiece as spm

            try:
                backend = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            except Exception as e:
                raise TokenizerError(f"{folder / 'tokenizer.model'}: cannot be read ({e})") from None
            return cls(backend, "sentencepiece", config, model_config)
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write the tokenizer as a checkpoint folder holds it (``tokenizer.json`` or ``tokenizer.model``,
        and ``tokenizer_config.json``), so :meth:`from_pretrained` reads back the same tokenizer; for a
        tokenizer built from a GGUF file's vocabulary too. Returns {file name: path} (``moekit.save``'s
        ``files``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "tokenizers":
            model = _write(folder / "tokenizer.json", self.backend.to_str().encode())
        else:
            model = _write(folder / "tokenizer.model", self.backend.serialized_model_proto())
        config = _write(folder / "tokenizer_config.json",
                        (json.dumps(self.config, ensure_ascii=False, indent=1) + "\n").encode())
        return {p.name: p for p in (model, config)}

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        n = self.backend.get_vocab_size() if self.kind == "tokenizers" else self.backend.get_piece_size()
        return max([n, *(i + 1 for i in self.added.values())])

    def token_to_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if text in self.added:
            return self.added[text]
        if self.kind == "tokenizers":
            return self.backend.token_to_id(text)
        i = self.backend.piece_to_id(text)
        return None if i == self.backend.unk_id() and text != self.backend.id_to_piece(i) else i

    def id_to_token(self, i: int | None) -> str | None:
        if i is None:
            return None
        for s, j in self.added.items():
            if j == i:
                return s
        if self.kind == "tokenizers":
            return self.backend.id_to_token(i)
        return self.backend.id_to_piece(i) if 0 <= i < self.backend.get_piece_size() else None

    # -- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their ids."""
        if self.kind == "tokenizers":
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            ids = self._encode_sp(text)
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            if self.add_eos and self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
                ids.append(self.eos_token_id)
        return ids

    def _encode_sp(self, text: str) -> list[int]:
        """Slow-tokenizer semantics: special-token strings split the text, each segment is encoded on its own.

        legacy (the default): every segment gets SentencePiece's dummy-prefix ``▁``.
        legacy=False (transformers 4.x LlamaTokenizer): ``▁`` is prepended once to the whole text, no segment
        gets a dummy prefix, and a segment starting with a space is encoded as ``unk + segment`` with the unk
        pieces removed (so its leading space is kept as ``▁`` the way it would be inside a sentence).
        """
        if not self.legacy and text:
            text = text.replace("\u2581", " ")
            if self._prefix_space:
                text = "\u2581" + text
        ids, specials = [], []
        for part in self._split.split(text) if self._split else [text]:
            if not part:
                continue
            special = self.token_to_id(part) if part in self.added or part in (self.bos_token, self.eos_token) else None
            if special is not None:
                ids.append(special)
                specials.append(len(ids) - 1)
            elif self.legacy:
                ids.extend(self.backend.encode(part, out_type=int))
            elif not part.startswith(("\u2581", " ")):
                ids.extend(self._plain.encode(part, out_type=int))
            else:
                ids.extend(self._plain.encode(self._unk + part, out_type=int)[self._unk_len:])
        if not self.legacy and len(ids) > 1 and 1 in specials and self.backend.id_to_piece(ids[0]) == "\u2581":
            ids = ids[1:]  # the prefix "▁" before a leading special token is dropped, as transformers does
        return ids

    def __call__(self, text: str | list[str], return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> Encoding:
        """transformers-style call: left-padded ``input_ids`` and ``attention_mask`` (tensors with "pt")."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t, add_special_tokens) for t in texts]
        width = max(map(len, rows))
        pad = self.pad_token_id if self.pad_token_id is not None else (self.eos_token_id or 0)
        ids = [[pad] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        if return_tensors is not None:
            import torch

            ids, mask = torch.tensor(ids), torch.tensor(mask)
        elif isinstance(text, str):
            ids, mask = ids[0], mask[0]
        return Encoding(input_ids=ids, attention_mask=mask)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        if self.kind == "tokenizers":
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        n, out, run = self.backend.get_piece_size(), [], []
        added = {i: s for s, i in self.added.items()}
        for i in ids + [None]:
            if i is not None and i not in added and 0 <= i < n:
                run.append(i)
                continue
            if run:
                out.append(self.backend.decode(run))
                run = []
            if i is not None and i in added:
                out.append(added[i])
        return "".join(out)


class Encoding(dict):
    """``input_ids`` / ``attention_mask``, readable as keys or attributes (as transformers returns them)."""

    __getattr__ = dict.__getitem__


class IncrementalDecoder:
    """Turns a growing list of generated token ids into text deltas that concatenate to ``decode(ids)``.

    It starts from the first generated id, not from the prompt: a reply's first token ``▁Hello``
    decodes as "Hello", as ``decode(reply_ids)`` has it. Each step decodes a small window that
    starts at the previous emission (so SentencePiece / Metaspace spacing is right) and holds
    text back while it ends in U+FFFD, i.e. while a multi-byte character is still arriving as
    byte pieces. A ``tokenizer.json`` ByteFallback decoder turns a whole run of byte pieces into
    U+FFFDs when any of it is invalid UTF-8, so with such a tokenizer text is also held while the
    last id is a byte piece. Skipped special ids are dropped on arrival, as ``decode`` drops them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.byte_ids = _byte_run_ids(tokenizer)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        token_id = int(token_id)
        if self.skip and token_id in self.tok.special_ids:
            return ""
        self.ids.append(token_id)
        if token_id in self.byte_ids:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def _byte_run_ids(tok: Tokenizer) -> frozenset[int]:
    """Ids of ``<0xNN>`` pieces when a tokenizer.json decodes byte runs all-or-nothing (ByteFallback)."""
    if tok.kind != "tokenizers" or "ByteFallback" not in repr(tok.backend.decoder):
        return frozenset()
    ids = (tok.backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)
