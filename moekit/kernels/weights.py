"""Typed weights of the kernel interface: a matrix (or a stack of them) in one storage format,
and the experts of an MoE layer as one object.

Shape legend: N output rows, K input columns, G = K / group scale groups per row; any leading
dims (E experts) come first. Tokens: T tokens, D model width, F expert width.

A weight is a plain floating-point tensor [..., N, K] or a :class:`QuantWeight`:

- ``int8``: ``data`` int8 [..., N, K] and ``scale`` float16 [..., N, G]:
  w[n, k] = data[n, k] * scale[n, k // group]. ``group`` = K is one scale per output channel
  (``moekit quantize --bits 8``); 32 is GGUF's Q8_0.
- ``int4``: ``data`` uint8 [..., N, K / 2]; each 32-column block of a row takes 16 bytes and
  byte j holds column j of the block in its low nibble and column j + 16 in its high nibble,
  each stored as q + 8 with q in [-8, 7] (GGUF's Q4_0 layout); ``scale`` float16 [..., N, G]
  with group 32, 64 or 128.

On the CPU backend, weights whose rows are a multiple of 32 are rearranged after loading into the
layout of its VNNI kernels, 16-row panels (:meth:`QuantWeight.to_panels`):

- int8 (columns a multiple of 4): ``data`` becomes uint8 [..., N, K], each panel's bytes [K / 4, 16, 4]
  holding q + 128 (one scale per row: moekit/kernels/cpu/qpanel.h; grouped: qpanelg.h);
- int4: ``data`` stays uint8 [..., N, K / 2], each panel's bytes [K / 8, 16, 4] (the rows' Q4_0 bytes
  four at a time; moekit/kernels/cpu/qpanelg.h);
- with groups (int4, grouped int8), ``scale`` becomes float16 [..., N / 16, G, 16], a group's 16 rows
  side by side (one scale per row stays [..., N, 1], the same bytes).

:meth:`QuantWeight.values`, :meth:`QuantWeight.dequantize`, :meth:`QuantWeight.scale_rows` and
:func:`weight_views` (saving, export) give rows whatever the layout.

Quantisation is symmetric and round-to-nearest: scale = max|w| / qmax over a group (qmax 127
or 7), stored in float16 rounded up so that no value clips. :meth:`QuantWeight.dequantize` is
the numerical spec every kernel is tested against. docs/quantization.md has the file layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FORMATS = {"int8": 127, "int4": 7}  # format -> qmax
INT4_GROUPS = (32, 64, 128)
BLOCK = 32  # int4 nibble-interleave block (columns)
PANEL = 16  # rows of a panel (QuantWeight.to_panels)
QUANT_PIECE = 4 << 20  # float32 bytes of the rows quantize_into quantises at once


def check_format(fmt: str, K: int, group: int) -> None:
    """Raise ValueError naming the problem if a [.., N, K] weight cannot be stored as ``fmt`` with ``group``."""
    if fmt not in FORMATS:
        raise ValueError(f"weight format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if group < 1 or K % group:
        raise ValueError(f"group size {group} does not divide the {K} input columns")
    if fmt == "int4" and group not in INT4_GROUPS:
        raise ValueError(f"int4 group size {group} is not supported; use one of {INT4_GROUPS}")
    if fmt == "int8" and group != K and group % BLOCK:
        raise ValueError(f"int8 group size {group}: use the whole row ({K}) or a multiple of {BLOCK}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7] of shape [..., K] (K a multiple of 32) -> uint8 [..., K / 2] (Q4_0 layout)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8).unflatten(-1, (-1, 2, BLOCK // 2))  # [.., blocks, half, 16]
    return (u[..., 0, :] | (u[..., 1, :] << 4)).flatten(-2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K / 2] (Q4_0 layout) -> int8 values in [-8, 7] of shape [..., K]."""
    b = packed.unflatten(-1, (-1, BLOCK // 2))
    q = torch.stack((b & 0xF, b >> 4), dim=-2).to(torch.int8) - 8  # [.., blocks, half, 16]
    return q.flatten(-3)


def interleave(u: torch.Tensor) -> torch.Tensor:
    """uint8 rows [..., N, W] (N % 16 == 0, W % 4 == 0) -> 16-row panels [..., N, W], each [W / 4, 16, 4]:
    the rows' bytes four at a time."""
    *lead, N, W = u.shape
    return u.reshape(*lead, N // PANEL, PANEL, W // 4, 4).transpose(-3, -2).reshape(*lead, N, W)


def deinterleave(p: torch.Tensor) -> torch.Tensor:
    """16-row panels [..., N, W] -> the uint8 rows [..., N, W] (the inverse of :func:`interleave`)."""
    *lead, N, W = p.shape
    return p.reshape(*lead, N // PANEL, W // 4, PANEL, 4).transpose(-3, -2).reshape(*lead, N, W)


def to_panels(q: torch.Tensor) -> torch.Tensor:
    """int8 values [..., N, K] (N % 16 == 0, K % 4 == 0) -> uint8 panels [..., N, K]: q + 128, each 16 rows
    stored as [K / 4, 16, 4]."""
    return interleave(q.view(torch.uint8) ^ 0x80)


def from_panels(p: torch.Tensor) -> torch.Tensor:
    """uint8 panels [..., N, K] -> the int8 values [..., N, K] (the inverse of :func:`to_panels`)."""
    return (deinterleave(p) ^ 0x80).view(torch.int8)


def scales_to_panels(s: torch.Tensor) -> torch.Tensor:
    """float16 scales [..., N, G] (N % 16 == 0) -> [..., N / 16, G, 16]: each group's 16 rows side by side."""
    return s.unflatten(-2, (-1, PANEL)).transpose(-2, -1).contiguous()


def scales_from_panels(s: torch.Tensor) -> torch.Tensor:
    """[..., N / 16, G, 16] -> the scales [..., N, G] (the inverse of :func:`scales_to_panels`)."""
    return s.transpose(-2, -1).flatten(-3, -2)


def _scales(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """float16 scales >= absmax / qmax (rounded up, so no value clips); 1 for all-zero groups."""
    s = absmax.float() / qmax
    s16 = s.to(torch.float16)
    low = s16.float() < s
    s16 = torch.where(low, torch.nextafter(s16, torch.full_like(s16, torch.inf)), s16)
    return torch.where(absmax > 0, s16, torch.ones_like(s16))


def _quantize(w_NK: torch.Tensor, fmt: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of one matrix in ``fmt`` (see the module doc)."""
    qmax = FORMATS[fmt]
    g = w_NK.float().unflatten(-1, (-1, group))  # [N, G, group]
    scale = _scales(g.abs().amax(-1), qmax)
    q = torch.round(g / scale.float()[..., None]).clamp_(-qmax - (fmt == "int4"), qmax).flatten(-2)
    return (q.to(torch.int8) if fmt == "int8" else pack_int4(q)), scale


@torch.no_grad()
def quantize_into(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Quantise a floating-point ``w`` [..., N, K] into ``data`` and ``scale``, (views of) a QuantWeight's in
    rows (not panels) with the same leading shape: int8 data or int4 packed in uint8, K / scale columns per
    scale; ``dtype``: round the values to it first (the model's, as loading then quantising does). A piece
    of rows at a time, so the float32 working copy stays near QUANT_PIECE bytes."""
    K = w.shape[-1]
    fmt, group = "int8" if data.dtype == torch.int8 else "int4", K // scale.shape[-1]
    rows = w.reshape(-1, K)
    out_d = data if data.dim() == 2 else data.view(-1, data.shape[-1])
    out_s = scale if scale.dim() == 2 else scale.view(-1, scale.shape[-1])
    step = max(1, QUANT_PIECE // (4 * K))
    for r in range(0, len(rows), step):
        piece = rows[r:r + step]
        out_d[r:r + step], out_s[r:r + step] = _quantize(piece if dtype is None else piece.to(dtype), fmt, group)


class QuantWeight(nn.Module):
    """A weight [..., N, K] stored as ``int8`` or ``int4`` with float16 group scales (see module doc).

    A module, so that ``.to(device)``, ``state_dict`` and meta-device materialisation carry its
    two buffers; ``.to(dtype)`` never changes them (the storage format is fixed at quantisation).
    """

    def __init__(self, fmt: str, shape, group: int | None = None, device=None):
        super().__init__()
        *lead, N, K = shape
        group = K if group is None else group
        check_format(fmt, K, group)
        self.format, self.group, self.shape = fmt, group, torch.Size(shape)
        cols, kind = (K, torch.int8) if fmt == "int8" else (K // 2, torch.uint8)
        self.register_buffer("data", torch.zeros(*lead, N, cols, dtype=kind, device=device))
        self.register_buffer("scale", torch.ones(*lead, N, K // group, dtype=torch.float16, device=device))

    @classmethod
    @torch.no_grad()
    def quantize(cls, w: torch.Tensor, fmt: str, group: int | None = None) -> QuantWeight:
        """Round-to-nearest symmetric quantisation of a floating-point weight [..., N, K]
        (:func:`quantize_into`)."""
        out = cls(fmt, w.shape, group, device=w.device)
        quantize_into(w.detach(), out.data, out.scale)
        return out

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def panels(self) -> bool:
        """Whether the weight is in the CPU kernels' 16-row panels (:meth:`to_panels`): int8 data as uint8,
        int4 scales with a dim more than the data."""
        if self.format == "int8":
            return self.data.dtype == torch.uint8
        return self._panel_scales

    @property
    def _panel_scales(self) -> bool:
        return self.scale.dim() == self.data.dim() + 1

    @torch.no_grad()
    def to_panels(self) -> bool:
        """Rearrange the rows into 16-row panels in place, one matrix at a time (no second copy of the
        stack). Rows a multiple of 32 (so that the kernels' 32-row blocks and a w13 stack's up half start on
        a panel), and for int8 columns of 4; anything else stays in rows. Returns whether it now is in
        panels."""
        N, K = self.shape[-2:]
        if self.panels or N % (2 * PANEL) or (self.format == "int8" and K % 4):
            return self.panels
        data = self.data.view(torch.uint8)
        for m in data.view(-1, N, data.shape[-1]):
            m.copy_(interleave(m) ^ (0x80 if self.format == "int8" else 0))
        self.data = data
        if self.format == "int4" or self.group != K:  # (int4's panels are told by their scales, even one a row)
            self.scale = scales_to_panels(self.scale)
        return True

    def _values(self, data: torch.Tensor) -> torch.Tensor:
        if self.format == "int4":
            return unpack_int4(deinterleave(data) if self.panels else data)
        return from_panels(data) if self.panels else data

    def values(self) -> torch.Tensor:
        """The integer values q [..., N, K] as int8."""
        return self._values(self.data)

    def scale_rows(self) -> torch.Tensor:
        """The float16 scales [..., N, G], whatever the layout (in panels: a copy)."""
        return scales_from_panels(self.scale) if self._panel_scales else self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        """The weight [..., N, K] in ``dtype`` (``index``: only that matrix of the leading dim):
        q * scale, computed in float32."""
        data, scale = (self.data, self.scale) if index is None else (self.data[index], self.scale[index])
        scale = scales_from_panels(scale) if self._panel_scales else scale
        return (self._values(data).float() * scale.float().repeat_interleave(self.group, dim=-1)).to(dtype)

    def _apply(self, fn, recurse=True):
        old = (self.data, self.scale)
        super()._apply(fn, recurse)
        if (self.data.dtype, self.scale.dtype) != (old[0].dtype, old[1].dtype):  # model.to(dtype): the stored
            self.data, self.scale = old[0].to(self.data.device), old[1].to(self.scale.device)  # values stay
        return self

    def extra_repr(self) -> str:
        return f"{self.format}, shape={list(self.shape)}, group={self.group}" + (", panels" if self.panels else "")


Weight = torch.Tensor | QuantWeight


def dense(w: Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A weight as a floating-point tensor (dequantised if stored quantised; ``dtype`` for that case)."""
    if isinstance(w, QuantWeight):
        return w.dequantize(dtype or torch.float32)
    return w


def quantized(*ws) -> bool:
    """Whether any of these weights is stored quantised."""
    return any(isinstance(w, QuantWeight) for w in ws)


def weight_views(w: Weight, name: str, index: int | None = None, rows: tuple[int, int] | None = None,
                 width: int | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint views of (part of) a weight: matrix ``index`` of the leading dim, rows [a, b), the
    first ``width`` columns. A quantised weight gives its data under ``name`` and its float16
    scales under ``name + "_scale"`` (``width`` must then end on a scale group); panels give their rows,
    a copy (views to read, not to fill)."""
    def part(t: torch.Tensor, cols: int | None, unpanel=None) -> torch.Tensor:
        t = t if index is None else t[index]
        t = t if unpanel is None else unpanel(t)
        t = t if rows is None else t[..., rows[0]:rows[1], :]
        return t if cols is None else t[..., :cols]

    if not isinstance(w, QuantWeight):
        return {name: part(w, width)}
    int8 = w.format == "int8"
    data_rows = (from_panels if int8 else deinterleave) if w.panels else None
    scale_rows = scales_from_panels if w.scale.dim() == w.data.dim() + 1 else None
    if width is None or width == w.shape[-1]:
        return {name: part(w.data, None, data_rows), f"{name}_scale": part(w.scale, None, scale_rows)}
    if width % w.group:
        raise ValueError(f"{name}: a width of {width} columns does not end on a scale group of {w.group}")
    return {name: part(w.data, width if int8 else width // 2, data_rows),
            f"{name}_scale": part(w.scale, width // w.group, scale_rows)}


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """What ``moe_experts`` computes with: routed experts plus an optional always-on shared expert.

    w13 [E, 2F, D] stacks each expert's gate rows then up rows; w2 [E, D, F] is the down
    projection; either may be a :class:`QuantWeight`. The shared expert (w13 [2Fs, D], w2 [D, Fs])
    is added with weight ``shared_gate_T[t]`` (1 when None).
    """

    w13: Weight
    w2: Weight
    shared_w13: Weight | None = None
    shared_w2: Weight | None = None
    shared_gate_T: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def has_shared(self) -> bool:
        return self.shared_w13 is not None

    def tensors(self) -> tuple:
        """The weights present (routed, then shared)."""
        return (self.w13, self.w2) + ((self.shared_w13, self.shared_w2) if self.has_shared else ())

    def is_quantized(self) -> bool:
        return quantized(*self.tensors())
