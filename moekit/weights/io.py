"""Checkpoint files: find the shards of a Hugging Face folder, stream their tensors, write folders safely.

Only safetensors and ``torch.load(weights_only=True)`` are ever used, so a
checkpoint can never run code. Shards are read one at a time.

Writing (:class:`FolderCommit`) touches only the checkpoint's own files: the new files are
written into a staging folder ``.moekit-tmp-*`` inside the target, then a journal naming them
all is written atomically (the commit point), then they are renamed into place and the
previous checkpoint's stale shards removed. A reader goes through the journal of a save that was
killed after its commit point (:func:`current`), so it sees the complete old checkpoint or
the complete new one; the next save finishes the renames and deletes the temporaries.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moekit.errors import MoekitError

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_NAME = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
TMP_PREFIX, JOURNAL = ".moekit-tmp-", ".moekit-save.json"


class CheckpointError(MoekitError):
    """A checkpoint folder is unusable; the message names the file and tensor."""


def _plain(name) -> bool:
    """A file name inside the folder itself (no path, not hidden)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name[0] != "."


def _staged(rel) -> bool:
    """A file in a save's staging folder: ``.moekit-tmp-<hex>/<name>``."""
    parts = rel.split("/") if isinstance(rel, str) else []
    return len(parts) == 2 and parts[0].startswith(TMP_PREFIX) and _plain(parts[1])


def _journal(folder: Path) -> dict | None:
    try:
        with open(folder / JOURNAL, encoding="utf-8") as f:
            j = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / JOURNAL}: unreadable journal of an interrupted save ({e})") from None
    files, remove = j.get("files"), j.get("remove")
    if (not isinstance(files, dict) or not isinstance(remove, list) or not all(map(_plain, [*files, *remove]))
            or not all(_staged(t) for t in files.values())):
        raise CheckpointError(f"{folder / JOURNAL}: not a moekit save journal")
    return j


def current(path: Path) -> Path:
    """``path`` as the last committed save left it: the temporary file holding its new content
    while a save killed after its commit point is not finished yet, else ``path`` itself."""
    j = _journal(path.parent)
    tmp = j and j["files"].get(path.name)
    return path.parent / tmp if tmp and (path.parent / tmp).exists() else path


def read_json(path: Path) -> dict:
    path = current(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a symlink loop, no permission, a directory
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(shard paths, index weight_map or None), preferring safetensors over .bin."""
    for index_name, single in ((SAFE_INDEX, SINGLE_FILES[0]), (BIN_INDEX, SINGLE_FILES[1])):
        if current(folder / index_name).exists():
            wmap = read_json(folder / index_name).get("weight_map")
            if not isinstance(wmap, dict):
                raise CheckpointError(f"{folder / index_name}: has no 'weight_map' object")
            outside = [f for f in wmap.values() if not _plain(f)]
            if outside:  # "../../etc/passwd": shards are files of the checkpoint folder itself
                raise CheckpointError(f"{folder / index_name}: names shard {outside[0]!r}, which is not a file "
                                      f"name inside the checkpoint folder")
            files = [current(folder / f) for f in dict.fromkeys(wmap.values())]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{folder / index_name}: lists shard {f.name}, which is missing")
            return files, wmap
        if current(folder / single).exists():
            return [current(folder / single)], None
    raise CheckpointError(f"{folder}: no weights found (expected {SAFE_INDEX}, model.safetensors, "
                          f"{BIN_INDEX} or pytorch_model.bin)")


def unpickling_reason(e: Exception) -> str:
    """The informative line of an unpickling error (torch's weights-only message opens with advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    why = next((ln for ln in lines if not ln.startswith(advice)), lines[0])
    return why.split("WeightsUnpickler error:")[-1].strip()


def _load_bin(path: Path) -> dict:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name}: refused to unpickle: it would run code or load "
                              f"non-tensor objects ({unpickling_reason(e)})") from None
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


# ----------------------------------------------------------------------------- writing
def temp_name(name: str) -> str:
    """A recognisable temporary name for ``name`` in the same folder (removed by the next save there)."""
    return f"{TMP_PREFIX}{secrets.token_hex(4)}-{name}"


