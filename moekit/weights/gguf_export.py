"""GGUF export: a moekit model as a file llama.cpp runs (``moekit export --format gguf``).

Exact or not at all: :func:`target` picks the llama.cpp architecture that computes what moekit
computes for this config, or refuses with the reason, before anything is written (docs/gguf.md).

    llama       Mixtral / APUS, Orion-MoE with RMSNorm, dense LLaMA: softmax top-k renormalised
    deepseek    DeepSeek-MoE v1: top-k not renormalised, ungated shared experts, leading dense layers
    qwen2moe    Qwen2-MoE with norm_topk_prob false: sigmoid-gated shared expert
    bailingmoe  XVERSE-MoE: top-k renormalised (expert_weights_norm) plus ungated shared experts

llama.cpp's ``llama``, ``deepseek`` and ``bailingmoe`` rotate adjacent pairs (NORM RoPE) where
moekit rotates halves (NeoX), so their Q/K rows are reordered as llama.cpp's converter does
(``LlamaModel.permute``); ``qwen2moe`` rotates halves. Ungated shared experts are written as one
MLP ``expert_shared_count`` experts wide, zero rows padding it out (exact: silu(0) * 0 = 0).

Shape legend: V vocabulary, D model width, H / G query / key-value heads, A head width, E experts,
F expert width, S shared-expert width. GGUF lists dims reversed: numpy [E, F, D] is ggml {D, F, E}.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moekit.config import ModelConfig
from moekit.errors import MoekitError
from moekit.kernels.weights import dense
from moekit.models import MoEDecoder
from moekit.models.layers import MLP
from moekit.weights.gguf_vocab import Vocab, read_vocab

log = logging.getLogger(__name__)

TYPES = ("f16", "bf16", "q8_0", "q4_0")


class GGUFExportError(MoekitError):
    """A model, type or output path GGUF export cannot take; the message says why."""


@dataclass(frozen=True)
class Target:
    """Where a model goes in llama.cpp."""

    arch: str  # llama.cpp architecture (general.architecture)
    permute: bool  # NORM RoPE: Q/K rows reordered from rotate-half to adjacent pairs
    output: bool  # output.weight is required (tied embeddings are written twice)
    shared: int = 0  # ungated shared experts written (deepseek / bailingmoe), each F wide


def expert_width(cfg: ModelConfig) -> int:
    """F: the widest expert of any MoE layer (narrower ones are zero-padded, which is exact)."""
    return max(cfg.moe.max_width(i) for i in range(cfg.num_layers) if cfg.is_moe_layer(i))


def target(cfg: ModelConfig) -> Target:
    """The llama.cpp architecture that reproduces ``cfg`` exactly, or :class:`GGUFExportError` saying why none does."""
    def refuse(why: str):
        raise GGUFExportError(f"a {cfg.family or 'moekit'} model cannot be exported to GGUF: {why}")

    if cfg.norm != "rms":
        refuse("its norms are LayerNorm with a bias (Orion's lineage) and llama.cpp's MoE architectures "
               "use RMSNorm")
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind != "linear":
        refuse(f"llama.cpp has no {cfg.rope_scaling.kind}-NTK RoPE scaling")
    m = cfg.moe
    if m is None:
        return Target("llama", True, False)
    if m.router != "linear":
        refuse("its router is Linear-Tanh-Linear (LLaMA-MoE's mlp gate) and every llama.cpp router is one "
               "linear layer")
    if m.score_func != "softmax":
        refuse(f"its router scores are a {m.score_func}, and the architectures its layout needs use a softmax")
    scales = {m.scale(i) for i in range(cfg.num_layers) if cfg.is_moe_layer(i)}
    if len(scales) > 1:
        refuse(f"its routed outputs are scaled differently per layer ({sorted(scales)}) and llama.cpp has "
               "one expert_weights_scale")
    scale, full = scales.pop(), cfg.num_heads * cfg.head_dim == cfg.hidden_size
    narrow = f"its heads are {cfg.num_heads} x {cfg.head_dim} wide, not hidden_size={cfg.hidden_size}, " \
             "which llama.cpp's {} requires"
    if m.shared_gate:
        if m.renormalize:
            refuse("its top-k weights are renormalised (norm_topk_prob: true) and llama.cpp's qwen2moe, the "
                   "architecture with a gated shared expert, never renormalises them")
        if m.first_dense_layers:
            refuse("it has leading dense layers and llama.cpp's qwen2moe makes every layer MoE")
        if scale != 1:
            refuse("its routed outputs are scaled and llama.cpp's qwen2moe does not scale them")
        if not full:
            refuse(narrow.format("qwen2moe"))
        return Target("qwen2moe", False, True)
    if not m.shared_width and m.renormalize and m.renormalize_eps == 0 and scale == 1 and not m.first_dense_layers:
        return Target("llama", True, False)
    shared = max(1, -(-m.shared_width // expert_width(cfg)))
    if not m.renormalize:
        if not full:
            refuse(narrow.format("deepseek"))
        return Target("deepseek", True, False, shared)
    if m.first_dense_layers:
        refuse("its top-k weights are renormalised and it has leading dense layers: llama.cpp's deepseek never "
               "renormalises and its bailingmoe has no dense layers")
    return Target("bailingmoe", True, True, shared)


def _f32(w) -> torch.Tensor:
    """A weight as float32 (a QuantWeight dequantised)."""
    return dense(w, torch.float32).detach().float()


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (x0..x_{A/2-1}, y0..) to adjacent pairs (x0, y0, x1, y1, ..)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _pad(w: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``w`` zero-padded along ``dim`` to ``size``."""
    if w.shape[dim] == size:
        return w
    shape = list(w.shape)
    shape[dim] = size - w.shape[dim]
    return torch.cat((w, w.new_zeros(shape)), dim=dim)


