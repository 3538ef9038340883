"""Training checkpoints: model + optimizer through torch.distributed.checkpoint, written atomically.

A checkpoint is a folder ``step-00000100`` holding the DCP shards of the model and optimizer
state (resharded on load, so a run saved by 4 processes resumes on 1 or 2), ``trainer.json``
(step, data position, mixture weights) and one ``rng-<rank>.pt`` per process. It is assembled
as ``.moekit-tmp-step-*`` and renamed when complete: a killed save leaves the previous
checkpoints as they were, and the next save deletes its remains.

Nothing in a checkpoint can run code on resume: DCP's files are read through
:mod:`moekit.train.safe_dcp`, the RNG files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.weights.io import CheckpointError, atomic_write_text, fsync, read_json, unpickling_reason

STEP_DIR = re.compile(r"step-(\d{8})$")
TMP = ".moekit-tmp-"
ASIDE = re.compile(re.escape(TMP) + r"old-step-(\d{8})$")  # a checkpoint being replaced by one of the same step



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
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from moekit.train.safe_dcp import SafePlanner, SafeReader

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
