"""Training a byte-level BPE tokenizer (tokenizers library) and writing it in the Hugging Face file layout."""

from __future__ import annotations

import json
from pathlib import Path


def train_bpe(files: list[str | Path], out_dir: str | Path, vocab_size: int = 4096,
              specials: tuple[str, ...] = ("<|endoftext|>", "<|startoftext|>", "<pad>"),
              chat_template: str | None = None, add_bos: bool = False) -> Path:
    """Train on ``files``; write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    ``specials`` are (eos, bos, pad, ...extra) and take ids 0, 1, 2, ...; byte-level BPE
    encodes any text, so there is no unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    eos, bos, pad = specials[0], specials[1], specials[2]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
           "add_bos_token": add_bos, "model_max_length": 1 << 30,
           "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "special": True} for s in specials}}
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos,
                                                             "pad_token": pad}, indent=2))
    return out