Entry = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]  # GGUF name, numpy shape, float32 producer


def _attention(cfg: ModelConfig, t: Target, p: str, attn) -> list[Entry]:
    D, H, G, A = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k = H * A, G * A

    def rows(param, start: int, stop: int, heads: int) -> Callable[[], torch.Tensor]:
        def get():
            w = _f32(param)[start:stop]
            return _permute(w, heads) if t.permute and heads else w
        return get

    out = [(p + "attn_q.weight", (q, D), rows(attn.wqkv, 0, q, H)),
           (p + "attn_k.weight", (k, D), rows(attn.wqkv, q, q + k, G)),
           (p + "attn_v.weight", (k, D), rows(attn.wqkv, q + k, q + 2 * k, 0)),
           (p + "attn_output.weight", (D, q), lambda: _f32(attn.wo))]
    if attn.bqkv is not None:
        out += [(p + "attn_q.bias", (q,), rows(attn.bqkv, 0, q, H)),
                (p + "attn_k.bias", (k,), rows(attn.bqkv, q, q + k, G)),
                (p + "attn_v.bias", (k,), rows(attn.bqkv, q + k, q + 2 * k, 0))]
    return out


def _mlp(p: str, suffix: str, mlp: MLP | None, D: int, width: int) -> list[Entry]:
    """A SwiGLU MLP as ffn_{gate,up,down}{suffix}, zero-padded to ``width`` (``mlp`` None: all zeros)."""
    f = mlp.width if mlp is not None else 0

    def part(which: str) -> Callable[[], torch.Tensor]:
        def get():
            if mlp is None:
                return torch.zeros((D, width) if which == "down" else (width, D))
            if which == "down":
                return _pad(_f32(mlp.w2), 1, width)
            w13 = _f32(mlp.w13)
            return _pad(w13[:f] if which == "gate" else w13[f:], 0, width)
        return get

    return [(f"{p}ffn_gate{suffix}.weight", (width, D), part("gate")),
            (f"{p}ffn_up{suffix}.weight", (width, D), part("up")),
            (f"{p}ffn_down{suffix}.weight", (D, width), part("down"))]


