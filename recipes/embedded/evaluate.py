"""Held-out loss of a trained model against a unigram baseline, and sample outputs, for the model card.

    python recipes/embedded/evaluate.py MODEL_DIR [--data recipes/embedded/data]

Every held-out document (prepare.is_heldout) is scored whole, from its BOS to its EOS, in
windows of ``--window`` tokens (each window after the first sees no earlier context, as in
training). The unigram baseline is fitted on the training documents' tokens with add-one
smoothing and scored on exactly the same held-out tokens. Losses are nats per token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SOURCES = ("kjv", "en", "zh")
PROMPTS = {"en": ["In the beginning", "And the LORD said unto Moses,", "Blessed are the", "A wise man",
                  "Love is"],
           "zh": ["床前明月光，", "春风", "子曰：", "天下", "人生"]}
CHATS = ["Hello!", "Who are you?", "Quote a verse about light.", "Tell me a fortune.", "你好", "给我一首唐诗",
         "给我一首关于月的诗", "说一句谚语"]


def split_docs(path: Path) -> tuple[list[str], list[str]]:
    from prepare import SEPARATOR, is_heldout

    docs = [d.strip() for d in path.read_text(encoding="utf-8").split(SEPARATOR) if d.strip()]
    return ([d for i, d in enumerate(docs) if not is_heldout(i)], [d for i, d in enumerate(docs) if is_heldout(i)])


@torch.no_grad()
def score(model, rows: list[list[int]], window: int) -> tuple[float, int]:
    """(summed next-token loss, tokens scored) over each row cut into windows (moekit's window_nll)."""
    from moekit.models.loss import window_nll

    total, count = 0.0, 0
    for ids in rows:
        for s in range(0, len(ids) - 1, window):
            nll, n = window_nll(model, torch.tensor(ids[s:s + window + 1])[None])
            total, count = total + float(nll), count + int(n)
    return total, count


def heldout_report(model_dir: Path, data: Path, window: int = 256) -> dict:
    """Per source: held-out model loss / perplexity, unigram loss / perplexity, tokens and characters."""
    import moekit
    from moekit.models.loss import perplexity

    tok = moekit.Tokenizer.from_pretrained(model_dir)
    model = moekit.load(model_dir, dtype=torch.float32, kernels="reference").eval()
    V = model.config.vocab_size
    out = {}
    all_m = all_u = all_n = 0.0
    for name in SOURCES:
        train, held = split_docs(data / f"{name}.txt")
        enc = lambda d: tok.encode(d) + [tok.eos_token_id]  # noqa: E731  (BOS + text + EOS, as in training)
        counts = np.ones(V, dtype=np.float64)
        for d in train:
            counts += np.bincount(enc(d), minlength=V)[:V]
        logp = np.log(counts / counts.sum())
        rows = [enc(d) for d in held]
        m_sum, n = score(model, rows, window)
        u_sum = float(-sum(logp[r[1:]].sum() for r in rows))
        chars = sum(len(d) for d in held)
        out[name] = {"documents": len(held), "tokens": n, "characters": chars, "loss": m_sum / n,
                     "ppl": perplexity(m_sum, n), "unigram_loss": u_sum / n, "unigram_ppl": perplexity(u_sum, n),
                     "bits_per_char": m_sum / chars / math.log(2)}
        all_m, all_u, all_n = all_m + m_sum, all_u + u_sum, all_n + n
    out["all"] = {"tokens": int(all_n), "loss": all_m / all_n, "ppl": perplexity(all_m, all_n),
                  "unigram_loss": all_u / all_n, "unigram_ppl": perplexity(all_u, all_n)}
    return out


def samples(model_dir: Path, max_new_tokens: int = 48) -> dict:
    """Greedy continuations of PROMPTS and greedy chat replies to CHATS (repetition penalty 1.1)."""
    import moekit

    lm = moekit.CausalLM.from_pretrained(model_dir, kernels="reference")
    kw = {"temperature": 0.0, "repetition_penalty": 1.1, "max_new_tokens": max_new_tokens}
    cont = {lang: {p: lm.complete(p, **kw) for p in ps} for lang, ps in PROMPTS.items()}
    chat = {q: lm.chat(None, [{"role": "user", "content": q}], **{**kw, "max_new_tokens": 80}) for q in CHATS}
    return {"continuations": cont, "chat": chat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    print(json.dumps({"heldout": heldout_report(args.model, args.data, args.window), **samples(args.model)},
                     indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
