"""Write a model in its family's own Hugging Face layout: config.json, safetensors shards, index.

The checkpoint is assembled in a temporary sibling folder and swapped in with
renames, so the target is never half-written. Files already in the target that
are not weights (tokenizer, chat template, README) are carried over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.families import NameMap, get_family
from moekit.models import MoEDecoder
from moekit.weights.io import SAFE_INDEX, WEIGHT_SUFFIXES
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


def save(model: MoEDecoder, path: str | Path, format: str = "hf", family: str | None = None,
         dtype: torch.dtype | str | None = None, max_shard_bytes: int = 4 << 30) -> Path:
    """Save ``model`` as a Hugging Face checkpoint folder in ``family``'s layout (default: its own)."""
    if format != "hf":
        raise ValueError(f"format {format!r} is not supported; use 'hf'")
    cfg = model.config
    family = family or cfg.family
    if family is None:
        raise ValueError("the model has no family; pass family=... (e.g. 'mixtral', 'xverse')")
    fam = get_family(family)
    hf_cfg = fam.to_hf(cfg)  # raises ConfigError when the layout cannot express the model
    biased = [name for name, buf in model.named_buffers() if name.endswith("router.bias") and bool(buf.any())]
    if biased:
        raise ValueError(f"the {family} layout has no place for the routers' balancing biases ({biased[0]}, ...), "
                         "which change which experts are chosen; keep the training checkpoint, or train with "
                         "bias_balance off for this layout")
    dtype = as_dtype(dtype) or model.embed.weight.dtype
    hf_cfg["torch_dtype"] = DTYPE_NAMES[dtype]
    tensors = hf_tensors(model, family)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        shards = _shards(tensors, max_shard_bytes)
        wmap, total = {}, 0
        for k, names in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            part = {n: tensors[n].detach().to("cpu", dtype).clone() for n in names}
            save_file(part, tmp / fname, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in part.values())
            wmap.update(dict.fromkeys(names, fname))
        (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap},
                                                 indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if target.exists():
            for f in target.iterdir():
                if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(f, tmp / f.name)
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new`` with renames only."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / "x")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
