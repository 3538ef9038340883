"""Paged attention: many requests' new tokens against a KV cache stored in blocks (vLLM-style).

Shape legend: N new query tokens (all requests back to back), H query heads, A head width
(BA: A rounded up to a power of two), P blocks in the pool, G kv heads, C tokens per block,
R requests, M block-table width, BM queries per program, BN keys per step, QB query blocks.

One program per (query block, head): BM consecutive queries of ONE request (a decode request
fills one row of its block) run an online softmax over key tiles of BN keys, each key row
gathered through the block table (row j: ``k[table[r, j // C], g, j % C]``). Key tiles stop
at the block's last visible key, so slots past ``lens[r]`` and blocks outside the table
(garbage, possibly NaN) are never loaded. The grid is fixed by the shapes, N // BM + R query
blocks at most, and each program finds its request on the device (``searchsorted`` over the
cumulative block counts): no host syncs, so a CUDA graph can capture the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.triton.interpret import interpreted


@triton.jit
def _paged_kernel(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, starts_ptr, lens_ptr, req_ptr, cum_ptr, R, H, A,
                  stride_qn, stride_qh, stride_kp, stride_kg, stride_kc, stride_vp, stride_vg, stride_vc, stride_t,
                  scale, GROUP: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_A: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.load(req_ptr + pid)
    if r >= R:  # past the last query block
        return
    q0 = tl.load(starts_ptr + r)
    n = tl.load(starts_ptr + r + 1) - q0
    S = tl.load(lens_ptr + r)
    blk = pid - (tl.load(cum_ptr + r) - (n + BLOCK_M - 1) // BLOCK_M)  # this request's query block
    g = h // GROUP
    m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < n
    pos = S - n + m  # each query's position: it sees keys 0 .. pos
    d = tl.arange(0, BLOCK_A)
    d_ok = d < A
    rows = (q0 + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qn + h * stride_qh + d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_A), tl.float32)
    hi = tl.minimum(S, S - n + blk * BLOCK_M + BLOCK_M)  # keys visible to the block's last query
    j = tl.arange(0, BLOCK_N)
    for j0 in range(0, hi, BLOCK_N):
        jj = j0 + j
        j_ok = jj < hi
        page = tl.load(table_ptr + r.to(tl.int64) * stride_t + jj // C, mask=j_ok, other=0).to(tl.int64)
        slot = (jj % C).to(tl.int64)
        kv_ok = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (page * stride_kp + g * stride_kg + slot * stride_kc)[:, None] + d[None, :], mask=kv_ok,
                    other=0.0)
        v = tl.load(v_ptr + (page * stride_vp + g * stride_vg + slot * stride_vc)[:, None] + d[None, :], mask=kv_ok,
                    other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(j_ok[None, :] & (jj[None, :] <= pos[:, None]), s, float("-inf"))
        new = tl.maximum(mx, tl.max(s, 1))  # key 0 is visible to every query: finite after the first tile
        corr = tl.exp(mx - new)
        p = tl.exp(s - new[:, None])
        den = den * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        mx = new
    out = acc / den[:, None]
    tl.store(o_ptr + (rows[:, None] * H + h) * A + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def paged_attention(q_NHA, k_PGCA, v_PGCA, table_RM, starts_R1, lens_R, scale=None, block_m: int = 16,
                    block_n: int = 64) -> torch.Tensor:
    """o [N, H, A]: causal attention over the paged KV cache (see reference.paged_attention)."""
    N, H, A = q_NHA.shape
    _, G, C, _ = k_PGCA.shape
    R = lens_R.shape[0]
    out = torch.empty(N, H, A, dtype=q_NHA.dtype, device=q_NHA.device)
    if N == 0 or R == 0:
        return out
    starts = starts_R1.to(torch.int32)
    n_R = starts[1:] - starts[:-1]
    cum_R = torch.cumsum((n_R + block_m - 1) // block_m, 0).to(torch.int32)  # query blocks up to request r
    QB = N // block_m + R  # an upper bound on the query blocks: a fixed grid
    req_QB = torch.searchsorted(cum_R, torch.arange(QB, device=cum_R.device, dtype=torch.int32), right=True)
    table = table_RM.to(torch.int32)
    upcast = interpreted(_paged_kernel) and q_NHA.dtype == torch.bfloat16  # numpy has no bf16 matmul
    _paged_kernel[(QB, H)](
        q_NHA, k_PGCA, v_PGCA, out, table, starts, lens_R.to(torch.int32), req_QB.to(torch.int32), cum_R, R, H, A,
        q_NHA.stride(0), q_NHA.stride(1), *k_PGCA.stride()[:3], *v_PGCA.stride()[:3], table.stride(0),
        A ** -0.5 if scale is None else float(scale), GROUP=H // G, C=C, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_A=max(16, triton.next_power_of_2(A)), PRECISION="ieee" if q_NHA.dtype == torch.float32 else "tf32",
        UPCAST=upcast)
    return out
