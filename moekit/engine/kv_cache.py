"""KV caches: a static one for a left-padded batch, and the engine's paged one.

Shape legend: L layers, B rows, G key/value heads, S cache capacity, T new
tokens, A head width, H query heads; paged: P blocks, C tokens per block, N new
tokens of all requests in a step, R requests in a step, M block-table width.

A cache is what ``MoEDecoder.forward(..., cache=)`` talks to: ``positions(T)`` /
``position_limit(T)`` for RoPE, ``prepare(T)`` before the layers, ``attend(layer, q,
k, v, kernels)`` in each attention layer (store this step's keys/values, attend over
the history), ``commit(T)`` after.

:class:`KVCache`: rows are left-padded to a common length, so every row writes its new
keys at the same slot; ``pad[b]`` slots at the start of row b are masked out and
positions count from the first real token. Used for plain model-level decoding.

:class:`PagedKVCache` + :class:`PagedBatch`: the engine's cache. Keys/values live in
fixed-size blocks of one pool; a step's tokens (decodes and prefill chunks of many
requests, back to back as one row) find their history through per-request block tables.
"""

from __future__ import annotations

import torch

from moekit.config import ModelConfig


class KVCache:
    """Preallocated keys/values for every layer; the model appends T tokens per forward."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", pad: torch.Tensor | None = None):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k_LBGSA = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LBGSA = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # slots filled, the same for every row
        self.pad_B = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self._mask_BTS: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k_LBGSA.shape[1]

    def positions(self, T: int) -> torch.Tensor:
        """RoPE positions [B, T] of the next T tokens (counting from each row's first real token)."""
        slots = torch.arange(self.length, self.length + T, device=self.pad_B.device)
        return (slots[None, :] - self.pad_B[:, None]).clamp_min(0)

    def position_limit(self, T: int) -> int:
        """A bound on max(positions(T)) + 1 known on the host (no device sync)."""
        return self.length + T

    def prepare(self, T: int) -> None:
        """Build the attention mask for the next T tokens (called once per forward, shared by all layers)."""
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} + {T} tokens exceed capacity {self.capacity}")
        end = self.length + T
        q = torch.arange(self.length, end, device=self.pad_B.device)[:, None]  # [T, 1] query slots
        s = torch.arange(end, device=self.pad_B.device)[None, :]  # [1, S] key slots
        causal = s <= q
        real = s[None] >= self.pad_B[:, None, None]  # [B, 1, S]
        own = s == q  # a padding query still sees itself, so softmax never meets an empty row
        self._mask_BTS = (causal[None] & real) | own[None]

    def update(self, layer: int, k_BGTA: torch.Tensor, v_BGTA: torch.Tensor):
        """Store this step's keys/values; return all keys/values so far and the mask [B, T, S]."""
        T = k_BGTA.shape[2]
        end = self.length + T
        self.k_LBGSA[layer, :, :, self.length:end] = k_BGTA
        self.v_LBGSA[layer, :, :, self.length:end] = v_BGTA
        return self.k_LBGSA[layer, :, :, :end], self.v_LBGSA[layer, :, :, :end], self._mask_BTS

    def attend(self, layer: int, q_BHTA, k_BGTA, v_BGTA, kernels) -> torch.Tensor:
        """Store this step's keys/values, attend over everything so far: o [B, T, H * A]."""
        k_BGSA, v_BGSA, mask_BTS = self.update(layer, k_BGTA, v_BGTA)
        B, H, T, A = q_BHTA.shape
        return kernels.attention(q_BHTA, k_BGSA, v_BGSA, mask_BTS).transpose(1, 2).reshape(B, T, H * A)

    def commit(self, T: int) -> None:
        """Advance past the T tokens every layer has now stored."""
        self.length += T
        self._mask_BTS = None

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences), keeping their order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.pad_B.device)
        self.k_LBGSA = self.k_LBGSA.index_select(1, rows)
        self.v_LBGSA = self.v_LBGSA.index_select(1, rows)
        self.pad_B = self.pad_B.index_select(0, rows)

    def nbytes(self) -> int:
        return 2 * self.k_LBGSA.numel() * self.k_LBGSA.element_size()


class PagedKVCache:
    """The block pool's tensors: keys and values [L, P, G, C, A] (allocated uninitialised: memory pages
    are only touched as blocks are first written, and attention never reads past a request's length)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        shape = (cfg.num_layers, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.k_LPGCA = torch.empty(shape, dtype=dtype, device=device)
        self.v_LPGCA = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block, keys and values of every layer."""
        elt = torch.finfo(dtype).bits // 8
        return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * elt


class PagedBatch:
    """One engine step's view of a :class:`PagedKVCache`: N tokens of R requests, back to back.

    positions_N: each token's position; slots_N: block * C + offset where its keys/values go;
    table_RM (int32): each request's blocks; starts_R1 (int32): where each request's tokens
    begin in the step; lens_R (int32): each request's keys after this step; limit: a host-side
    bound on the positions + 1.
    """

    def __init__(self, kv: PagedKVCache, positions_N, slots_N, table_RM, starts_R1, lens_R, limit: int):
        self.kv, self.positions_N, self.slots_N, self.limit = kv, positions_N, slots_N, limit
        self.table_RM, self.starts_R1, self.lens_R = table_RM, starts_R1, lens_R
        self.block_N = self.offset_N = None

    def positions(self, T: int) -> torch.Tensor:
        return self.positions_N[None]

    def position_limit(self, T: int) -> int:
        return self.limit

    def sequence_lengths(self) -> torch.Tensor:
        """[1, N]: each token's request length after this step (dynamic-NTK RoPE scales per request)."""
        counts = (self.starts_R1[1:] - self.starts_R1[:-1]).long()
        return torch.repeat_interleave(self.lens_R.long(), counts, output_size=self.positions_N.shape[0])[None]

    def prepare(self, T: int) -> None:
        """Split the slots into (block, offset) once per forward (inside a captured graph too)."""
        C = self.kv.block_size
        self.block_N, self.offset_N = self.slots_N // C, self.slots_N % C

    def commit(self, T: int) -> None:
        pass

    def attend(self, layer: int, q_BHTA, k_BGTA, v_BGTA, kernels) -> torch.Tensor:
        """Write the step's keys/values into their slots, attend through the block tables: o [1, N, H * A]."""
        _, H, N, A = q_BHTA.shape
        k_PGCA, v_PGCA = self.kv.k_LPGCA[layer], self.kv.v_LPGCA[layer]
        k_PGCA[self.block_N, :, self.offset_N] = k_BGTA[0].transpose(0, 1)
        v_PGCA[self.block_N, :, self.offset_N] = v_BGTA[0].transpose(0, 1)
        q_NHA = q_BHTA[0].transpose(0, 1).contiguous()
        o_NHA = kernels.paged_attention(q_NHA, k_PGCA, v_PGCA, self.table_RM, self.starts_R1, self.lens_R)
        return o_NHA.reshape(1, N, H * A)
