"""A training run's configuration: one YAML file (``moekit train run.yaml``) or the same dict in Python.

Values from the file and from ``--set`` are converted to each field's declared type (YAML 1.1
reads ``1e-3`` as a string); a value that does not fit, an unknown field or a missing one raises
:class:`ConfigError` naming the field and where it came from (the file, its ``include:``, or ``--set``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.train.data import FORMATS, Source
from moekit.train.optim import OptimConfig
from moekit.train.parallel import ParallelConfig


@dataclass
class ModelSpec:
    """Where the model comes from (exactly one of preset / config / path / upcycle) and what to change."""

    preset: str | None = None  # a moekit preset, trained from scratch
    config: dict | None = None  # a config.json dict of any family, trained from scratch
    path: str | None = None  # a Hugging Face / moekit checkpoint folder to start from (continual pretraining, SFT)
    upcycle: dict | None = None  # a dense checkpoint turned into experts first (see moekit.upcycle)
    overrides: dict = field(default_factory=dict)  # ModelConfig fields to change; "moe": {...} for MoEConfig fields
    init_std: float = 0.02  # std of the random initialisation (from scratch)

    def __post_init__(self):
        given = [k for k in ("preset", "config", "path", "upcycle") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"model: give exactly one of preset, config, path, upcycle (got {given or 'none'})")


@dataclass
class DataSpec:
    """Training data: sources mixed by weight, cut into windows of seq_len tokens."""

    sources: list[Source]
    seq_len: int = 512  # tokens per training sequence
    cache_dir: str = "data-cache"  # where token shards are written (reused while inputs are unchanged)
    mixing: str = "static"  # static weights (LLaMA-MoE) | dynamic (Sheared-LLaMA batch loading)
    dynamic: dict = field(default_factory=lambda: {"eta": 1.0, "smoothing": 1e-4})
    chat_format: str | None = None  # chat sources: override the tokenizer's / family's chat format

    def __post_init__(self):
        from moekit.chat import TEMPLATES

        self.sources = [s if isinstance(s, Source) else Source(**s) for s in self.sources]
        if not self.sources:
            raise ConfigError("data.sources: at least one source is needed")
        for i, s in enumerate(self.sources):
            if s.format not in FORMATS:
                raise ConfigError(f"data.sources[{i}].format={s.format!r} must be one of {', '.join(FORMATS)}")
            if not 0 <= s.heldout < 1 or s.weight < 0:
                raise ConfigError(f"data.sources[{i}] ({s.name}): heldout={s.heldout} must be in [0, 1) and "
                                  f"weight={s.weight} >= 0")
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 1")
        if self.mixing not in ("static", "dynamic"):
            raise ConfigError(f"data.mixing={self.mixing!r} must be static or dynamic")
        if self.mixing == "dynamic" and any(s.reference_loss is None for s in self.sources):
            raise ConfigError("data.mixing=dynamic needs a reference_loss for every source")
        if self.chat_format is not None and self.chat_format not in TEMPLATES:
            raise ConfigError(f"data.chat_format={self.chat_format!r} is not a chat format; "
                              f"choose one of {', '.join(TEMPLATES)}")


@dataclass
class TrainConfig:
    """One run: model, tokenizer, data, optimiser, schedule, logging, checkpoints, parallelism."""

    model: ModelSpec
    data: DataSpec
    tokenizer: str  # folder with tokenizer.json or tokenizer.model (and tokenizer_config.json)
    out_dir: str = "run"  # logs, checkpoints, plots and the exported model
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "bf16"  # bf16: autocast with float32 master weights | fp32
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    seed: int = 0
    device: str = "auto"  # auto (the process's GPU when there is one, else cpu) | cpu | cuda
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 1  # steps between log lines (JSONL gets every step)
    eval_every: int = 100  # steps between held-out evaluations (0 = never)
    eval_batches: int = 8  # held-out batches per evaluation
    save_every: int = 100  # steps between checkpoints (0 = only at the end and on SIGTERM)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: bool = True  # write the final model in its family's Hugging Face layout (+ tokenizer files)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelSpec(**self.model)
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if isinstance(self.parallel, dict):
            self.parallel = ParallelConfig(**self.parallel)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision={self.precision!r} must be bf16 or fp32")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML run file; relative paths inside it are relative to the file. ``include:`` merges another file.

    ``overrides`` (``--set``) are merged last. Errors name the field and what gave its value: the file,
    its include, or ``--set``.
    """
    path = Path(path)
    raw = file_raw = _read_yaml(path)
    base, inc_path = {}, None
    if "include" in raw:
        inc = raw.pop("include")
        if not isinstance(inc, str):
            raise ConfigError(f"{path}: include={inc!r} must be a file name")
        inc_path = _resolve(path.parent, inc)
        base = _read_yaml(inc_path, f"{path}: include {inc!r}")
        base.pop("include", None)
        raw = _merge(base, raw)
    overrides = overrides or {}
    raw = _merge(raw, overrides)

    def named(e: ConfigError) -> ConfigError:
        m = re.match(r"([\w.\[\]]+)[=:]", str(e))
        key = m.group(1) if m else ""
        if key and _given(overrides, key):
            return ConfigError(f"--set {e}")
        src = inc_path if key and inc_path and _given(base, key) and not _given(file_raw, key) else path
        return ConfigError(f"{src}: {e}")

    try:
        raw = coerce(TrainConfig, raw, "")
        model = raw.get("model") or {}
        over = model.get("overrides")
        if isinstance(over, dict):  # ModelConfig / MoEConfig fields
            rest = coerce(ModelConfig, {k: v for k, v in over.items() if k != "moe"}, "model.overrides", partial=True)
            if "moe" in over:
                rest["moe"] = coerce(MoEConfig, over["moe"], "model.overrides.moe", partial=True)
            model["overrides"] = rest
        up = model.get("upcycle")
        if isinstance(up, dict):  # UpcycleOptions fields (moekit.upcycle reports unknown ones)
            from moekit.upcycle.options import UpcycleOptions

            known = {f.name for f in dataclasses.fields(UpcycleOptions)}
            model["upcycle"] = {**up, **coerce(UpcycleOptions, {k: v for k, v in up.items() if k in known},
                                               "model.upcycle", partial=True),
                                **{k: _as(int, up[k], f"model.upcycle.{k}") for k in ("seq_len", "max_windows")
                                   if k in up}}
    except ConfigError as e:
        raise named(e) from None
    root = path.parent
    for key in ("tokenizer", "out_dir"):
        if key in raw:
            raw[key] = str(_resolve(root, raw[key]))
    data = raw.get("data", {})
    if "cache_dir" in data:
        data["cache_dir"] = str(_resolve(root, data["cache_dir"]))
    for s in data.get("sources", []):
        s["paths"] = [str(_resolve(root, p)) for p in s.get("paths", [])]
    model = raw.get("model", {})
    if model.get("path"):
        model["path"] = str(_resolve(root, model["path"]))
    for key in ("path", "calibration", "tokenizer"):  # files an upcycle section reads
        if (model.get("upcycle") or {}).get(key):
            model["upcycle"][key] = str(_resolve(root, model["upcycle"][key]))
    try:
        return TrainConfig(**raw)
    except ConfigError as e:
        raise named(e) from None


