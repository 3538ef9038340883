"""A multiple-choice lm-evaluation-harness task written by a test: a local JSONL file and its task YAML."""

import json
from pathlib import Path


def write_mc_task(folder: Path, name: str, docs: list[dict], metrics=("acc",)) -> str:
    """``{question, choices, answer}`` documents as task ``name`` in ``folder`` (pass it as ``include_path``)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
""" + "".join(f"  - metric: {m}\n" for m in metrics), encoding="utf-8")
    return name
