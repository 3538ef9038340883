"""Load a llama.cpp GGUF file into a :class:`MoEDecoder`: ``moekit.load("model.gguf")``.

Four llama.cpp architectures map exactly onto a moekit family (the inverse of the GGUF export):

- ``llama``: dense LLaMA, or Mixtral when it has experts (softmax, top-k renormalised);
- ``deepseek``: DeepSeek-MoE v1 (top-k not renormalised, ungated shared experts, leading dense layers);
- ``qwen2moe``: Qwen2-MoE with ``norm_topk_prob: false`` (sigmoid-gated shared expert, q/k/v biases);
- ``bailingmoe``: XVERSE-MoE (its export target; the shared experts are one MLP, ``expert_weights_norm``).

The metadata becomes the family's Hugging Face config (``to_config``), so the model is the
one the family's own checkpoint would give. A file whose quantisable matrices are all Q8_0 or all
Q4_0 loads as an int8 / int4 model holding the file's blocks (:func:`kept_quantised`); otherwise
every weight is dequantised. How each tensor is read and converted: :mod:`moekit.weights.gguf_tensors`.
gguf-py parses the header (:mod:`moekit.weights.gguf_file`); nothing in a file is executed. The
tokenizer and chat template: :mod:`moekit.weights.gguf_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.config import ConfigError, ModelConfig
from moekit.families import NameMap, get_family
from moekit.families.base import SCALE
from moekit.kernels import reference
from moekit.models import MoEDecoder
from moekit.models.quantize import QuantConfig, quantize_model
from moekit.weights.expert_cache import buffer_for
from moekit.weights.gguf_file import Metadata, open_gguf
from moekit.weights.gguf_tensors import FLOAT, GGUFSlice
from moekit.weights.io import CheckpointError

log = logging.getLogger(__name__)

# moekit tensor name -> GGUF tensor name (llama.cpp's constants.py MODEL_TENSORS)
GGUF_NAMES = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{i}.attn_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.attn.q.{w}": "blk.{i}.attn_q.{w}",
    "layers.{i}.attn.k.{w}": "blk.{i}.attn_k.{w}",
    "layers.{i}.attn.v.{w}": "blk.{i}.attn_v.{w}",
    "layers.{i}.attn.o.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn.{p}": "blk.{i}.ffn_{p}.weight",  # dense FFN layers
    "layers.{i}.ffn.router.proj.weight": "blk.{i}.ffn_gate_inp.weight",
    "layers.{i}.ffn.shared.{p}": "blk.{i}.ffn_{p}_shexp.weight",
    "layers.{i}.ffn.shared_gate.weight": "blk.{i}.ffn_gate_inp_shexp.weight",  # stored as [D]
    "layers.{i}.ffn.experts.{e}.{p}": "blk.{i}.ffn_{p}.{e}.weight",  # one tensor per expert (early Mixtral files)
}
PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")  # -> stacked blk.N.ffn_P_exps [E, ...]
PERMUTED = ("llama", "deepseek", "bailingmoe")  # archs whose Q/K rows are in llama.cpp's NORM rotary order
ARCHS = ("llama", "deepseek", "qwen2moe", "bailingmoe")
QUANT = {"Q8_0": "int8", "Q4_0": "int4"}  # GGUF types whose blocks are moekit's formats with group 32
QUANT_KIND = {v: k for k, v in QUANT.items()}


# ----------------------------------------------------------------------------- metadata -> config
def _shape(t) -> tuple[int, ...]:
    """A tensor's logical numpy shape (GGUF lists dims innermost first)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def hf_config(meta: Metadata, tensors: dict) -> dict:
    """The Hugging Face config.json of the moekit family that reproduces this GGUF's architecture."""
    path, arch = meta.path, meta.need("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (moekit reads {', '.join(ARCHS)})")

    def a(key: str) -> str:
        return f"{arch}.{key}"

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    heads = meta.count(a("attention.head_count"))
    d = meta.count(a("embedding_length"))
    head_dim = meta.count(a("attention.key_length"), d // max(heads, 1))
    if meta.count(a("attention.value_length"), head_dim) != head_dim:
        raise CheckpointError(f"{path}: metadata key {a('attention.value_length')!r} differs from the key length "
                              f"{head_dim} (not supported)")
    if meta.count(a("rope.dimension_count"), head_dim) != head_dim:
        raise CheckpointError(f"{path}: metadata key {a('rope.dimension_count')!r}="
                              f"{meta.get(a('rope.dimension_count'))} rotates part of a head of {head_dim} "
                              f"(partial rotary is not supported)")
    if meta.get(a("expert_gating_func"), 1) != 1:
        raise CheckpointError(f"{path}: metadata key {a('expert_gating_func')!r}={meta.get(a('expert_gating_func'))}"
                              f" is not supported (1, softmax)")
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, Llama-3.1 style) "
                              f"is not supported")
    tok = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    hf = dict(vocab_size=_shape(tensors["token_embd.weight"])[0], hidden_size=d,
              num_hidden_layers=meta.count(a("block_count")), num_attention_heads=heads,
              num_key_value_heads=meta.count(a("attention.head_count_kv"), heads), head_dim=head_dim,
              max_position_embeddings=meta.count(a("context_length"), 4096),
              rms_norm_eps=meta.real(a("attention.layer_norm_rms_epsilon"), 1e-6),
              rope_theta=meta.real(a("rope.freq_base"), 10000.0), rope_scaling=_rope_scaling(meta, arch),
              tie_word_embeddings="output.weight" not in tensors, hidden_act="silu",
              bos_token_id=tok["bos"], eos_token_id=tok["eos"], pad_token_id=tok["padding"])
    experts = meta.count(a("expert_count"), 0)

    def used() -> int:
        return meta.count(a("expert_used_count"))

    if arch == "llama" and not experts:
        hf.update(model_type="llama", intermediate_size=meta.count(a("feed_forward_length")))
    elif arch == "llama":
        hf.update(model_type="mixtral", num_local_experts=experts, num_experts_per_tok=used(),
                  intermediate_size=meta.count(a("feed_forward_length")))
    elif arch == "deepseek":  # llama.cpp's build_deepseek: norm_w and scale_w false
        hf.update(model_type="deepseek", n_routed_experts=experts, num_experts_per_tok=used(),
                  moe_intermediate_size=meta.count(a("expert_feed_forward_length")),
                  n_shared_experts=meta.count(a("expert_shared_count"), 0),
                  first_k_dense_replace=meta.count(a("leading_dense_block_count"), 0),
                  intermediate_size=meta.count(a("feed_forward_length")), norm_topk_prob=False)
    elif arch == "qwen2moe":  # norm_w false; the shared expert is gated by sigmoid(ffn_gate_inp_shexp . x)
        up = tensors.get("blk.0.ffn_up_exps.weight")
        shexp = tensors.get("blk.0.ffn_up_shexp.weight")
        hf.update(model_type="qwen2_moe", num_experts=experts, num_experts_per_tok=used(),
                  moe_intermediate_size=meta.count(a("expert_feed_forward_length"), _shape(up)[1] if up else None),
                  shared_expert_intermediate_size=meta.count(a("expert_shared_feed_forward_length"),
                                                             _shape(shexp)[0] if shexp else 0),
                  intermediate_size=meta.count(a("feed_forward_length"), 0), norm_topk_prob=False,
                  qkv_bias="blk.0.attn_q.bias" in tensors)
    else:  # bailingmoe -> XVERSE-MoE
        if meta.count(a("leading_dense_block_count"), 0):
            raise CheckpointError(f"{path}: metadata key {a('leading_dense_block_count')!r}="
                                  f"{meta.get(a('leading_dense_block_count'))} is not supported (0)")
        hf.update(model_type="xverse", num_experts=experts, moe_top_k=used(),
                  intermediate_size=meta.count(a("expert_feed_forward_length")),
                  num_shared_experts=meta.count(a("expert_shared_count"), 0),
                  norm_topk_prob=bool(meta.get(a("expert_weights_norm"), False)))
    return hf


