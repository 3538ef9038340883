"""A training run's configuration: one YAML file (``moekit train run.yaml``) or the same dict in Python."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from moekit.train.data import Source
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
            raise ValueError(f"model: give exactly one of preset, config, path, upcycle (got {given or 'none'})")


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
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("data.sources: at least one source is needed")
        if self.mixing not in ("static", "dynamic"):
            raise ValueError(f"data.mixing={self.mixing!r} must be static or dynamic")
        if self.mixing == "dynamic" and any(s.reference_loss is None for s in self.sources):
            raise ValueError("data.mixing=dynamic needs a reference_loss for every source")


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
            raise ValueError(f"device={self.device!r} must be auto, cpu or cuda")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r} must be bf16 or fp32")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML run file; relative paths inside it are relative to the file. ``include:`` merges another file."""
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if "include" in raw:
        base = yaml.safe_load((path.parent / raw.pop("include")).read_text()) or {}
        raw = _merge(base, raw)
    raw = _merge(raw, overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
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
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
