"""Upcycling: turn a dense LLaMA-style model into a mixture of experts (LLaMA-MoE, sparse upcycling).

Partition methods (random, cluster, importance) split each FFN's neurons into experts,
so with every expert active and each expert's combined weight 1 the MoE computes the
dense FFN exactly; copy-upcycling makes every expert a full copy, exact for any top-k.
See docs/upcycling.md for the methods, the exact set-up and the layouts written.

    model, report = upcycle(dense, method="random", experts=16, top_k=4)
    report = upcycle_checkpoint("dense/", "moe/", method="cluster", experts=16, top_k=4,
                                calibration="text.txt")
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moekit.errors import MoekitError
from moekit.models import MoEDecoder
from moekit.upcycle.assemble import LayerPlan, assemble, moe_config
from moekit.upcycle.calibrate import calibration_windows, lm_loss, neuron_importance
from moekit.upcycle.options import UpcycleOptions
from moekit.upcycle.plan import missing_calibration, plan_layers
from moekit.upcycle.report import build_report, to_markdown, write_report
from moekit.weights.io import TOKENIZER_FILES


def _options(options: UpcycleOptions | None, kw: dict) -> UpcycleOptions:
    if options is not None and kw:
        raise MoekitError(f"give either options or keyword options, not both ({sorted(kw)})")
    return options if options is not None else UpcycleOptions.from_dict(kw)


def upcycle(dense: MoEDecoder, options: UpcycleOptions | None = None, calibration: torch.Tensor | None = None,
            progress: bool = False, text: str = "calibration", **kw) -> tuple[MoEDecoder, dict]:
    """(MoE model, report) from a dense model; ``kw`` are :class:`UpcycleOptions` fields.

    calibration: token windows [W, T + 1] (see :func:`calibration_windows`): needed by the
    importance method and shared experts; when given, the report compares the dense and the
    upcycled model's loss on them. The MoE model has the dense model's dtype.
    """
    o = _options(options, kw)
    if dense.config.moe is not None:
        raise MoekitError("the model to upcycle already has experts; give a dense (LlamaForCausalLM-style) model")
    o.validate(dense.config.intermediate_size)
    scores = None
    if o.needs_calibration and calibration is not None:
        scores = neuron_importance(dense, calibration, progress)
    plans = plan_layers(dense, o, scores, progress)
    cfg = moe_config(dense.config, o, plans)
    model = assemble(dense, cfg, plans, o, torch.Generator().manual_seed(o.seed + 1))
    cal = None
    if calibration is not None:
        cal = {"text": text, "windows": int(calibration.shape[0]), "seq_len": int(calibration.shape[1] - 1),
               "dense_loss": lm_loss(dense, calibration, progress=progress, desc="dense loss"),
               "upcycled_loss": lm_loss(model, calibration, progress=progress, desc="upcycled loss")}
    return model.eval(), build_report(o, dense, model, plans, cal)


def upcycle_checkpoint(model: str | Path, out: str | Path, options: UpcycleOptions | None = None,
                       calibration: str | Path | None = None, tokenizer: str | Path | None = None,
                       seq_len: int = 256, max_windows: int = 64, progress: bool = True, **kw) -> dict:
    """Upcycle a dense checkpoint folder into ``out`` (the family's HF layout, the dense model's dtype,
    its tokenizer files, and ``upcycle_report.{json,md}``); returns the report.

    ``out`` is checked before the (slow) load: it may not be ``model`` itself nor a file; in an
    existing folder only the checkpoint's files are written (see :func:`moekit.save`).
    """
    from moekit.weights import CheckpointError, load, read_config, save
    from moekit.weights.save import check_target

    o = _options(options, kw)
    if Path(out).resolve() == Path(model).resolve():
        raise CheckpointError(f"{out}: is the dense checkpoint being upcycled; write the experts to another folder")
    tok = Path(tokenizer or model)
    files = {name: tok / name for name in TOKENIZER_FILES if (tok / name).is_file()}
    check_target(out, ["config.json", *files])
    src_cfg = read_config(model)[0]
    if src_cfg.moe is not None:
        raise MoekitError(f"{model}: already has experts; give a dense (LlamaForCausalLM-style) checkpoint")
    o.validate(src_cfg.intermediate_size)  # before the (slow) load
    if o.needs_calibration and calibration is None:
        raise MoekitError(missing_calibration(o))
    dense = load(model, dtype=torch.float32, progress=progress)
    windows = None
    if calibration is not None:
        seq = min(seq_len, dense.config.max_position_embeddings)
        windows = calibration_windows(calibration, tokenizer or model, seq, max_windows)
    moe, rep = upcycle(dense, o, windows, progress, text=str(calibration))
    dtype = src_cfg.extra.get("torch_dtype") or src_cfg.extra.get("dtype") or "float32"
    out = save(moe, out, dtype=dtype, files=files)
    rep["source"], rep["output"] = str(model), str(out)
    write_report(rep, out)
    return rep


def upcycle_from_spec(spec: dict, overrides: dict | None = None, seed: int = 0) -> MoEDecoder:
    """The trainer's ``model: {upcycle: {...}}``: a float32 MoE model ready to train.

    spec: ``path`` (the dense checkpoint), optional ``calibration`` / ``tokenizer`` /
    ``seq_len`` / ``max_windows``, and any :class:`UpcycleOptions` field (``seed`` defaults
    to the run's seed). overrides: only training knobs (``moe: {aux_loss_coef: ...}`` etc.)
    may change, as when starting from a checkpoint.
    """
    from moekit.weights import load

    spec = dict(spec)
    path = spec.pop("path", None)
    if not path:
        raise MoekitError("model.upcycle.path: the dense checkpoint folder is required")
    calibration, tokenizer = spec.pop("calibration", None), spec.pop("tokenizer", None)
    seq_len, max_windows = int(spec.pop("seq_len", 256)), int(spec.pop("max_windows", 64))
    spec.setdefault("seed", seed)
    o = UpcycleOptions.from_dict(spec, "model.upcycle")
    if o.needs_calibration and calibration is None:
        raise MoekitError("model.upcycle: " + missing_calibration(o))
    dense = load(path, dtype=torch.float32)
    windows = None
    if calibration is not None:
        windows = calibration_windows(calibration, tokenizer or path,
                                      min(seq_len, dense.config.max_position_embeddings), max_windows)
    model, rep = upcycle(dense, o, windows, progress=sys.stderr.isatty(), text=str(calibration))
    cal = rep["calibration"]
    print(f"upcycled {path}: {rep['method']}, {rep['experts']} experts top-{rep['top_k']}, layout {rep['layout']}"
          + (f"; calibration loss dense {cal['dense_loss']:.4f}, upcycled {cal['upcycled_loss']:.4f}" if cal else ""),
          file=sys.stderr)
    return _with_overrides(model, overrides or {}, path)


def _with_overrides(model: MoEDecoder, overrides: dict, path: str) -> MoEDecoder:
    from moekit.train.build import TRAINING_KNOBS, apply_overrides

    if not overrides:
        return model.train()
    extra = (set(overrides) - {"moe"}) | (set(overrides.get("moe", {})) - TRAINING_KNOBS)
    if extra:
        raise MoekitError(f"model.overrides: {sorted(extra)} would change the shapes of the upcycled weights of "
                         f"{path}; only {sorted(TRAINING_KNOBS)} can change (set the rest in model.upcycle)")
    new = MoEDecoder(apply_overrides(model.config, overrides))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("router.bias") for k in missing):
        raise ValueError(f"cannot carry the upcycled weights over: missing {missing}, unexpected {unexpected}")
    return new.train()


__all__ = ["LayerPlan", "UpcycleOptions", "calibration_windows", "lm_loss", "neuron_importance", "to_markdown",
           "upcycle", "upcycle_checkpoint", "upcycle_from_spec", "write_report"]