def _ffn(cfg: ModelConfig, t: Target, p: str, ffn) -> list[Entry]:
    D = cfg.hidden_size
    if isinstance(ffn, MLP):
        return _mlp(p, "", ffn, D, ffn.width)
    experts, F = ffn.experts, expert_width(cfg)
    E, f = experts.w2.shape[0], experts.w2.shape[-1]
    out = [(p + "ffn_gate_inp.weight", (E, D), lambda: _f32(ffn.router.proj.weight)),
           (p + "ffn_gate_exps.weight", (E, F, D), lambda: _pad(_f32(experts.w13)[:, :f], 1, F)),
           (p + "ffn_up_exps.weight", (E, F, D), lambda: _pad(_f32(experts.w13)[:, f:], 1, F)),
           (p + "ffn_down_exps.weight", (E, D, F), lambda: _pad(_f32(experts.w2), 2, F))]
    if t.arch == "qwen2moe":
        out += _mlp(p, "_shexp", ffn.shared, D, ffn.shared.width)
        out.append((p + "ffn_gate_inp_shexp.weight", (D,), lambda: _f32(ffn.shared_gate.weight).reshape(-1)))
    elif t.shared:
        out += _mlp(p, "_shexp", ffn.shared, D, t.shared * F)
    return out


def tensors(model: MoEDecoder, t: Target) -> list[Entry]:
    """Every tensor of the GGUF file: name, numpy shape, and how to compute it in float32."""
    cfg = model.config
    V, D = cfg.vocab_size, cfg.hidden_size
    out: list[Entry] = [("token_embd.weight", (V, D), lambda: _f32(model.embed.weight))]
    for i, block in enumerate(model.layers):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", (D,), lambda b=block: _f32(b.attn_norm.weight)))
        out += _attention(cfg, t, p, block.attn)
        out.append((p + "ffn_norm.weight", (D,), lambda b=block: _f32(b.ffn_norm.weight)))
        out += _ffn(cfg, t, p, block.ffn)
    out.append(("output_norm.weight", (D,), lambda: _f32(model.norm.weight)))
    if model.lm_head is not None or t.output:
        out.append(("output.weight", (V, D), lambda: _f32(model.output_weight)))
    return out


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, tied: bool):
    """The GGML type llama.cpp expects for a tensor of a ``qtype`` file (its converter's and llama-quantize's rules).

    1-D tensors, norms and routers stay F32. In a q4_0 file the output matrix (token_embd when the
    embeddings are tied) is Q8_0: llama-quantize makes it Q6_K, which gguf-py cannot write, and
    Q8_0 where rows do not fit Q6_K's blocks. A row length that is not a multiple of the quant
    block falls back to F16, as the converter does.
    """
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp" in name:
        return Q.F32
    kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    if kind == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        kind = Q.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[kind][0]:
        kind = Q.F16
    return kind


