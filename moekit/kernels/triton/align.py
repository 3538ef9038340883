"""Token alignment by expert: the (token, slot) pairs grouped by expert, each group padded to BLOCK_M.

Shape legend: T tokens, K routed slots per token, C shared-expert chunks (extra slots
every token has), S = T * (K + C) slots, E routed experts, EP = next power of two of
E + C, N chunks of CHUNK slots, U an upper bound on the padded length, NB = U / BLOCK_M.

Slot ``s`` is token ``s // (K + C)``'s ``s % (K + C)``-th choice: routed expert
``ids[t, j]`` for j < K, else the virtual expert ``E + (j - K)`` (a chunk of the
shared expert, see ``moe.py``). The result is what a grouped GEMM needs to give each
program one expert and BLOCK_M rows:

- ``sorted_U``: slots grouped by expert (ascending), in slot order within an expert
  (stable), each group padded to a multiple of BLOCK_M with the sentinel S;
- ``block_expert_NB``: the expert of each BLOCK_M block (-1 past the end);
- ``total``: the padded length actually used (a one-element device tensor, so no
  host sync: the GEMM grid uses U and programs past ``total`` return at once).

Two launches, each with one program per chunk of CHUNK slots: ``count`` writes every
chunk's per-expert counts; ``place`` sums them (every program redundantly: N x EP
integers) into expert starts and its own chunk's offsets, then scatters its slots by
their rank within the chunk, and writes its share of the block experts and padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 128  # slots per program


@triton.jit
def _expert_of(ids_ptr, s, S, E, K: tl.constexpr, C: tl.constexpr, EP: tl.constexpr):
    """Expert of each slot in ``s`` (EP for slots past S)."""
    t = s // (K + C)
    j = s % (K + C)
    routed = (j < K) & (s < S)
    e = tl.load(ids_ptr + t.to(tl.int64) * K + j, mask=routed, other=0).to(tl.int32)
    e = tl.where(routed, e, E + j - K)
    return tl.where(s < S, e, EP)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, S, E, K: tl.constexpr, C: tl.constexpr, EP: tl.constexpr,
                  CHUNK: tl.constexpr):
    c = tl.program_id(0)
    cols = tl.arange(0, EP)
    e = _expert_of(ids_ptr, c * CHUNK + tl.arange(0, CHUNK), S, E, K, C, EP)
    tl.store(counts_ptr + c * EP + cols, tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0))


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, total_ptr, S, E, U, NB, N,
                  K: tl.constexpr, C: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    cols = tl.arange(0, EP)
    rows = tl.arange(0, CHUNK)
    counts = tl.zeros((EP,), dtype=tl.int32)  # per expert, all chunks
    before = tl.zeros((EP,), dtype=tl.int32)  # per expert, chunks before this one
    for c0 in range(0, N, CHUNK):
        r = c0 + rows
        part = tl.load(counts_ptr + r[:, None] * EP + cols[None, :], mask=r[:, None] < N, other=0)
        counts += tl.sum(part, axis=0)
        before += tl.sum(tl.where(r[:, None] < c, part, 0), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    if c == 0:
        tl.store(total_ptr, total)
    # this chunk's slots, stable: rank within the chunk among slots of the same expert
    s = c * CHUNK + rows
    hot = (_expert_of(ids_ptr, s, S, E, K, C, EP)[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(hot, axis=0) * hot, axis=1) - 1
    base = tl.sum(hot * (starts + before)[None, :], axis=1)
    tl.store(sorted_ptr + base + rank, s, mask=s < S)
    # this chunk's share of the block experts, then of the padding (disjoint from every program's slot writes)
    per_b = tl.cdiv(NB, N)
    for b0 in range(c * per_b, (c + 1) * per_b, CHUNK):
        b = b0 + rows
        pos = b * BLOCK_M
        e = tl.sum((ends[None, :] <= pos[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(pos < total, e, -1), mask=(b < NB) & (b < (c + 1) * per_b))
    per_u = tl.cdiv(U, N)
    for u0 in range(c * per_u, (c + 1) * per_u, CHUNK):
        u = u0 + rows
        at = cols[None, :] == tl.sum((ends[None, :] <= u[:, None]).to(tl.int32), axis=1)[:, None]
        first = tl.sum(tl.where(at, starts[None, :], 0), axis=1)
        used = tl.sum(tl.where(at, counts[None, :], 0), axis=1)
        pad = (u - first >= used) | (u >= total)
        tl.store(sorted_ptr + u, S, mask=pad & (u < U) & (u < (c + 1) * per_u))


def padded_bound(slots: int, experts: int, block_m: int) -> int:
    """An upper bound on the padded length: every non-empty expert wastes at most block_m - 1 rows."""
    return triton.cdiv(slots + min(experts, slots) * (block_m - 1), block_m) * block_m


def align(ids_TK: torch.Tensor, num_experts: int, shared_chunks: int, block_m: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_U int32, block_expert_NB int32, total int32[1]) for routed ids [T, K] plus C shared slots."""
    T, K = ids_TK.shape
    C = shared_chunks
    S = T * (K + C)
    U = padded_bound(S, num_experts + C, block_m)
    dev = ids_TK.device
    sorted_U = torch.empty(U, dtype=torch.int32, device=dev)
    block_expert = torch.empty(U // block_m, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    EP = triton.next_power_of_2(num_experts + C)
    N = max(1, triton.cdiv(S, CHUNK))
    counts = torch.empty(N, EP, dtype=torch.int32, device=dev)
    ids = ids_TK.contiguous()
    warps = 4 if EP <= 64 else 8
    _count_kernel[(N,)](ids, counts, S, num_experts, K=K, C=C, EP=EP, CHUNK=CHUNK, num_warps=warps)
    _place_kernel[(N,)](ids, counts, sorted_U, block_expert, total, S, num_experts, U, U // block_m, N,
                        K=K, C=C, EP=EP, BLOCK_M=block_m, CHUNK=CHUNK, num_warps=warps)
    return sorted_U, block_expert, total