def file_mode() -> int:
    """The permissions a plain ``open`` gives a new file under this process's umask (0644 under 022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def fsync(path: Path) -> None:
    """Flush a file or a folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``:
    readers see the old or the new content, never a part. The file gets the umask's
    permissions (0644 under umask 022), as a plain ``open`` would."""
    tmp = path.parent / temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds weights in a Hugging Face layout (an index, a single file or named shards)."""
    return any((folder / n).exists() for n in (SAFE_INDEX, BIN_INDEX, *SINGLE_FILES)) or any(
        SHARD_NAME.fullmatch(p.name) for p in folder.iterdir())


def stale_files(folder: Path, keep: Iterable[str]) -> list[str]:
    """Files of the previous checkpoint in ``folder`` that a new one with files ``keep`` replaces:
    its indexes, the shards they name, single-file weights and ``model-0000i-of-0000n`` shards."""
    names = {p.name for p in folder.iterdir() if SHARD_NAME.fullmatch(p.name) or p.name in SINGLE_FILES}
    for index in (SAFE_INDEX, BIN_INDEX):
        if (folder / index).is_file():
            names.add(index)
            try:
                wmap = read_json(folder / index).get("weight_map")
            except CheckpointError:
                continue
            if isinstance(wmap, dict):
                names |= {f for f in wmap.values() if _plain(f) and f.endswith((".safetensors", ".bin"))}
    keep = set(keep)
    return sorted(n for n in names - keep if (folder / n).is_symlink() or (folder / n).is_file())


def _commit_order(name: str) -> tuple[int, str]:
    """Shards, other files, the index, config.json last: a reader that knows nothing of the
    journal and meets the new config.json finds everything it names."""
    if name == "config.json":
        return 3, name
    if name.endswith(".index.json"):
        return 2, name
    return (0 if name.endswith((".safetensors", ".bin")) else 1), name


def finish_interrupted(folder: Path) -> None:
    """Complete a save of ``folder`` killed after its commit point, then delete the temporaries
    of saves killed before it. Saves call this first; one writer at a time."""
    j = _journal(folder)
    if j is not None:
        for name in sorted(j["files"], key=_commit_order):
            if (folder / j["files"][name]).exists():
                os.replace(folder / j["files"][name], folder / name)
        for name in j["remove"]:
            if name not in j["files"] and ((folder / name).is_symlink() or (folder / name).is_file()):
                (folder / name).unlink()
        fsync(folder)
        (folder / JOURNAL).unlink()
    for p in folder.glob(TMP_PREFIX + "*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class FolderCommit:
    """A set of new files for ``folder``, put in place all at once by :meth:`commit`.

    Write each file's content to ``commit.temp(name)`` (in the staging folder); :meth:`commit`
    then flushes them, writes the journal (the commit point) and renames; :meth:`abort` removes them.
    """

    def __init__(self, folder: Path):
        self.folder, self.new, self.committed = folder, {}, False
        self.staging = folder / f"{TMP_PREFIX}{secrets.token_hex(4)}"  # writers' own temporaries land here too
        self.staging.mkdir()

    def temp(self, name: str) -> Path:
        if not _plain(name):
            raise ValueError(f"{name!r}: not a plain file name")
        self.new[name] = self.staging / name
        return self.new[name]

    def commit(self, remove: Iterable[str] = ()) -> None:
        mode = file_mode()  # safetensors writes 0600 files
        for path in self.new.values():
            os.chmod(path, mode)
            fsync(path)
        fsync(self.staging)
        journal = {"files": {n: f"{self.staging.name}/{n}" for n in self.new},
                   "remove": sorted(set(remove) - set(self.new))}
        atomic_write_text(self.folder / JOURNAL, json.dumps(journal, indent=1) + "\n")
        self.committed = True  # from here on the temporaries are the checkpoint: never delete them
        fsync(self.folder)
        finish_interrupted(self.folder)

    def abort(self) -> None:
        """Delete the new files, unless the commit point was passed (the next save finishes it)."""
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)
