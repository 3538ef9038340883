"""Scoring modes and their metrics, over rendered prompts (:mod:`moekit.eval.tasks`) and the engine.

- ``multiple_choice`` (lm-eval): one loglikelihood per option, continuation = target_delimiter + option;
  ``acc`` = argmax of the sum, ``acc_norm`` = argmax of the sum divided by the option's length in characters.
- ``ppl`` (OpenCompass PPL mode): the option whose continuation has the lowest mean per-token loss.
- ``generate_until``: greedy generation cut at the first stop string, answer extraction by each filter
  (``regex``, ``last_number``, ``first_choice_letter``), then ``exact_match`` after normalisation.
- ``loglikelihood_rolling``: word and byte perplexity and bits per byte of whole documents.

Every request of a task goes to the engine in one call, so a shared few-shot prefix and a question's
options are served from the prefix cache.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from moekit.errors import MoekitError
from moekit.eval.tasks import Prompt, Task

INVALID = "[invalid]"  # what a filter gives when it finds nothing (lm-eval's fallback)
LAST_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval gsm8k "flexible-extract"


# ---- metrics on plain numbers and strings (each tested against a hand-computed case) -------------------
def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (numpy's rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """lm-eval multiple choice: ``acc`` and ``acc_norm`` (loglikelihood / option length in characters)."""
    acc = float(argmax(lls) == gold)
    acc_norm = float(argmax([ll / max(1, len(c)) for ll, c in zip(lls, choices)]) == gold)
    return {"acc": acc, "acc_norm": acc_norm}


def ppl_choice(lls: Sequence[float], num_tokens: Sequence[int]) -> int:
    """OpenCompass PPL mode: the option with the lowest mean per-token loss (first on ties)."""
    return argmax([ll / n for ll, n in zip(lls, num_tokens)])


def extract(text: str, spec: dict) -> str:
    """One filter's answer from a generation, or ``[invalid]``."""
    kind = spec["type"]
    if kind == "regex":
        m = re.search(spec["pattern"], text)
        return m.group(spec.get("group", 1)).strip() if m and m.group(spec.get("group", 1)) is not None else INVALID
    if kind == "last_number":
        hits = LAST_NUMBER.findall(text)
        return next((g for g in hits[-1] if g), INVALID).strip() if hits else INVALID
    letters = re.escape(spec.get("letters", "ABCD"))
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return m.group(1) if m else INVALID


