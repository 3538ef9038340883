"""torch.distributed.checkpoint reading that runs no code from the checkpoint.

DCP reads a checkpoint's ``.metadata`` with plain ``pickle.load`` and the non-tensor values in
its shards (optimizer hyper-parameters) with ``torch.load(weights_only=False)``: a planted file
runs code. Here the metadata goes through an unpickler that knows only the classes DCP's
metadata is made of (:data:`METADATA_CLASSES`, the exact set a model + AdamW checkpoint uses,
FSDP2 included), and those values through ``torch.load(weights_only=True)``. Every refusal is a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.futures import Future

from moekit.weights.io import CheckpointError, unpickling_reason

METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co by name
     ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}  # the checkpoint_id (pathlib._local: Python 3.13+)


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
