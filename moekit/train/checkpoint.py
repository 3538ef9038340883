"""Training checkpoints: model + optimizer through torch.distributed.checkpoint, written atomically.

A checkpoint is a folder ``step-00000100`` holding the DCP shards of the model and optimizer
state (resharded on load, so a run saved by 4 processes resumes on 1 or 2), ``trainer.json``
(step, data position, mixture weights) and one ``rng-<rank>.pt`` per process (loaded with
``weights_only=True``). It is assembled under a temporary name and renamed when complete;
half-written folders are never picked up and are cleaned on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"step-(\d{8})$")


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
    done = sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "trainer.json").exists())
    return done[-1] if done else None


def save(root: str | Path, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective: every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _rank_world()
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP notes when it runs without a process group: expected here
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=world == 1)
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "world": world}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and this process's RNG from ``path``; returns trainer.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank, world = _rank_world()
    path = Path(path)
    state = json.loads((path / "trainer.json").read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(target, checkpoint_id=str(path), no_dist=world == 1)
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists() and state.get("world") == world:  # same process count: exact continuation
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return state
