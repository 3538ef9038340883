"""Benchmark-leakage detection by option shuffling (Ni et al., arXiv 2409.01790).

The options of a multiple-choice question are exchangeable, so a model that never saw the question
should not prefer their original order. Every permutation of a question's option contents is
rendered as the reference code renders it (``itertools.permutations`` order, the first is the
original) and scored by the log-probability of everything after the first option label ``A``:

- ``not_shuffled``: flagged when no permutation scores strictly higher than the original (ties flag);
- ``shuffled``: an ``IsolationForest`` fit on the question's permutation scores; flagged when the
  best permutation's decision score is below the threshold (-0.2 in Orion's leakage table).

Scores come from the serving engine (:class:`moekit.eval.score.Scorer`): the float32 log-softmax of
each token summed in float64; permutations that render to the same text are scored once, so their
ties are exact. Outputs follow the reference's files (``permutations_data.json``, ``logprobs.json``,
``outliers_max.json``, ``outliers{threshold}.json``) plus ``per_question.json`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

from moekit.errors import MoekitError

THRESHOLDS = (-0.2, -0.17, -0.15)
MAX_OPTIONS = 6  # 6! = 720 permutations per question


def render(question: str, options) -> str:
    """One permutation as the reference's data_process.py writes it: a space after the third option.

    The reference hard-codes four options (A-D); other counts extend it line by line (``E:{o5}\\n``).
    """
    lines = [f"{chr(65 + i)}:{o}{' ' if i == 2 else ''}\n" for i, o in enumerate(options)]
    return f"\n{question}:\n" + "".join(lines)


def permutations(options) -> list[tuple[str, ...]]:
    """Every ordering of the option contents, in ``itertools.permutations`` order (first = original)."""
    return list(itertools.permutations(options))


def label_index(pieces: list[str]) -> int | None:
    """Index of the first option label, as the reference's ``find_indices``: a token decoding to ``A``
    followed by one starting with ``:``, or a token decoding to ``A:``. None when there is none."""
    for i, p in enumerate(pieces):
        if p == "A:" or (p == "A" and i + 1 < len(pieces) and pieces[i + 1][:1] == ":"):
            return i
    return None


def load_questions(path, limit: int | None = None) -> list[tuple[str, list[str]]]:
    """[(question, options)] from a JSON list or JSONL of ``{"question", "option": {"A": .., ...}}``
    (the reference's format) or ``{"question", "choices": [...]}`` (MMLU's)."""
    path = Path(path)
    from moekit.eval.taskdata import read_json_records

    rows = read_json_records(path)
    if not rows:
        raise MoekitError(f"{path}: no questions")
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        where = f"{path}: question {i}"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise MoekitError(f"{where}: needs a string field 'question'")
        if isinstance(row.get("option"), dict):
            opts = row["option"]
            letters = [chr(65 + k) for k in range(len(opts))]
            if sorted(opts) != letters:
                raise MoekitError(f"{where}: 'option' keys must be {', '.join(letters)}; got {sorted(opts)}")
            options = [opts[k] for k in letters]
        elif isinstance(row.get("choices"), list):
            options = row["choices"]
        else:
            raise MoekitError(f"{where}: needs 'option' (a dict A, B, ...) or 'choices' (a list)")
        if not all(isinstance(o, str) for o in options):
            raise MoekitError(f"{where}: every option must be a string")
        if not 2 <= len(options) <= MAX_OPTIONS:
            raise MoekitError(f"{where}: has {len(options)} option(s); need 2 to {MAX_OPTIONS}")
        out.append((row["question"], list(options)))
    return out


def score_texts(lm, texts: list[str], progress: bool = True, where=lambda j: f"text {j}") -> list[float]:
    """Log-probability of everything after the first option label of each text (BOS etc. included
    as the tokenizer adds them). Identical texts are scored once and get identical scores."""
    from moekit.eval.score import Scorer

    tok, pieces, unique = lm.tokenizer, {}, {}
    for j, text in enumerate(texts):
        if text in unique:
            continue
        ids = tok.encode(text, add_special_tokens=True)
        for t in ids:
            if t not in pieces:
                pieces[t] = tok.decode([t])
        at = label_index([pieces[t] for t in ids])
        if at is None:
            raise MoekitError(f"{where(j)}: no option label token 'A' (followed by ':') or 'A:' in its tokens")
        if at + 1 >= len(ids):
            raise MoekitError(f"{where(j)}: nothing to score after the option label")
        unique[text] = (ids[:at + 1], ids[at + 1:])
    keys = list(unique)
    scored = Scorer(lm.engine, progress=progress).loglikelihood([unique[k] for k in keys], desc="leakage")
    by_text = {k: s.logprob for k, s in zip(keys, scored)}
    return [by_text[t] for t in texts]


def not_shuffled(scores) -> bool:
    """Flagged when no permutation scores strictly higher than the original (the first)."""
    return not any(s > scores[0] for s in scores[1:])


def isolation_score(scores) -> tuple[int, float]:
    """(argmax permutation, its IsolationForest decision score) over one question's permutation scores."""
    import numpy as np
    from sklearn.ensemble import IsolationForest

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    clf = IsolationForest(n_estimators=100, contamination="auto", random_state=42).fit(x)
    best = int(np.argmax(scores))
    return best, float(clf.decision_function(x)[best])


