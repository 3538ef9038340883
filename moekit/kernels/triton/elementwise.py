"""Row-wise kernels: RMSNorm, SiLU-and-multiply, rotate-half RoPE (one launch each, fp32 math).

Shape legend: N rows, D row width, F half width of a [gate | up] row, B batch,
H heads, T tokens, A head width (AP: next power of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    x = tl.load(x_ptr + row * D + d, mask=ok, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    y = (x32 * rstd).to(x.dtype).to(tl.float32) * w  # rounded to x's dtype before the scale, as the reference
    tl.store(y_ptr + row * D + d, y.to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm: normalise in float32, cast back, scale by ``w`` (same semantics as the reference)."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, w, y, D, float(eps), BLOCK_D=triton.next_power_of_2(D))
    return y.view(x.shape)


@triton.jit
def _silu_mul_kernel(h_ptr, y_ptr, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = f < F
    g = tl.load(h_ptr + row * 2 * F + f, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + row * 2 * F + F + f, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * F + f, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=ok)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up]: [..., 2F] -> [..., F]."""
    F = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * F).contiguous()
    y = torch.empty(h2.shape[0], F, dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(F))
    if h2.shape[0]:
        _silu_mul_kernel[(h2.shape[0], triton.cdiv(F, block))](h2, y, F, BLOCK=block)
    return y.view(*h.shape[:-1], F)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T, A, sx_b, sx_h, sx_t, sc_b, sc_t,
                   BLOCK_T: tl.constexpr, AP: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    a = tl.arange(0, AP)
    half = A // 2
    partner = tl.where(a < half, a + half, a - half)
    ok = (t[:, None] < T) & (a[None, :] < A)
    x_row = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + t[:, None].to(tl.int64) * sx_t
    x = tl.load(x_row + a[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(x_row + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    c_off = b.to(tl.int64) * sc_b + t[:, None].to(tl.int64) * sc_t + a[None, :]
    cos = tl.load(cos_ptr + c_off, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + c_off, mask=ok, other=0.0).to(tl.float32)
    rot = tl.where(a[None, :] < half, -xp, xp)
    out = y_ptr + (bh.to(tl.int64) * T + t[:, None]) * A + a[None, :]
    tl.store(out, (x * cos + rot * sin).to(y_ptr.dtype.element_ty), mask=ok)


def rotary(x_BHTA: torch.Tensor, cos_BTA: torch.Tensor, sin_BTA: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE into a new contiguous [B, H, T, A] (``x`` may be a strided view of q/k/v)."""
    B, H, T, A = x_BHTA.shape
    if x_BHTA.stride(-1) != 1:
        x_BHTA = x_BHTA.contiguous()
    cos = cos_BTA.expand(B, T, A)
    sin = sin_BTA.expand(B, T, A)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(B, H, T, A, dtype=x_BHTA.dtype, device=x_BHTA.device)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // triton.next_power_of_2(A)))
    if y.numel():
        _rotary_kernel[(B * H, triton.cdiv(T, block_t))](
            x_BHTA, cos, sin, y, H, T, A, x_BHTA.stride(0), x_BHTA.stride(1), x_BHTA.stride(2), cos.stride(0),
            cos.stride(1), BLOCK_T=block_t, AP=triton.next_power_of_2(A))
    return y
