"""Token alignment by expert: the (token, slot) pairs grouped by expert, each group padded to BLOCK_M.

Shape legend: T tokens, K routed slots per token, C shared-expert chunks (extra slots
every token has), S = T * (K + C) slots, E routed experts, EP = next power of two of
E + C, U an upper bound on the padded length, NB = U / BLOCK_M blocks.

Slot ``s`` is token ``s // (K + C)``'s ``s % (K + C)``-th choice: routed expert
``ids[t, j]`` for j < K, else the virtual expert ``E + (j - K)`` (a chunk of the
shared expert, see ``moe.py``). The result is what a grouped GEMM needs to give each
program one expert and BLOCK_M rows:

- ``sorted_U``: slots grouped by expert (ascending), in slot order within an expert
  (stable), each group padded to a multiple of BLOCK_M with the sentinel S;
- ``block_expert_NB``: the expert of each BLOCK_M block (-1 past the end);
- ``total``: the padded length actually used (a one-element device tensor, so no
  host sync: the GEMM grid uses U and programs past ``total`` return at once).

One program does it all (counts, prefix sum, stable scatter); alignment is cheap
next to the GEMMs it feeds, and a single program needs no grid-wide sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, total_ptr, S, E, U, NB,
                  K: tl.constexpr, C: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK: tl.constexpr):
    cols = tl.arange(0, EP)
    lane = tl.arange(0, BLOCK)
    counts = tl.zeros((EP,), dtype=tl.int32)
    for s0 in range(0, S, BLOCK):  # 1. tokens per expert
        e = _expert_of(ids_ptr, s0 + lane, S, E, K, C, EP)
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(total_ptr, total)
    for b0 in range(0, NB, BLOCK):  # 2. the expert of every block
        pos = (b0 + lane) * BLOCK_M
        e = tl.sum((ends[None, :] <= pos[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b0 + lane, tl.where(pos < total, e, -1), mask=b0 + lane < NB)
    for u0 in range(0, U, BLOCK):  # 3. sentinels in the padding (disjoint from step 4's writes)
        u = u0 + lane
        e = tl.sum((ends[None, :] <= u[:, None]).to(tl.int32), axis=1)
        at = cols[None, :] == e[:, None]
        first = tl.sum(tl.where(at, starts[None, :], 0), axis=1)
        used = tl.sum(tl.where(at, counts[None, :], 0), axis=1)
        tl.store(sorted_ptr + u, S, mask=(u < U) & ((u - first >= used) | (u >= total)))
    cursor = starts
    for s0 in range(0, S, BLOCK):  # 4. stable scatter: rank within the expert, in slot order
        s = s0 + lane
        hot = (_expert_of(ids_ptr, s, S, E, K, C, EP)[:, None] == cols[None, :]).to(tl.int32)
        rank = tl.sum(tl.cumsum(hot, axis=0) * hot, axis=1) - 1
        base = tl.sum(hot * cursor[None, :], axis=1)
        tl.store(sorted_ptr + base + rank, s, mask=s < S)
        cursor += tl.sum(hot, axis=0)


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
    block = max(16, min(triton.next_power_of_2(max(S, U // block_m)), 8192 // EP, 256))
    _align_kernel[(1,)](ids_TK.contiguous(), sorted_U, block_expert, total, S, num_experts, U, U // block_m,
                        K=K, C=C, EP=EP, BLOCK_M=block_m, BLOCK=block, num_warps=4)
    return sorted_U, block_expert, total
