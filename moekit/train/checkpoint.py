"""Training checkpoints: model + optimizer through torch.distributed.checkpoint, written atomically.

A checkpoint is a folder ``step-00000100`` holding the DCP shards of the model and optimizer
state (resharded on load, so a run saved by 4 processes resumes on 1 or 2), ``trainer.json``
(step, data position, mixture weights) and one ``rng-<rank>.pt`` per process. It is assembled
as ``.moekit-tmp-step-*`` and renamed when complete: a killed save leaves the previous
checkpoints as they were, and the next save deletes its remains.

Nothing in a checkpoint can run code on resume. DCP reads its ``.metadata`` file with plain
``pickle`` and the non-tensor values in its shards with ``torch.load(weights_only=False)``;
here the metadata goes through an unpickler that knows only DCP's metadata classes, and those
values, the tensors and the RNG files through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.futures import Future

from moekit.weights.io import CheckpointError, atomic_write_text, fsync, read_json, unpickling_reason

STEP_DIR = re.compile(r"step-(\d{8})$")
TMP = ".moekit-tmp-"
ASIDE = re.compile(re.escape(TMP) + r"old-step-(\d{8})$")  # a checkpoint being replaced by one of the same step
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co by name
     ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}  # the checkpoint_id (pathlib._local: Python 3.13+)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest(root: str | Path) -> Path | None:
    """The most recent complete checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name.startswith("step-")):  # a step folder beats its aside
        m = STEP_DIR.fullmatch(p.name) or ASIDE.fullmatch(p.name)
        if m and (p / "trainer.json").exists():
            done[int(m.group(1))] = p
    return done[max(done)] if done else None


def _clean(root: Path) -> None:
    """Put back a checkpoint moved aside by a save killed before its replacement was in place,
    then delete the remains of killed saves and prunes (and ``.tmp-step-*`` of older moekit)."""
    for p in root.iterdir():
        m = ASIDE.fullmatch(p.name)
        if m and not (root / f"step-{m.group(1)}").exists():
            os.replace(p, root / f"step-{m.group(1)}")
    for p in [*root.glob(TMP + "*"), *root.glob(".tmp-step-*")]:
        shutil.rmtree(p, ignore_errors=True)


def save(root: str | Path, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective: every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _rank_world()
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f"{TMP}step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clean(root)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP notes when it runs without a process group: expected here
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=world == 1)
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-{rank}.pt")
    _barrier()
    if rank == 0:
        atomic_write_text(tmp / "trainer.json", json.dumps({**trainer_state, "step": step, "world": world}))
        for f in tmp.glob("rng-*.pt"):
            fsync(f)
        fsync(tmp)
        if final.exists():  # the same step again: the old one stays readable (latest) until the new is in
            os.replace(final, root / f"{TMP}old-{final.name}")
        os.replace(tmp, final)
        fsync(root)
        done = sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name))
        for old in done[:-keep] if keep > 0 else []:
            os.replace(old, root / f"{TMP}pruned-{old.name}")  # gone at once, deleted below
        _clean(root)
    _barrier()
    return final


# ----------------------------------------------------------------------------- safe reading
class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                        torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


def read_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` file, unpickled without running code; its shard paths must stay in the folder."""
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (not a complete training checkpoint)") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle: it would run code or load objects that are not "
                              f"checkpoint metadata ({e})") from None
    except Exception as e:  # truncated, not a pickle
        raise CheckpointError(f"{path}: not readable checkpoint metadata ({type(e).__name__}: {e})") from None
    storage = getattr(md, "storage_data", None)
    if not isinstance(md, Metadata) or not isinstance(storage, dict):
        raise CheckpointError(f"{path}: does not hold torch.distributed.checkpoint metadata")
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel.startswith("."):
            raise CheckpointError(f"{path}: names a shard file outside its folder ({rel!r})")
    return md


class SafeReader(FileSystemReader):
    """DCP's file-system reader with :func:`read_metadata`, naming the shard file of any read error."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        md.storage_meta = md.storage_meta or StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner) -> Future:
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for rel, items in by_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{Path(self.path) / rel}: refused to unpickle: it would run code or load "
                                      f"non-tensor objects ({unpickling_reason(e)})") from None
            except (OSError, EOFError, RuntimeError, ValueError, AssertionError) as e:
                raise CheckpointError(f"{Path(self.path) / rel}: not a readable checkpoint shard "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        fut: Future = Future()
        fut.set_result(None)
        return fut


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor values (optimizer hyper-parameters) with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # UnpicklingError for anything but plain data and tensors
        # The parent reads with weights_only=False: hand it the plain object re-serialised, not the file's bytes.
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        super().load_bytes(read_item, buf)


def _rng_state(path: Path) -> torch.Tensor:
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle: it would run code or load non-tensor objects "
                              f"({unpickling_reason(e)})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None
    rng = state.get("torch") if isinstance(state, dict) else None
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise CheckpointError(f"{path}: holds no torch RNG state (a dict with a uint8 tensor under 'torch')")
    return rng


def load(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and this process's RNG from ``path``; returns trainer.json.

    Raises :class:`CheckpointError` naming the file for anything unreadable or unsafe.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank, world = _rank_world()
    path = Path(path)
    state = read_json(path / "trainer.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'trainer.json'}: has no integer 'step'")
    rng_file = path / f"rng-{rank}.pt"
    rng = _rng_state(rng_file) if rng_file.exists() and state.get("world") == world else None
    reader = SafeReader(path)
    reader.read_metadata()  # a refusal here is reported as is, not retried by DCP under another name
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(target, storage_reader=reader, planner=SafePlanner(), no_dist=world == 1)
    except CheckpointException as e:  # DCP gathers each process's exception
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        raise next((x for x in errors if isinstance(x, CheckpointError)), errors[0]) from None
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    if rng is not None:  # same process count: exact continuation
        torch.set_rng_state(rng)
    return state
