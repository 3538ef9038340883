"""Tiny real tokenizers in each family's file format, trained on the spot (no downloads).

sentencepiece: a BPE ``tokenizer.model`` with byte fallback (LLaMA-2 / Orion / Yi style).
tokenizers: a ``tokenizer.json`` BPE with a Metaspace pre-tokenizer and byte fallback
(XVERSE style), or byte-level BPE (GPT-2 / Qwen style).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Suzhou is famous of its beautiful gardens. The most famous one is the Humble Administrator's Garden.",
    "Hello, what is your name? My name is moekit, a toolkit for mixture of experts models.",
    "In the beginning God created the heaven and the earth.",
    "北京的景点：故宫、天坛、万里长城等。",
    "深圳的景点：世界之窗、欢乐谷。",
    "你好，请问你叫什么名字？",
] * 20


def write_sentencepiece(folder: Path, vocab_size: int = 400, specials=("<unk>", "<s>", "</s>"),
                        extra_special: tuple[str, ...] = (), chat_template: str | None = None,
                        add_bos: bool = True) -> None:
    """``tokenizer.model`` + ``tokenizer_config.json``; ids 0/1/2 are unk/bos/eos."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=list(extra_special), add_dummy_prefix=True, minloglevel=2,
        normalization_rule_name="identity")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    declared = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in (*specials, *extra_special)}
    cfg = {"tokenizer_class": "LlamaTokenizer", "unk_token": specials[0], "bos_token": specials[1],
           "eos_token": specials[2], "add_bos_token": add_bos, "add_eos_token": False,
           "added_tokens_decoder": declared}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _common_chars_only(texts: list[str], n: int) -> list[str]:
    """``texts`` without the characters outside the ``n`` most frequent (ties by code point), so the
    rare ones (most of the Chinese) reach the vocabulary only as byte-fallback pieces. The
    trainer's own ``limit_alphabet`` breaks frequency ties differently from run to run, which
    made every test on this tokenizer see a different vocabulary."""
    counts = Counter("".join(texts))
    keep = {c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]} | {" "}
    return ["".join(c for c in t if c in keep) for t in texts]


def write_hf_bpe(folder: Path, vocab_size: int = 400, bos="<|startoftext|>", eos="<|endoftext|>", pad="<pad>",
                 byte_level: bool = False, extra_special: tuple[str, ...] = (), chat_template: str | None = None,
                 add_bos: bool | None = None) -> None:
    """``tokenizer.json`` (+ config); pad/bos/eos are ids 0/1/2 (XVERSE uses 1/2/3: pass pad first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [pad, bos, eos, *extra_special]
    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials)
    tok.train_from_iterator(TEXT if byte_level else _common_chars_only(TEXT, 60), trainer)
    if not byte_level:  # LLaMA-style byte fallback: <0xNN> pieces are ordinary vocabulary entries
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        spec["model"]["byte_fallback"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
           "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "special": True} for s in specials}}
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


XVERSE_SPECIALS = ("<sep>", "<pad>", "<|startoftext|>", "<|endoftext|>", "<|endofprompt|>", "<|endofknowledge|>")
# XVERSE-MoE-A4.2B-Chat's tokenizer.json pipeline, spelled as the published file spells it
XVERSE_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
    {"type": "Digits", "individual_digits": True},
    {"type": "Punctuation", "behavior": "Isolated"}]}
XVERSE_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}, {"type": "ByteFallback"}]}


def write_xverse(folder: Path, vocab_size: int = 700) -> None:
    """XVERSE-MoE's ``tokenizer.json`` pipeline with a small trained vocabulary.

    As published: added tokens ``<sep> <pad> <|startoftext|> <|endoftext|> <|endofprompt|>
    <|endofknowledge|>`` at ids 0-5; no normalizer; pre-tokenizer Metaspace (add_prefix_space,
    i.e. prepend_scheme "always"), Digits (individual), Punctuation (isolated); no post-processor
    (so no BOS); decoder Metaspace + ByteFallback; BPE with byte_fallback and ``<0xNN>`` pieces.
    ``special_tokens_map.json`` names bos/eos/pad as the checkpoint's does (ids 2/3/1).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation("isolated")])
    words = ["system: ", "user: ", "assistant: ", "exec: ", "Be brief.", "Hello!", "2+2?"] * 20
    tok.train_from_iterator(_common_chars_only(TEXT, 80) + words,
                            trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=list(XVERSE_SPECIALS)))
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["model"].update(byte_fallback=True, fuse_unk=False, unk_token=None)
    spec.update(normalizer=None, pre_tokenizer=XVERSE_PRE_TOKENIZER, post_processor=None, decoder=XVERSE_DECODER)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    assert [Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(s) for s in XVERSE_SPECIALS] == \
        list(range(6))
    special = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
               for k, v in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"), ("pad_token", "<pad>"))}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_training_folder(root: Path, documents: int) -> Path:
    """A BPE tokenizer in ``root/tok`` and ``root/text.txt`` of ``documents`` numbered paragraphs."""
    write_hf_bpe(root / "tok")
    (root / "text.txt").write_text("\n\n".join(f"{TEXT[i % len(TEXT)]} ({i})" for i in range(documents)))
    return root
