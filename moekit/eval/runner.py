"""``moekit eval``: score benchmark tasks through the serving engine; results as JSON and a markdown table.

    moekit eval --model PATH --tasks mmlu,gsm8k --limit 100 --out results/

Tasks are the built-ins (``moekit/eval/builtin/*.yaml``) or task YAML files (``--task-file``). Heavy
imports stay inside functions: the command line imports this module at startup.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from moekit.cliargs import count, positive_int
from moekit.errors import MoekitError

BUILTIN = Path(__file__).resolve().parent / "builtin"


def builtin_tasks() -> dict[str, Path]:
    """Built-in task name -> its YAML file."""
    return {p.stem: p for p in sorted(BUILTIN.glob("*.yaml"))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--tasks", default="", help=f"comma-separated built-in tasks ({', '.join(builtin_tasks())}) "
                                               "or task YAML files")
    p.add_argument("--task-file", action="append", default=[], help="a task YAML file (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="[SPLIT=]FILE",
                   help="local jsonl/json/csv/parquet/arrow file for a split of the one task given "
                        "(default split: the task's test split; repeatable)")
    p.add_argument("--limit", type=count, help="score only the first N documents of each task")
    p.add_argument("--num-fewshot", type=count, help="override every task's number of few-shot examples")
    p.add_argument("--seed", type=int, help="override every task's few-shot sampling seed")
    p.add_argument("--max-num-seqs", "--batch", type=positive_int, default=64, help="requests the engine runs at once")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=512, help="tokens per engine step")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"], help="weights dtype")
    p.add_argument("--kernels", default="auto", choices=["auto", "cpu", "reference"], help="kernel backend")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--out", help="folder for results.json, results.md and per-task samples_<task>.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_tasks(names: str, files: list[str]):
    """Validated tasks from built-in names and YAML paths, in the order given (duplicates dropped)."""
    from moekit.eval.tasks import load_task

    known, tasks = builtin_tasks(), []
    for item in [n.strip() for n in names.split(",") if n.strip()] + list(files):
        if item in known:
            tasks.append(load_task(known[item], where=f"built-in task {item} ({known[item].name})"))
        elif Path(item).suffix in (".yaml", ".yml") or Path(item).exists():
            tasks.append(load_task(item))
        else:
            raise MoekitError(f"--tasks: unknown task {item!r}; built-in tasks: {', '.join(known)}")
    if not tasks:
        raise MoekitError(f"--tasks: no task given; built-in tasks: {', '.join(known)}")
    seen: dict[str, object] = {}
    for t in tasks:
        seen.setdefault(t.name, t)
    return list(seen.values())


def parse_data(items: list[str], tasks) -> dict[str, list[str]] | None:
    """``--data [SPLIT=]FILE`` flags -> {split: [files]} for the single task given."""
    if not items:
        return None
    if len(tasks) != 1:
        raise MoekitError(f"--data: applies to one task; {len(tasks)} were given")
    out: dict[str, list[str]] = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            split, path = tasks[0].test_split, item
        out.setdefault(split, []).append(path)
    return out


def evaluate(lm, engine, tasks, limit=None, data=None, num_fewshot=None, seed=None, progress=True) -> dict:
    """Score every task; returns {"results": {task: metrics}, "samples": {task: records}, "configs": ...}."""
    from moekit.eval.modes import aggregate, score_task
    from moekit.eval.tasks import build_prompts

    results, samples, configs = {}, {}, {}
    for task in tasks:
        k = task.num_fewshot if num_fewshot is None else num_fewshot
        if task.output_type == "loglikelihood_rolling" and k:
            raise MoekitError(f"{task.where}: loglikelihood_rolling scores whole documents; num_fewshot must be 0")
        start = time.perf_counter()
        prompts = build_prompts(task, limit, data, num_fewshot, seed)
        recs = score_task(task, prompts, lm, engine, k, progress)
        results[task.name] = {**aggregate(task, recs), "num_fewshot": k, "output_type": task.output_type,
                              "seconds": round(time.perf_counter() - start, 2)}
        samples[task.name] = recs
        configs[task.name] = {"source": task.where, "fewshot_split": task.fewshot_split,
                              "fewshot_sampler": task.fewshot_sampler,
                              "fewshot_seed": task.fewshot_seed if seed is None else seed,
                              "test_split": task.test_split, "limit": limit, "metadata": task.metadata}
    return {"results": results, "configs": configs, "samples": samples}


def markdown_table(results: dict) -> str:
    """lm-eval-style table: one row per task and metric (groups indented below their task)."""
    rows = ["| Task | Mode | n-shot | n | Metric | Value | Stderr |", "|---|---|---:|---:|---|---:|---:|"]

    def add(name: str, res: dict, mode: str, shots) -> None:
        n = res["n"]
        for metric, value in res.items():
            if metric in ("n", "groups", "num_fewshot", "output_type", "seconds") or metric.endswith("_stderr"):
                continue
            err = res.get(f"{metric}_stderr")
            err_text = f"{err:.4f}" if isinstance(err, float) and not math.isnan(err) else ""
            rows.append(f"| {name} | {mode} | {shots} | {n} | {metric} | {value:.4f} | {err_text} |")
            name = mode = shots = n = ""

    for task, res in results.items():
        add(task, res, res["output_type"], res["num_fewshot"])
        for group, gres in res.get("groups", {}).items():
            add(f"  {group}", gres, "", "")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> None:
    import torch

    from moekit.engine import CausalLM, Engine

    tasks = resolve_tasks(args.tasks, args.task_file)
    data = parse_data(args.data, tasks)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.model is None:
        from moekit.assets import default_model_path

        args.model = str(default_model_path())
    if not (Path(args.model).is_dir() or args.model.endswith(".gguf") and Path(args.model).is_file()):
        raise MoekitError(f"--model: {args.model} is not a checkpoint folder or .gguf file")
    start = time.perf_counter()
    lm = CausalLM.from_pretrained(args.model, dtype=args.dtype, kernels=args.kernels, progress=not args.no_progress)
    engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids, max_num_seqs=args.max_num_seqs or 64,
                    max_num_batched_tokens=args.max_num_batched_tokens or 512)
    lm.engine = engine
    out = evaluate(lm, engine, tasks, args.limit, data, args.num_fewshot, args.seed, not args.no_progress)
    table = markdown_table(out["results"])
    print(table)
    summary = {"model": str(args.model), "dtype": args.dtype, "limit": args.limit, "num_fewshot": args.num_fewshot,
               "seed": args.seed, "seconds": round(time.perf_counter() - start, 2), "results": out["results"],
               "configs": out["configs"]}
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        (folder / "results.md").write_text(table + "\n")
        for name, recs in out["samples"].items():
            with (folder / f"samples_{name}.jsonl").open("w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {folder / 'results.json'}, results.md and samples_<task>.jsonl")
