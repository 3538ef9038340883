"""Load any family's Hugging Face checkpoint folder into a :class:`MoEDecoder`.

The model is built on the meta device, materialised once in the target dtype,
and filled shard by shard: peak memory is the model plus one tensor
(safetensors) or one memory-mapped shard (.bin).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.config import ConfigError, ModelConfig
from moekit.families import Family, NameMap, detect_family
from moekit.models import MoEDecoder
from moekit.weights.io import CheckpointError, iter_shard, read_json, shard_names, weight_files

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def read_config(folder: str | Path) -> tuple[ModelConfig, Family, list[Path], dict | None]:
    """(config, family, shard files, index weight_map) of a checkpoint folder, without loading weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
    hf = read_json(folder / "config.json")
    files, wmap = weight_files(folder)
    try:
        family = detect_family(hf)
        names = frozenset(wmap) if wmap is not None else frozenset(n for f in files for n in shard_names(f))
        cfg = family.to_config(hf, names)
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    return cfg, family, files, wmap


def materialize(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                kernels: str = "auto") -> MoEDecoder:
    """An uninitialised model allocated once in ``dtype`` on ``device`` (expert padding zeroed)."""
    with torch.device("meta"):
        model = MoEDecoder(cfg, kernels=kernels, device=device, dtype=dtype)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.kernels.advise_weights(model.parameters())  # before the first write touches the pages
    model.reset_buffers()
    for module in model.modules():
        if getattr(module, "padded", False):
            module.zero_padding()
    return model


def _raise(problems: list[str], what: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{what}:\n  " + "\n  ".join(problems[:5]) + more)


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         kernels: str = "auto", progress: bool | None = None) -> MoEDecoder:
    """Load a checkpoint folder in any supported family's native layout.

    dtype: None keeps the config's ``torch_dtype`` (float32 if it has none).
    Raises :class:`CheckpointError` naming the file and tensor for missing,
    unexpected or mis-shaped tensors, bad config fields and unsafe pickles.
    """
    folder = Path(path)
    cfg, family, files, wmap = read_config(folder)
    hf = cfg.extra
    dtype = as_dtype(dtype) or as_dtype(hf.get("torch_dtype") or hf.get("dtype")) or torch.float32
    model = materialize(cfg, dtype, device, kernels)
    table = NameMap(family.names(cfg))
    expected = {}
    for name, view in model.named_views().items():
        hf_name = table.to_hf(name)
        if hf_name is None:
            raise CheckpointError(f"family {family.name!r} has no checkpoint name for moekit tensor {name!r}")
        expected[hf_name] = view
    skip = [re.compile(p) for p in family.ignore]
    if cfg.tie_word_embeddings:
        skip.append(re.compile(r"lm_head\.weight"))
    seen: set[str] = set()
    unexpected, misshaped = [], []
    show = sys.stderr.isatty() if progress is None else progress
    for file in tqdm(files, desc=f"loading {folder.name}", unit="shard", disable=not show):
        for name, tensor in iter_shard(file):
            view = expected.get(name)
            if view is None:
                if not any(p.fullmatch(name) for p in skip):
                    unexpected.append(f"{file.name}: unexpected tensor {name!r}")
                continue
            if tuple(tensor.shape) != tuple(view.shape):
                misshaped.append(f"{file.name}: tensor {name!r} has shape {list(tensor.shape)}, "
                                 f"config.json implies {list(view.shape)}")
                continue
            with torch.no_grad():
                view.copy_(tensor)
            seen.add(name)
    _raise(misshaped, f"{folder}: tensors with the wrong shape")
    _raise(unexpected, f"{folder}: tensors that a {family.name} model with this config.json does not have")
    missing = [f"missing tensor {n!r}" + (f" (index lists it in {wmap[n]})" if wmap and n in wmap else "")
               for n in expected if n not in seen]
    _raise(missing, f"{folder}: tensors the config.json requires are absent")
    for line in model.kernels.describe():
        log.info(line)
    return model.eval()
