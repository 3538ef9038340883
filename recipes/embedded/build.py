"""Build moekit's embedded default model end to end and install it in the package.

    nice -n 10 python recipes/embedded/build.py [--skip-pretrain] [--skip-sft]

prepare (corpus, held-out split, tokenizer) -> dialogues (chat.jsonl) -> ``moekit train
pretrain.yaml`` -> ``moekit train sft.yaml`` -> held-out evaluation and samples -> the bf16
checkpoint, tokenizer and generation_config.json swapped atomically into moekit/assets/default/.
Prints and writes (runs/embedded/report.json) every number docs/default-model.md gives.
``--skip-pretrain`` / ``--skip-sft`` reuse a finished stage's exported model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = ROOT / "runs" / "embedded"
TARGET = ROOT / "moekit" / "assets" / "default"
GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 64,
              "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 2}
MAX_BYTES = 32 << 20


def stage(name: str, fn) -> tuple[object, float]:
    print(f"== {name}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    print(f"== {name}: {dt / 60:.1f} min", file=sys.stderr, flush=True)
    return out, dt


def run_train(yaml_name: str) -> None:
    """``moekit train`` on a recipe file."""
    from moekit.train import load_config, train

    train(load_config(HERE / yaml_name))


def summarize(log: Path) -> dict:
    """What the model card needs from a training log: steps, tokens, losses, speed."""
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    steps = list({r["step"]: r for r in recs if r.get("step", 0) > 0}.values())  # a resumed run may repeat steps
    evals = [r for r in steps if "eval_loss" in r]
    tail = steps[-50:]
    return {"steps": len(steps), "tokens": sum(r["tokens"] for r in steps),
            "train_loss_last50": sum(r["loss"] for r in tail) / len(tail),
            "tokens_per_s_median": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2],
            "step_time_hours": sum(r["time"] for r in steps) / 3600,
            "unigram_window_baseline": {k: v for k, v in recs[0].items() if k.startswith("unigram")},
            "evals": [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in evals]}


def install(model_dir: Path) -> Path:
    """Copy the exported checkpoint and tokenizer into a temporary sibling of TARGET, then swap it in."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != "generation_config.json")
    size = sum(p.stat().st_size for p in files)
    if size > MAX_BYTES:
        raise SystemExit(f"the model is {size / 2**20:.1f} MiB, over the {MAX_BYTES >> 20} MiB package budget")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=TARGET.parent, prefix=".default-"))
    try:
        tmp.chmod(0o755)  # readable by every user of an installed package
        for p in files:
            shutil.copyfile(p, tmp / p.name)
            (tmp / p.name).chmod(0o644)
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
        old = TARGET.with_name(".default-old")
        if old.exists():
            shutil.rmtree(old)
        if TARGET.exists():
            os.replace(TARGET, old)
        os.replace(tmp, TARGET)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return TARGET


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-pretrain", action="store_true", help="reuse data/ and runs/embedded/pretrain/model")
    ap.add_argument("--skip-sft", action="store_true", help="reuse runs/embedded/sft/model")
    ap.add_argument("--vocab", type=int, default=6000)
    args = ap.parse_args()
    sys.path[:0] = [str(HERE), str(ROOT)]
    import torch

    import moekit
    from dialogues import write as write_dialogues
    from evaluate import heldout_report, samples
    from prepare import prepare

    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                               f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}
    if args.skip_pretrain:  # the pretrained model is tied to its tokenizer: keep data/ as it is
        report["corpus"] = json.loads((HERE / "data" / "corpus.json").read_text())
    else:
        report["corpus"], _ = stage("prepare", lambda: prepare(HERE / "data", args.vocab))
    stage("dialogues", lambda: write_dialogues(HERE / "data"))
    for name, skip in (("pretrain", args.skip_pretrain), ("sft", args.skip_sft)):
        if skip:
            print(f"== {name}: reusing {RUNS / name / 'model'}", file=sys.stderr)
        else:
            stage(name, lambda n=name: run_train(f"{n}.yaml"))
        report[name] = summarize(RUNS / name / "log.jsonl")
    from moekit.train.plot import plot_log

    plot_log({n: str(RUNS / n / "log.jsonl") for n in ("pretrain", "sft")},
             str(ROOT / "docs" / "img" / "default-model.png"), "moekit's embedded default model")
    final = RUNS / "sft" / "model"
    report["heldout_pretrain"], _ = stage("held-out (pretrained)", lambda: heldout_report(RUNS / "pretrain" / "model",
                                                                                       HERE / "data"))
    report["heldout"], _ = stage("held-out (shipped)", lambda: heldout_report(final, HERE / "data"))
    report["samples"], _ = stage("samples", lambda: samples(final))
    target = install(final)
    cfg = moekit.load(target, kernels="reference").config
    total, active = moekit.count_params(cfg)
    report["params"] = {"total": total, "active": active}
    report["package_bytes"] = sum(p.stat().st_size for p in target.iterdir())
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    h = report["heldout"]["all"]
    print(f"\n{target}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), "
          f"{report['package_bytes'] / 2**20:.1f} MiB; held-out loss {h['loss']:.3f} (ppl {h['ppl']:.1f}) "
          f"vs unigram {h['unigram_loss']:.3f} (ppl {h['unigram_ppl']:.1f})")


if __name__ == "__main__":
    main()
