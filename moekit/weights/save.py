"""Write a model in its family's own Hugging Face layout: config.json, safetensors shards, index.

Saving into a folder writes only the checkpoint's own files and leaves everything else
there as it was (sub-folders, other files, symlinks, the folder's permissions). A previous
checkpoint's shards that the new one no longer has are removed. A save killed at any point
leaves the complete old checkpoint or the complete new one (see :class:`FolderCommit`);
the next save there cleans up after it. docs/guarantees.md lists the tests behind this.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.errors import MoekitError
from moekit.families import NameMap, get_family
from moekit.families.base import SCALE
from moekit.models import MoEDecoder
from moekit.weights.io import (SAFE_INDEX, CheckpointError, FolderCommit, finish_interrupted, is_checkpoint,
                               stale_files)
from moekit.weights.load import as_dtype

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_tensors(model: MoEDecoder, family: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the family's checkpoint names (views, not copies)."""
    table = NameMap(get_family(family).names(model.config))
    out = {}
    for name, view in model.named_views().items():
        hf_name = table.to_hf(name)
        if hf_name is None:
            raise ValueError(f"family {family!r} has no checkpoint name for moekit tensor {name!r}")
        out[hf_name] = view
    return out


def _stored(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written in: ``dtype`` for weights, its own for quantised data and scales."""
    return dtype if t.is_floating_point() and not name.endswith(SCALE) else t.dtype


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def check_target(path: str | Path, names=("config.json",)) -> Path:
    """Refuse a target that is a file, or a folder holding no checkpoint whose files ``names`` a
    save would overwrite (someone else's config.json); nothing is written."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a folder; give a folder to write the checkpoint into")
    if target.is_dir() and not is_checkpoint(target):
        for name in names:
            if (target / name).exists() or (target / name).is_symlink():
                raise CheckpointError(f"{target / name}: exists in a folder that holds no checkpoint; moekit does "
                                      "not overwrite it (choose another folder, or move the file away)")
    return target


def _remove_legacy_temporaries(target: Path) -> None:
    """Folders ``.<name>.tmp-XXXXXXXX`` that saves of moekit <= 0.1.0 left beside ``target`` when killed."""
    parent, name = target.resolve().parent, target.resolve().name
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-[A-Za-z0-9_]{{8}}")
    try:
        stale = [p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:  # an unreadable parent folder: nothing we may clean
        return
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def save(model: MoEDecoder, path: str | Path, format: str = "hf", family: str | None = None,
         dtype: torch.dtype | str | None = None, max_shard_bytes: int = 4 << 30,
         files: dict[str, str | Path] | None = None) -> Path:
    """Save ``model`` as a Hugging Face checkpoint folder in ``family``'s layout (default: its own).

    files: extra files put in the folder with the same commit, ``{name: source path}``
    (tokenizer files). Raises :class:`CheckpointError` for a target that is a file, or a
    folder without a checkpoint where one of the files written already exists.
    """
    if format != "hf":
        raise MoekitError(f"format {format!r} is not supported; use 'hf'")
    cfg = model.config
    family = family or cfg.family
    if family is None:
        raise MoekitError("the model has no family; pass family=... (e.g. 'mixtral', 'xverse')")
    fam = get_family(family)
    hf_cfg = fam.to_hf(cfg)  # raises ConfigError when the layout cannot express the model
    biased = [name for name, buf in model.named_buffers() if name.endswith("router.bias") and bool(buf.any())]
    if biased:
        raise MoekitError(f"the {family} layout has no place for the routers' balancing biases ({biased[0]}, ...), "
                         "which change which experts are chosen; keep the training checkpoint, or train with "
                         "bias_balance off for this layout")
    dtype = as_dtype(dtype) or model.embed.weight.dtype
    hf_cfg["torch_dtype"] = DTYPE_NAMES[dtype]
    if getattr(model, "quant", None) is not None:  # int8/int4 matrices and their float16 scales stay as they are
        hf_cfg["quantization_config"] = model.quant.to_json()
    tensors = hf_tensors(model, family)
    files = {name: Path(src) for name, src in (files or {}).items()}
    target = check_target(path, ["config.json", SAFE_INDEX, *files])
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{target}: cannot create the folder ({e.strerror})") from None
    finish_interrupted(target)
    _remove_legacy_temporaries(target)
    commit = FolderCommit(target)
    try:
        shards = _shards(tensors, max_shard_bytes)
        wmap, total = {}, 0
        for k, names in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            part = {n: tensors[n].detach().to("cpu", _stored(n, tensors[n], dtype)).clone() for n in names}
            save_file(part, commit.temp(fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in part.values())
            wmap.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": total}, "weight_map": wmap}
        commit.temp(SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        commit.temp("config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for name, src in files.items():
            shutil.copyfile(src, commit.temp(name))
        commit.commit(remove=stale_files(target, keep=commit.new))
    except BaseException:
        commit.abort()
        raise
    return target