def normalise(text: str, ignore_case: bool = False, ignore_punctuation: bool = False,
              regexes_to_ignore: Sequence[str] = ()) -> str:
    """Hugging Face ``exact_match`` normalisation, as lm-eval applies it to prediction and reference."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, **kwargs) -> float:
    return float(normalise(prediction, **kwargs) == normalise(reference, **kwargs))


def rolling_metrics(lls: Sequence[float], texts: Sequence[str]) -> dict[str, float]:
    """lm-eval perplexity over documents: word (``\\s+``-split) and byte perplexity, bits per byte."""
    total = sum(lls)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
            "bits_per_byte": -total / (nbytes * math.log(2))}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n), as lm-eval)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# ---- tokenisation ---------------------------------------------------------------------------------------
def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation; the continuation's ids are those of
    ``context + continuation`` after the context's. An empty context becomes BOS (or EOS)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    if not ctx:
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ctx = [prefix] if prefix is not None else []
    return ctx, cont


def _too_long(task: Task, p: Prompt, k: int, need: int, limit: int, what: str) -> MoekitError:
    return MoekitError(f"{task.where}: question {p.index} ({p.doc.origin}): the {k}-shot prompt {what} needs "
                       f"{need} tokens; the model's context is {limit} (lower --num-fewshot)")


# ---- the modes ------------------------------------------------------------------------------------------
def score_task(task: Task, prompts: list[Prompt], lm, engine, k: int, progress: bool = True) -> list[dict]:
    """One sample record per prompt: the prediction and the per-document metric values."""
    if task.output_type in ("multiple_choice", "ppl"):
        return _choices(task, prompts, lm, engine, k, progress)
    if task.output_type == "generate_until":
        return _generate(task, prompts, lm, engine, k, progress)
    return _rolling(task, prompts, lm, engine, progress)


def _context_limit(lm) -> int | None:
    cfg = lm.model.config
    return None if cfg.rope_scaling is not None else cfg.max_position_embeddings


def _choices(task, prompts, lm, engine, k, progress) -> list[dict]:
    from moekit.eval.score import Scorer

    limit, pairs = _context_limit(lm), []
    for p in prompts:
        for j, c in enumerate(p.choices):
            ctx, cont = encode_pair(lm.tokenizer, p.context, task.target_delimiter + c)
            if not cont:
                raise MoekitError(f"{task.where}: question {p.index} ({p.doc.origin}): option {j} {c!r} "
                                  "encodes to no tokens")
            if limit is not None and len(ctx) + len(cont) > limit:
                raise _too_long(task, p, k, len(ctx) + len(cont), limit, f"with option {j}")
            pairs.append((ctx, cont))
    scored = iter(Scorer(engine, progress).loglikelihood(pairs, desc=task.name))
    out = []
    for p in prompts:
        s = [next(scored) for _ in p.choices]
        lls = [x.logprob for x in s]
        rec = {"doc": p.index, "origin": p.doc.origin, "group": p.group, "gold": p.gold, "loglikelihoods": lls}
        if task.output_type == "multiple_choice":
            rec["pred"] = argmax(lls)
            rec.update(choice_metrics(lls, p.choices, p.gold))
        else:
            rec["mean_loss"] = [-x.logprob / x.num_tokens for x in s]
            rec["pred"] = ppl_choice(lls, [x.num_tokens for x in s])
            rec["acc"] = float(rec["pred"] == p.gold)
        out.append(rec)
    return out


def _generate(task, prompts, lm, engine, k, progress) -> list[dict]:
    from tqdm import tqdm

    from moekit.engine import SamplingParams
    from moekit.engine.text import TextGenerator

    gen = task.generation_kwargs
    limit, ids, params = _context_limit(lm), [], []
    for p in prompts:
        prompt = lm.tokenizer.encode(p.context)
        room = gen.get("max_gen_toks", 256) if limit is None else min(gen.get("max_gen_toks", 256),
                                                                        limit - len(prompt))
        if room < 1:
            raise _too_long(task, p, k, len(prompt) + 1, limit, "and one generated token")
        ids.append(prompt)
        params.append(SamplingParams(max_new_tokens=room, temperature=0.0, stop=tuple(gen.get("until", ()))))
    texts = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=task.name, unit="req", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for ev in TextGenerator(engine, lm.tokenizer).stream(ids, params):
            texts[ev.index] += ev.text
            bar.update(ev.finish_reason is not None)
    filters = task.filters or {"none": None}
    out = []
    for p, text in zip(prompts, texts):
        rec = {"doc": p.index, "origin": p.doc.origin, "group": p.group, "gold": p.gold, "generation": text}
        for name, spec in filters.items():
            pred = text if spec is None else extract(text, spec)
            rec[f"pred,{name}"] = pred
            rec[f"exact_match,{name}"] = exact_match(pred, p.gold, **task.metric_kwargs)
        out.append(rec)
    return out


def _rolling(task, prompts, lm, engine, progress) -> list[dict]:
    from moekit.eval.score import Scorer

    tok, scorer, out = lm.tokenizer, Scorer(engine, progress), []
    window = task.window or _context_limit(lm) or 2048
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for p in prompts:
        ids = tok.encode(p.context, add_special_tokens=False)
        lps = scorer.rolling(ids, window, task.stride, bos, desc=f"{task.name} doc {p.index}") if ids else []
        out.append({"doc": p.index, "origin": p.doc.origin, "group": p.group, "loglikelihood": sum(lps),
                    "num_tokens": len(lps), "text": p.context})
    return out


def aggregate(task: Task, samples: list[dict]) -> dict:
    """Task metrics (mean and stderr of each per-document metric; perplexities over all documents), and
    the same per group when the task has ``group_by`` (the overall value is weighted by group size)."""
    def summary(rows: list[dict]) -> dict:
        if task.output_type == "loglikelihood_rolling":
            return {"n": len(rows), **rolling_metrics([r["loglikelihood"] for r in rows], [r["text"] for r in rows])}
        names = [key for key in rows[0] if key in ("acc", "acc_norm") or key.startswith("exact_match,")]
        res = {"n": len(rows)}
        for name in names:
            res[name], res[f"{name}_stderr"] = mean_stderr([r[name] for r in rows])
        return res

    out = summary(samples)
    if task.group_by:
        groups: dict[str, list[dict]] = {}
        for r in samples:
            groups.setdefault(r["group"], []).append(r)
        out["groups"] = {g: summary(rows) for g, rows in sorted(groups.items())}
    return out