def routed_scale(meta: Metadata) -> float:
    """The routed-output multiplier: ``expert_weights_scale``, which llama.cpp's deepseek and bailingmoe read
    (0 or 1: none); its llama and qwen2moe never scale."""
    arch = meta.get("general.architecture")
    scale = meta.real(f"{arch}.expert_weights_scale", 0.0) if arch in ("deepseek", "bailingmoe") else 0.0
    return scale if scale not in (0.0, 1.0) else 1.0


def _rope_scaling(meta: Metadata, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.real(f"{arch}.rope.scaling.factor") or meta.real(f"{arch}.rope.scale_linear")
    if kind == "none" and factor not in (None, 0.0, 1.0) and f"{arch}.rope.scale_linear" in meta:
        kind = "linear"
    if kind == "none" or factor in (None, 0.0, 1.0):
        return None
    if kind != "linear":
        raise CheckpointError(f"{meta.path}: metadata key '{arch}.rope.scaling.type'={kind!r} is not supported "
                              f"(none, linear)")
    return {"type": "linear", "factor": factor}


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig a GGUF file describes, without reading its tensors."""
    reader = open_gguf(path)
    return _config(Metadata(reader, Path(path)), {t.name: t for t in reader.tensors})


def _config(meta: Metadata, tensors: dict) -> ModelConfig:
    hf = hf_config(meta, tensors)
    try:
        cfg = get_family(hf["model_type"]).to_config(hf, frozenset())
        scale = routed_scale(meta)  # no family config.json field holds it (LLaMA-MoE's score scale, exported)
        return cfg if scale == 1.0 else cfg.replace(moe=dataclasses.replace(cfg.moe, routed_scale=scale))
    except (ConfigError, TypeError) as e:
        why = str(e).replace("config.json field", "field")
        raise CheckpointError(f"{meta.path}: its metadata describes a model moekit cannot build ({why})") from None


# ----------------------------------------------------------------------------- tensors
def _sources(model_views: dict, tensors: dict, path: Path) -> dict[str, list[tuple[str, int | None]]]:
    """GGUF tensor name -> [(moekit view name, index into its leading dim or None)]."""
    table, out = NameMap(GGUF_NAMES), {}
    for name in model_views:
        g = table.to_hf(name)
        if g is None:
            raise CheckpointError(f"{path}: moekit tensor {name!r} has no GGUF name")
        index = None
        if (m := PER_EXPERT.fullmatch(g)) and g not in tensors:
            g, index = f"blk.{m[1]}.ffn_{m[2]}_exps.weight", int(m[3])
        out.setdefault(g, []).append((name, index))
    return out


def kept_quantised(cfg: ModelConfig, sources: dict, tensors: dict) -> QuantConfig | None:
    """int8 (from Q8_0) or int4 (from Q4_0), group 32, when every matrix moekit quantises
    (:func:`moekit.models.quantize.targets`) but the LM head is stored in that one type, so the file's
    bytes are kept (the LM head too when ``output`` has that type, as llama-quantize's Q6_K one has not);
    None, so every weight is dequantised, otherwise (a float file, K-quants, mixed types)."""
    if not any(t.tensor_type.name in QUANT for t in tensors.values()):
        return None
    with torch.device("meta"):
        model = MoEDecoder(cfg, "reference")
    quantize_model(model, QuantConfig("int8", 32), structure_only=True)  # which matrices (group 32 fits both)
    source = {name: g for g, targets in sources.items() for name, _ in targets}
    kept = {source[n.removesuffix(SCALE)] for n in model.named_views() if n.endswith(SCALE)} - {"output.weight"}
    kinds = Counter(tensors[g].tensor_type.name for g in kept)
    if len(kinds) != 1 or (kind := next(iter(kinds))) not in QUANT:
        log.info("the matrices are stored as %s: the weights are dequantised",
                 ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
        return None
    head = tensors.get("output.weight")
    return QuantConfig(QUANT[kind], 32, lm_head=head is not None and head.tensor_type.name == kind)


def default_dtype(tensors: dict) -> torch.dtype:
    """float32 for an all-F32 file, else bfloat16 (what the CPU kernels run)."""
    kinds = {t.tensor_type.name for t in tensors.values() if len(t.shape) >= 2}
    return torch.float32 if kinds <= {"F32"} else torch.bfloat16


@dataclasses.dataclass
class Plan:
    """A GGUF file checked against the model its metadata describes, before anything is allocated."""

    path: Path
    cfg: ModelConfig
    dtype: torch.dtype
    tensors: dict  # GGUF name -> gguf-py ReaderTensor (memory-mapped)
    sources: dict  # GGUF name -> [(moekit view name, index into its leading dim or None)]
    quant: QuantConfig | None  # int8 / int4 matrices: the file's Q8_0 / Q4_0 kept, or quantize=
    permuted: bool  # Q/K rows in llama.cpp's rotary order

    def on_meta(self, device, kernels: str) -> MoEDecoder:
        """The model on the meta device, its matrices int8 / int4 as ``quant`` says."""
        from moekit.weights.load import _on_meta

        model = _on_meta(self.cfg, self.dtype, device, kernels)
        if self.quant:
            quantize_model(model, self.quant, structure_only=True)
        return model

    def heads(self, g: str) -> int:
        """The head count whose rows to unpermute for GGUF tensor ``g`` (0: none)."""
        part = g.split(".")[-2]
        return {"attn_q": self.cfg.num_heads, "attn_k": self.cfg.num_kv_heads}.get(part, 0) if self.permuted else 0

    def reads(self, names, kernels=reference) -> list[tuple[GGUFSlice, tuple[str, ...]]]:
        """[(slice, names of the views it fills)] for every tensor, each expert of a stacked one its own
        slice; ``names``: the model's view names (an int8 / int4 matrix fills its data and scales);
        ``kernels``: the model's kernel backend, which converts values the model does not keep as they are."""
        out = []
        for g, targets in self.sources.items():
            t = self.tensors[g]
            kind, shape = t.tensor_type.name, _shape(t)
            for name, index in targets:
                fills = (name, name + SCALE) if name + SCALE in names else (name,)
                if index is None:
                    out.append((GGUFSlice(self.path, g, t.data_offset, t.n_bytes, kind, shape, self.heads(g),
                                          self.dtype, kernels), fills))
                else:
                    each = t.n_bytes // shape[0]
                    out.append((GGUFSlice(self.path, g, t.data_offset + index * each, each, kind, shape[1:],
                                          dtype=self.dtype, kernels=kernels), fills))
        return out


def plan_gguf(path: str | Path, dtype: torch.dtype | str | None = None,
              quantize: str | QuantConfig | None = None, group: int | None = None) -> Plan:
    """Read a GGUF file's metadata and tensor table and check them against the model they describe:
    missing, unexpected or mis-shaped tensors are named. ``quantize`` / ``group``: the model's matrices
    int8 / int4 (:meth:`QuantConfig.of`), each quantised as it is read; refused for a file whose
    matrices are kept as they are (all Q8_0 or all Q4_0)."""
    from moekit.weights.load import as_dtype

    wanted = QuantConfig.requested(quantize, group)  # a ConfigError names the bad argument

    path = Path(path)
    reader = open_gguf(path)
    meta, tensors = Metadata(reader, path), {t.name: t for t in reader.tensors}
    cfg = _config(meta, tensors)
    dtype = as_dtype(dtype) or default_dtype(tensors)
    cfg = cfg.replace(extra={**cfg.extra, "torch_dtype": str(dtype).removeprefix("torch.")})
    with torch.device("meta"):
        shapes = {n: tuple(v.shape) for n, v in MoEDecoder(cfg, "reference").named_views().items()}
    sources = _sources(shapes, tensors, path)
    problems = [f"tensor {g!r} is missing" for g in sources if g not in tensors]
    problems += [f"unexpected tensor {g!r} (a {meta.get('general.architecture')} model with this metadata "
                 f"has no such tensor)" for g in tensors if g not in sources]
    for g, targets in sources.items():
        if g in tensors:
            want = _want_shape(shapes, targets)
            if _shape(tensors[g]) != want and not (g.endswith("ffn_gate_inp_shexp.weight")
                                                   and _shape(tensors[g]) == want[1:]):
                problems.append(f"tensor {g!r} has shape {list(_shape(tensors[g]))}, the metadata implies {list(want)}")
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: {problems[0]}{more}")
    kept = kept_quantised(cfg, sources, tensors)
    if kept and wanted:
        raise CheckpointError(f"{path}: already quantised ({kept.format} from GGUF {QUANT_KIND[kept.format]}), and "
                              f"loads as such without quantize=; quantise its floating-point source instead")
    if not kept and not wanted and (lossy := sorted({t.tensor_type.name for t in tensors.values()} - set(FLOAT))):
        log.info("%s: %s matrices are dequantised to %s; quantize='int4' (or 'int8') keeps the model near the "
                 "file's size", path.name, ", ".join(lossy), str(dtype).removeprefix("torch."))
    return Plan(path, cfg, dtype, tensors, sources, kept or wanted, meta.get("general.architecture") in PERMUTED)


def load_gguf(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
              kernels: str = "auto", progress: bool | None = None, quantize: str | QuantConfig | None = None,
              group: int | None = None) -> MoEDecoder:
    """A llama.cpp GGUF file of a supported architecture as a :class:`MoEDecoder`.

    dtype: the compute dtype; None is float32 for an all-F32 file and bfloat16 otherwise. A Q8_0 /
    Q4_0 file keeps its matrices as int8 / int4 (:func:`kept_quantised`); ``quantize`` / ``group``
    quantise any other file's matrices as they are read (a K-quant file's too: peak memory is the
    quantised model, not the dequantised one), as :func:`moekit.load` quantises a checkpoint. Raises
    :class:`CheckpointError` naming the file and the key or tensor for an unsupported
    architecture, a truncated file, missing, unexpected or mis-shaped tensors.
    """
    from moekit.weights.load import _allocate

    plan = plan_gguf(path, dtype, quantize, group)
    path = plan.path
    model = _allocate(plan.on_meta(device, kernels), plan.dtype, device)
    views = model.named_views()
    reads = [(source, tuple(views[n] for n in names))
             for source, names in plan.reads(views, model.kernels)]
    buffer = buffer_for(reads)
    bad = []
    show = sys.stderr.isatty() if progress is None else progress
    fd = os.open(path, os.O_RDONLY)
    try:
        for source, filled in tqdm(reads, desc=f"loading {path.name}", unit="tensor", disable=not show):
            source.fill(fd, filled, buffer=buffer)
            v = filled[-1]  # the weight, or a quantised one's scales
            if v.is_floating_point() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
                bad.append(f"tensor {source.name!r} has NaN or infinite values")
    finally:
        os.close(fd)
    del buffer
    if bad:
        raise CheckpointError(f"{path}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    model.kernels.prepare_weights(model)
    for line in model.kernels.describe():
        log.info(line)
    return model.eval()


def _want_shape(shapes: dict, targets: list[tuple[str, int | None]]) -> tuple[int, ...]:
    """The GGUF tensor shape that fills ``targets``: the view's, with the expert count in front when stacked."""
    name, index = targets[0]
    return shapes[name] if index is None else (len(targets), *shapes[name])