def _read_yaml(path: Path, what: str | None = None) -> dict:
    """A YAML mapping, or a ConfigError naming the file (missing, unreadable, not YAML, not a mapping)."""
    import yaml

    what = what or str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file ({path})") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: a run file is a mapping of fields (model:, data:, tokenizer:, ...), "
                          f"not a {type(raw).__name__} ({str(raw)[:40]!r})")
    return raw


def coerce(cls, raw, where: str, partial: bool = False) -> dict:
    """``raw`` as keyword arguments of dataclass ``cls``, each value converted to its field's type.

    Unknown fields are errors; so are missing required ones unless ``partial``. Nested dataclass
    fields stay dicts (their class converts them), their values converted too. Messages start
    with the dotted field name.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the run file'}={raw!r}: must be a mapping of fields")
    at = f"{where}: " if where else ""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{at}unknown field(s) {unknown}; known: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing and not partial:
        raise ConfigError(f"{at}missing field(s) {missing}")
    dot = f"{where}." if where else ""
    return {k: _as(hints[k], v, dot + k) for k, v in raw.items()}


def _as(tp, v, where: str):
    """``v`` converted to type ``tp`` (unions, Literal, bool/int/float/str, tuples, lists, dicts, dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        alts = [a for a in args if a is not type(None)]
        for alt in alts:
            try:
                return _as(alt, v, where)
            except ConfigError as e:
                err = e
        if len(alts) == 1:
            raise err
        raise ConfigError(f"{where}={v!r}: must be {' or '.join(_describe(a) for a in args)}")
    if origin is typing.Literal:
        if v in args:
            return v
        raise ConfigError(f"{where}={v!r}: must be one of {', '.join(map(repr, args))}")
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp in (int, float):
        f = _number(v)
        if f is not None and math.isfinite(f) and (tp is float or f.is_integer()):
            return v if type(v) is int and tp is int else tp(f)
    elif tp is str:
        if isinstance(v, str):
            return v
    elif origin in (list, tuple):
        if isinstance(v, (list, tuple)):
            if origin is list or (len(args) == 2 and args[1] is Ellipsis):
                return origin(_as(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
            if len(v) == len(args):
                return tuple(_as(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    elif tp is dict or origin is dict:
        if isinstance(v, dict):
            return v
    elif dataclasses.is_dataclass(tp):
        return v if isinstance(v, tp) else coerce(tp, v, where)
    else:
        return v
    raise ConfigError(f"{where}={v!r}: must be {_describe(tp)}")


def _number(v) -> float | None:
    """A YAML number, or a string that spells one (``1e-3``); None otherwise (booleans included)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _describe(tp) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             type(None): "null"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) in (list, tuple):
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values"
        return "a list"
    return "a mapping" if dataclasses.is_dataclass(tp) else getattr(tp, "__name__", str(tp))


def _given(d: dict, key: str) -> bool:
    """Whether the dotted field ``key`` (list indices dropped) is set in ``d``."""
    node = d
    for part in key.split("[")[0].split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
