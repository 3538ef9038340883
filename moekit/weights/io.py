"""Checkpoint files: find the shards of a Hugging Face folder and stream their tensors.

Only safetensors and ``torch.load(weights_only=True)`` are ever used, so a
checkpoint can never run code. Shards are read one at a time.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


class CheckpointError(ValueError):
    """A checkpoint folder is unusable; the message names the file and tensor."""


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(shard paths, index weight_map or None), preferring safetensors over .bin."""
    for index_name, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (folder / index_name).exists():
            wmap = read_json(folder / index_name).get("weight_map")
            if not isinstance(wmap, dict):
                raise CheckpointError(f"{folder / index_name}: has no 'weight_map' object")
            files = [folder / f for f in dict.fromkeys(wmap.values())]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{folder / index_name}: lists shard {f.name}, which is missing")
            return files, wmap
        if (folder / single).exists():
            return [folder / single], None
    raise CheckpointError(f"{folder}: no weights found (expected {SAFE_INDEX}, model.safetensors, "
                          f"{BIN_INDEX} or pytorch_model.bin)")


def _load_bin(path: Path) -> dict:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path.name}: refused to unpickle: it would run code or load "
                              f"non-tensor objects ({first})") from None
    except Exception as e:  # truncated zip, wrong magic number, ...
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name}: does not hold a flat name -> tensor state dict")
    return sd


def shard_names(path: Path) -> list[str]:
    """Tensor names stored in one shard (reads only the header for safetensors)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None
    return list(_load_bin(path))


def iter_shard(path: Path, window_bytes: int = 64 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one shard, one tensor materialised at a time.

    safetensors files are memory-mapped; the file is reopened after every
    ``window_bytes`` read so that mapped pages never add more than that to the
    resident set, however large the shard.
    """
    if path.suffix != ".safetensors":
        yield from _load_bin(path).items()
        return
    names, pos = shard_names(path), 0
    try:
        while pos < len(names):
            read = 0
            with safe_open(path, framework="pt") as f:
                while pos < len(names) and read < window_bytes:
                    t = f.get_tensor(names[pos])
                    read += t.numel() * t.element_size()
                    yield names[pos], t
                    pos += 1
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None


def atomic_write(path: Path, write, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``:
    readers see the old or the new content, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))
