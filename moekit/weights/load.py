"""Load any family's Hugging Face checkpoint folder into a :class:`MoEDecoder`.

The model is built on the meta device and checked against the checkpoint before anything is
allocated: its parameter count against the weight files' size, and for safetensors every tensor's
shape and dtype against the file headers. It is then materialised once in the target dtype and
filled shard by shard: peak memory is the model plus one tensor (safetensors) or one
memory-mapped shard (.bin). With ``quantize=`` the model is built quantised and each matrix is
quantised as it is read, so the floating-point model never exists. Every tensor is checked for
NaN / infinity as it is copied.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.config import ConfigError, ModelConfig, count_params
from moekit.errors import MoekitError
from moekit.families import Family, NameMap, detect_family
from moekit.families.base import SCALE
from moekit.models import MoEDecoder
from moekit.models.quantize import QuantConfig, quantize_model
from moekit.weights.io import CheckpointError, iter_shard, read_json, shard_names, weight_files

log = logging.getLogger(__name__)

SAFE_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float32: "F32", torch.float64: "F64", torch.int32: "I32", torch.int64: "I64"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise MoekitError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def read_config(folder: str | Path) -> tuple[ModelConfig, Family, list[Path], dict | None]:
    """(config, family, shard files, index weight_map) of a checkpoint folder, without loading weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
    try:
        hf = read_json(folder / "config.json")
        if not isinstance(hf, dict):
            raise CheckpointError(f"{folder / 'config.json'}: holds a {type(hf).__name__}, not a JSON object")
        files, wmap = weight_files(folder)
        for f in files:  # an unreadable shard is named as such, not as a missing or broken one
            open(f, "rb").close()
    except OSError as e:
        raise CheckpointError(f"{e.filename or folder}: cannot be read ({e.strerror or e})") from None
    try:
        family = detect_family(hf)
        names = frozenset(wmap) if wmap is not None else frozenset(n for f in files for n in shard_names(f))
        cfg = family.to_config(hf, names)
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type (a string where a number belongs, ...)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / 'config.json'}: a field has the wrong type ({e})") from None
    return cfg, family, files, wmap


def _on_meta(cfg: ModelConfig, dtype: torch.dtype, device, kernels: str) -> MoEDecoder:
    with torch.device("meta"):
        return MoEDecoder(cfg, kernels=kernels, device=device, dtype=dtype)


def _allocate(model: MoEDecoder, dtype: torch.dtype, device) -> MoEDecoder:
    model = model.to(dtype=dtype).to_empty(device=device)
    # before the first write touches the pages; buffers too: a quantised weight's data and scales are buffers
    model.kernels.advise_weights([*model.parameters(), *model.buffers()])
    model.reset_buffers()
    for module in model.modules():
        if getattr(module, "padded", False):
            module.zero_padding()
    return model


def materialize(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                kernels: str = "auto") -> MoEDecoder:
    """An uninitialised model allocated once in ``dtype`` on ``device`` (expert padding zeroed)."""
    return _allocate(_on_meta(cfg, dtype, device, kernels), dtype, device)


