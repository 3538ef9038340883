"""Exporting a trained model: the family's Hugging Face layout plus the tokenizer files, from any process count."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moekit.models import MoEDecoder
from moekit.weights.io import TOKENIZER_FILES


def export_model(model: MoEDecoder, d, cfg, target: Path) -> Path | None:
    """Gather the full weights (collective) and write them from rank 0; returns the folder on rank 0.

    The weights and the tokenizer files go in with one commit (:func:`moekit.save`): other
    files in ``target`` are left alone, and a kill leaves the previous export or this one.
    """
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
    tok = Path(cfg.tokenizer)
    out = save(plain, target, dtype=dtype, files={n: tok / n for n in TOKENIZER_FILES if (tok / n).is_file()})
    if d is not None:
        dist.barrier()
    return out