def detect(lm, questions, method: str = "both", thresholds=THRESHOLDS, progress: bool = True) -> dict:
    """Score every permutation of every question and flag questions; everything the output files hold."""
    texts, spans = [], []
    for question, options in questions:
        start = len(texts)
        texts += [render(question, p) for p in permutations(options)]
        spans.append((start, len(texts)))
    owner = [q for q, (a, b) in enumerate(spans) for _ in range(a, b)]
    logprobs = score_texts(lm, texts, progress,
                           where=lambda j: f"question {owner[j]}: permutation {j - spans[owner[j]][0]}")
    return {"texts": texts, "logprobs": logprobs, **flag(texts, logprobs, spans, method, thresholds, progress)}


def flag(texts, logprobs, spans, method: str = "both", thresholds=THRESHOLDS, progress: bool = False) -> dict:
    """Per-question statistics, the reference's outlier records ({"max": [...], "<threshold>": [...]})
    and leakage ratios, from the permutation scores; ``spans`` are each question's [start, end)."""
    from tqdm import tqdm

    per_q, outliers = [], {"max": [], **{str(t): [] for t in thresholds}}
    for q, (a, b) in enumerate(tqdm(spans, desc="outliers", disable=not progress, leave=False)):
        s = logprobs[a:b]
        rec = {"index": q, "permutations": b - a, "original": s[0],
               "margin": s[0] - max(s[1:]), "rank": sum(x > s[0] for x in s[1:])}

        if method in ("not_shuffled", "both"):
            rec["not_shuffled"] = not_shuffled(s)
            if rec["not_shuffled"]:
                outliers["max"].append(_record(q, 0, texts[a], s[0]))
        if method in ("shuffled", "both"):
            best, score = isolation_score(s)
            rec.update(max_value_index=best, iforest=score)
            for t in thresholds:
                if score < t:
                    outliers[str(t)].append(_record(q, best, texts[a + best], s[best]))
        per_q.append(rec)
    n, ratios = len(spans), {}
    if method in ("not_shuffled", "both"):
        ratios["not_shuffled"] = len(outliers["max"]) / n
    if method in ("shuffled", "both"):
        ratios.update({str(t): len(outliers[str(t)]) / n for t in thresholds})
    return {"per_question": per_q, "outliers": outliers, "ratios": ratios}


def _record(q: int, k: int, text: str, logprob: float) -> dict:
    """An outlier record as get_outlier.py writes it (index fields as strings)."""
    return {"index": str(q), "max_value_index": str(k), "data": text, "logprobs": logprob}