def _metadata(w, cfg: ModelConfig, t: Target, qtype: str, name: str) -> None:
    import gguf

    m = cfg.moe
    ftypes = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    w.add_name(name)
    w.add_file_type(ftypes[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None:  # linear (target() refuses the rest): positions / factor
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if m is None:
        w.add_feed_forward_length(cfg.intermediate_size)
        return
    F = expert_width(cfg)
    w.add_feed_forward_length(cfg.intermediate_size if m.first_dense_layers else F)
    w.add_expert_count(m.num_experts)
    w.add_expert_used_count(m.top_k)
    if t.arch in ("deepseek", "bailingmoe", "qwen2moe"):
        w.add_expert_feed_forward_length(F)
    if t.arch in ("deepseek", "bailingmoe"):
        w.add_expert_shared_count(t.shared)
        w.add_expert_weights_scale(m.scale(m.first_dense_layers))
        w.add_leading_dense_block_count(m.first_dense_layers)
    if t.arch == "bailingmoe":
        w.add_expert_weights_norm(True)
    if t.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(m.shared_width)


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise GGUFExportError(f"{out}: is a folder; give the path of the .gguf file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGUFExportError(f"{out.parent}: cannot create the folder ({e.strerror})") from None
    return out


def _check_model(model: MoEDecoder, qtype: str) -> Target:
    if qtype not in TYPES:
        raise GGUFExportError(f"GGUF type {qtype!r} is not supported; use one of {', '.join(TYPES)}")
    t = target(model.config)
    biased = [n for n, b in model.named_buffers() if n.endswith("router.bias") and bool(b.any())]
    if biased:
        raise GGUFExportError(f"a {model.config.family or 'moekit'} model cannot be exported to GGUF: its routers "
                              f"carry balancing biases ({biased[0]}, ...) that change which experts are chosen, "
                              "and the target architecture has none")
    return t


def export_gguf(model: MoEDecoder, out: str | Path, qtype: str = "f16", tokenizer: str | Path | None = None,
                name: str | None = None, progress: bool | None = None) -> Path:
    """Write ``model`` as a GGUF file of ``qtype`` (f16, bf16, q8_0, q4_0) at ``out``.

    tokenizer: the folder with its tokenizer files (None: a file of token ids only).
    Raises :class:`GGUFExportError` before writing anything when no llama.cpp architecture
    computes this model exactly. The file appears complete or not at all.
    """
    t = _check_model(model, qtype)
    out = _check_out(out)
    vocab = read_vocab(tokenizer, model.config.vocab_size)
    return _write(model, t, out, qtype, vocab, name or model.config.family or "moekit", progress)


def export_checkpoint(folder: str | Path, out: str | Path, qtype: str = "f16", progress: bool | None = None) -> Path:
    """Export a checkpoint folder; the config and tokenizer are checked before the weights are loaded."""
    from moekit.weights.load import load, read_config

    folder = Path(folder)
    cfg = read_config(folder)[0]
    if qtype not in TYPES:
        raise GGUFExportError(f"GGUF type {qtype!r} is not supported; use one of {', '.join(TYPES)}")
    target(cfg)
    out = _check_out(out)
    vocab = read_vocab(folder, cfg.vocab_size)
    model = load(folder, kernels="reference", progress=progress)  # the checkpoint's own dtype: values exact
    return _write(model, _check_model(model, qtype), out, qtype, vocab, folder.resolve().name, progress)


def _write(model: MoEDecoder, t: Target, out: Path, qtype: str, vocab: Vocab, name: str,
           progress: bool | None) -> Path:
    import gguf

    entries = tensors(model, t)
    tied = not any(n == "output.weight" for n, _, _ in entries)
    types = [tensor_type(n, shape, qtype, tied) for n, shape, _ in entries]
    w = gguf.GGUFWriter(None, t.arch)
    _metadata(w, model.config, t, qtype, name)
    vocab.write(w)
    total = 0
    for (n, shape, _), kind in zip(entries, types):
        block, size = gguf.GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(n, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
        total += nbytes
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not show) as bar:
            for (n, shape, get), kind in zip(entries, types):
                with torch.no_grad():
                    data = get()
                if tuple(data.shape) != shape:  # a bug in the tables above, not bad input
                    raise RuntimeError(f"GGUF tensor {n}: computed shape {tuple(data.shape)}, planned {shape}")
                arr = gguf.quants.quantize(np.ascontiguousarray(data.numpy(), dtype=np.float32), kind)
                w.write_tensor_data(arr)
                bar.update(arr.nbytes)
        w.close()
        os.replace(tmp, out)
    except OSError as e:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise GGUFExportError(f"{out}: cannot be written ({e.strerror or e})") from None
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    counts = Counter(k.name for k in types)
    log.info("wrote %s: %s, %d tensors (%s), %.1f MiB", out, t.arch, len(entries),
             ", ".join(f"{c} {k}" for k, c in counts.most_common()), total / 2**20)
    return out
