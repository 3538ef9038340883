"""Exporting a trained model: the family's Hugging Face layout plus the tokenizer files, from any process count."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.models import MoEDecoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def export_model(model: MoEDecoder, d, cfg, target: Path) -> Path | None:
    """Gather the full weights (collective) and write them from rank 0; returns the folder on rank 0."""
    from moekit.weights import save

    if d is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.rank != 0:
            dist.barrier()
            return None
        plain = MoEDecoder(model.config)
        plain.load_state_dict(full)
    else:
        plain = model
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    out = save(plain, target, dtype=dtype)
    for name in TOKENIZER_FILES:
        src = Path(cfg.tokenizer) / name
        if src.exists():
            shutil.copy2(src, out / name)
    if d is not None:
        dist.barrier()
    return out