def _raise(problems: list[str], what: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{what}:\n  " + "\n  ".join(problems[:5]) + more)


def _check_size(cfg: ModelConfig, folder: Path, files: list[Path], quant: QuantConfig | None) -> None:
    """Refuse a config.json whose sizes need more parameters than the weight files have bytes
    (half a byte per parameter for an int4 checkpoint)."""
    params, size = count_params(cfg)[0], sum(f.stat().st_size for f in files)
    if (params // 2 if quant and quant.format == "int4" else params) > size:
        raise CheckpointError(
            f"{folder / 'config.json'}: its sizes (vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, "
            f"{cfg.num_layers} layers) make {params:,} parameters, but the weight files hold only {size:,} bytes")


def _header(path: Path) -> dict | None:
    """A safetensors file's header ({name: {dtype, shape, ...}}), or None if it cannot be parsed
    (reading the tensors then reports the damage)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n)) if 0 < n < 1 << 28 else None
    except (OSError, ValueError):
        return None


def _type_problem(file: Path, name: str, got: str, want: torch.dtype, shown: str | None = None) -> str | None:
    """Why a tensor stored as ``got`` (a safetensors dtype name; ``shown`` in the message if given)
    cannot fill a view of dtype ``want``."""
    floating = got.startswith(("F", "BF"))
    if want.is_floating_point and not floating:
        return f"{file.name}: tensor {name!r} holds {shown or got} integers; a floating-point weight belongs there"
    if not want.is_floating_point and got != SAFE_DTYPES[want]:
        return (f"{file.name}: tensor {name!r} holds {shown or got}; a quantised weight stores {SAFE_DTYPES[want]} "
                "there (config.json's quantization_config)")
    return None


def _check_headers(folder: Path, files: list[Path], shapes: dict[str, tuple]) -> None:
    """Shapes and dtypes of the safetensors tensors against the model's ({name: (shape, dtype)}), before any
    memory is allocated."""
    misshaped, wrong_type = [], []
    for file in files:
        header = _header(file) if file.suffix == ".safetensors" else None
        for name, info in (header or {}).items():
            if name not in shapes or not isinstance(info, dict):
                continue
            shape, want = shapes[name]
            if tuple(info.get("shape", ())) != shape:
                misshaped.append(f"{file.name}: tensor {name!r} has shape {list(info.get('shape', ()))}, "
                                 f"config.json implies {list(shape)}")
            elif why := _type_problem(file, name, str(info.get("dtype", "F")), want):
                wrong_type.append(why)
    _raise(misshaped, f"{folder}: tensors with the wrong shape")
    _raise(wrong_type, f"{folder}: tensors of the wrong type")


def _non_finite(file: Path, sums: list, expected: dict) -> list[str]:
    """Which tensors of ``file`` hold NaN or infinity (an overflow counts when the dtype changed)."""
    out = []
    for name, src, s in sums:
        view = expected[name]
        if bool(torch.isfinite(s)) or bool(torch.isfinite(view).all()):
            continue
        bad, to = int((~torch.isfinite(view)).sum()), str(view.dtype).removeprefix("torch.")
        how = f" after conversion from {str(src).removeprefix('torch.')} to {to}" if src != view.dtype else ""
        out.append(f"{file.name}: tensor {name!r} has {bad} NaN or infinite value(s) of {view.numel()}{how}")
    return out


def target_names(names, table: NameMap, wanted: QuantConfig | None) -> dict[str, tuple[str, ...]]:
    """Checkpoint name -> the model's views (names) its tensor fills: one, or for a matrix ``quantize=``
    quantises as it is read, its data and scales."""
    known, out = set(names), {}
    for name in names:
        if wanted and name.endswith(SCALE) and name.removesuffix(SCALE) in known:
            continue
        out[table.to_hf(name)] = (name, name + SCALE) if wanted and name + SCALE in known else (name,)
    return out


def _targets(views: dict, table: NameMap, wanted: QuantConfig | None) -> dict[str, tuple[torch.Tensor, ...]]:
    """:func:`target_names`, as the views."""
    return {hf: tuple(views[n] for n in ns) for hf, ns in target_names(views, table, wanted).items()}


def logical_shape(targets: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """The floating-point shape a checkpoint tensor has for these views (int4 data holds two columns a byte)."""
    view = targets[0]
    if len(targets) == 1:
        return tuple(view.shape)
    return (*view.shape[:-1], view.shape[-1] * (2 if view.dtype == torch.uint8 else 1))


def stored_format(folder: Path, cfg: ModelConfig, dtype) -> tuple[torch.dtype, QuantConfig | None]:
    """The dtype to compute in (``dtype``, else the config's ``torch_dtype``, else float32) and the
    checkpoint's ``quantization_config`` (None for a floating-point checkpoint)."""
    hf = cfg.extra
    dtype = as_dtype(dtype) or as_dtype(hf.get("torch_dtype") or hf.get("dtype")) or torch.float32
    try:
        return dtype, QuantConfig.from_json(hf["quantization_config"]) if hf.get("quantization_config") else None
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         kernels: str = "auto", progress: bool | None = None, quantize: str | QuantConfig | None = None,
         group: int | None = None, max_memory: float | None = None) -> MoEDecoder:
    """Load a checkpoint folder in any supported family's native layout.

    dtype: None keeps the config's ``torch_dtype`` (float32 if it has none); a quantised
    checkpoint (``moekit quantize``) keeps its int8/int4 matrices, computing in ``dtype``.
    quantize: ``int8`` / ``int4`` (or a QuantConfig) quantises a floating-point checkpoint's matrices
    as they are read, so peak memory is the quantised model (``group``: the scale group size; default
    per channel for int8, 64 for int4; docs/quantization.md).
    max_memory: a budget in GiB for a model larger than memory: the routed experts stay in the
    safetensors files and are read into an LRU cache on demand (moekit/weights/offload.py).
    Raises :class:`CheckpointError` naming the file and tensor for missing, unexpected,
    mis-shaped, integer or non-finite tensors, bad config fields and unsafe pickles.
    """
    if max_memory is not None:
        from moekit.weights.offload import load_offloaded

        return load_offloaded(path, max_memory, dtype=dtype, device=device, kernels=kernels, progress=progress,
                              quantize=quantize, group=group)
    if str(path).endswith(".gguf"):  # a llama.cpp file: moekit/weights/gguf_import.py
        from moekit.weights.gguf_import import load_gguf

        return load_gguf(path, dtype=dtype, device=device, kernels=kernels, progress=progress, quantize=quantize,
                         group=group)
    folder = Path(path)
    cfg, family, files, wmap = read_config(folder)
    dtype, quant = stored_format(folder, cfg, dtype)
    wanted = QuantConfig.requested(quantize, group)  # a ConfigError names the bad argument
    if quant and wanted:
        raise CheckpointError(f"{folder}: already quantised ({quant.format}); load it without quantize=, or "
                              "quantise its floating-point checkpoint")
    _check_size(cfg, folder, files, quant)
    meta = _on_meta(cfg, dtype, device, kernels)
    if quant or wanted:
        quantize_model(meta, quant or wanted, structure_only=True)
    table = NameMap(family.names(cfg))
    for name in meta.named_views():
        if table.to_hf(name) is None:
            raise CheckpointError(f"family {family.name!r} has no checkpoint name for moekit tensor {name!r}")
    _check_headers(folder, files, {n: (logical_shape(t), t[0].dtype if len(t) == 1 else dtype)
                                   for n, t in _targets(meta.named_views(), table, wanted).items()})
    model = _allocate(meta, dtype, device)
    expected = _targets(model.named_views(), table, wanted)
    skip = [re.compile(p) for p in family.ignore]
    if cfg.tie_word_embeddings:
        skip.append(re.compile(r"lm_head\.weight"))
    seen: set[str] = set()
    unexpected, misshaped, wrong_type, not_finite = [], [], [], []
    show = sys.stderr.isatty() if progress is None else progress
    for file in tqdm(files, desc=f"loading {folder.name}", unit="shard", disable=not show):
        sums = []  # (name, source dtype, sum): NaN or inf anywhere makes a sum non-finite (overflow is re-checked)
        for name, tensor in iter_shard(file):
            targets = expected.get(name)
            if targets is None:
                if not any(p.fullmatch(name) for p in skip):
                    unexpected.append(f"{file.name}: unexpected tensor {name!r}")
                continue
            if tuple(tensor.shape) != logical_shape(targets):
                misshaped.append(f"{file.name}: tensor {name!r} has shape {list(tensor.shape)}, "
                                 f"config.json implies {list(logical_shape(targets))}")
                continue
            if why := _type_problem(file, name, SAFE_DTYPES.get(tensor.dtype, str(tensor.dtype)),
                                    targets[0].dtype if len(targets) == 1 else dtype,
                                    shown=None if file.suffix == ".safetensors" else str(tensor.dtype)):
                wrong_type.append(why)
                continue
            with torch.no_grad():
                if len(targets) == 1:
                    targets[0].copy_(tensor)
                    sums.append((name, tensor.dtype, targets[0].sum()))  # native dtype: as cheap as the copy
                elif not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
                    not_finite.append(f"{file.name}: tensor {name!r} has {int((~torch.isfinite(tensor)).sum())} "
                                      f"NaN or infinite value(s) of {tensor.numel()}")
                else:  # quantize=: quantised as it is read, from the values the model's dtype holds
                    model.kernels.quantize_into(tensor, *targets, dtype=dtype)
                    sums.append((name, tensor.dtype, targets[1].sum()))  # an overflow makes a scale infinite
            seen.add(name)
        if sums and not bool(torch.isfinite(torch.stack([s.float() for _, _, s in sums])).all()):  # once a shard
            not_finite += _non_finite(file, sums, {n: t[-1] for n, t in expected.items()})
    _raise(misshaped, f"{folder}: tensors with the wrong shape")
    _raise(wrong_type, f"{folder}: tensors of the wrong type")
    _raise(not_finite, f"{folder}: tensors with values that are not finite numbers")
    _raise(unexpected, f"{folder}: tensors that a {family.name} model with this config.json does not have")
    missing = [f"missing tensor {n!r}" + (f" (index lists it in {wmap[n]})" if wmap and n in wmap else "")
               for n in expected if n not in seen]
    _raise(missing, f"{folder}: tensors the config.json requires are absent")
    model.kernels.prepare_weights(model)
    for line in model.kernels.describe():
        log.info(line)
    return model.eval()