def write(out_dir, result: dict, summary: dict) -> None:
    """The reference's files plus per_question.json and summary.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def dump(name, obj):
        (out / name).write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")

    dump("permutations_data.json", [{"instruction": t} for t in result["texts"]])
    dump("logprobs.json", result["logprobs"])
    dump("per_question.json", result["per_question"])
    for key, recs in result["outliers"].items():
        if (key == "max" and "not_shuffled" in result["ratios"]) or key in result["ratios"]:
            dump("outliers_max.json" if key == "max" else f"outliers{key}.json", recs)
    flagged = {k: len(result["outliers"]["max" if k == "not_shuffled" else k]) for k in result["ratios"]}
    dump("summary.json", {**summary, "ratios": result["ratios"], "flagged": flagged})


def table(dirs, key: str = "-0.2") -> str:
    """Markdown table of leakage ratios, rows models and columns benchmarks, from run folders."""
    runs = []
    for d in dirs:
        f = Path(d) / "summary.json"
        try:
            s = json.loads(f.read_text(encoding="utf-8"))
            runs.append((s["name"], s["benchmark"], s["ratios"].get(key)))
        except FileNotFoundError:
            raise MoekitError(f"{f}: no such file (not a `moekit leakage` output folder)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise MoekitError(f"{f}: not a leakage summary ({e})") from None
    models = list(dict.fromkeys(r[0] for r in runs))
    benches = list(dict.fromkeys(r[1] for r in runs))
    cell = {(m, b): v for m, b, v in runs}
    head = "not shuffled" if key == "not_shuffled" else f"Threshold {key}"
    lines = [f"| {head} | " + " | ".join(benches) + " |", "| --- |" + " ---: |" * len(benches)]
    for m in models:
        vals = [cell.get((m, b)) for b in benches]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder")
    p.add_argument("--data", help="JSON list or JSONL of {question, option: {A: .., ...}} or {question, choices}")
    p.add_argument("--method", choices=("not_shuffled", "shuffled", "both"), default="both",
                   help="scenario a (original order is the maximum), b (IsolationForest), or both (default)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                   help="IsolationForest decision-score thresholds (default -0.2 -0.17 -0.15)")
    p.add_argument("--out", help="output folder (with --table: the markdown file; default stdout)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--name", help="the model's name in tables (default: the model folder's name)")
    p.add_argument("--benchmark", help="the benchmark's name in tables (default: the data file's stem)")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--table", nargs="+", metavar="DIR",
                   help="render these output folders as a models x benchmarks table at the first threshold "
                        "(--method not_shuffled: the not-shuffled ratio)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> None:
    if args.table:
        key = "not_shuffled" if args.method == "not_shuffled" else str(args.thresholds[0])
        md = table(args.table, key)
        if args.out:
            Path(args.out).write_text(md, encoding="utf-8")
        print(md, end="")
        return
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        raise MoekitError(f"{', '.join(missing)} required (or --table DIR ...)")
    if args.limit is not None and args.limit < 1:
        raise MoekitError(f"--limit {args.limit}: must be at least 1")
    from moekit import CausalLM

    questions = load_questions(args.data, args.limit)
    t0 = time.perf_counter()
    lm = CausalLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, kernels="auto",
                                  progress=not args.quiet)
    if lm.tokenizer is None:
        raise MoekitError(f"{args.model}: no tokenizer files")
    result = detect(lm, questions, args.method, args.thresholds, progress=not args.quiet)
    model = Path(args.model).resolve()
    summary = {"model": str(args.model), "name": args.name or (model.parent.name if model.name == "model"
                                                               else model.name),
               "data": str(args.data), "benchmark": args.benchmark or Path(args.data).stem,
               "questions": len(questions), "permutations": len(result["texts"]), "method": args.method,
               "thresholds": list(args.thresholds), "seconds": round(time.perf_counter() - t0, 1)}
    write(args.out, result, summary)
    for k, v in result["ratios"].items():
        label = "not shuffled (original order is the maximum)" if k == "not_shuffled" else f"shuffled, threshold {k}"
        print(f"{summary['name']} on {summary['benchmark']}: {label}: leakage ratio {v:.2f} "
              f"({round(v * len(questions))}/{len(questions)})")
    if not math.isfinite(sum(result["logprobs"])):
        raise MoekitError(f"{args.model}: non-finite log-probabilities (see {args.out}/logprobs.json)")


if __name__ == "__main__":  # python -m moekit.eval.leakage ... (= moekit leakage ...)
    import sys

    from moekit import cli

    parser = argparse.ArgumentParser(prog="moekit")
    sub = parser.add_subparsers(dest="command", required=True).add_parser("leakage")
    add_arguments(sub)
    sub.set_defaults(func=main)
    sys.exit(cli.main(["leakage", *sys.argv[1:]], parser=parser))
