"""A static KV cache for a batch of left-padded sequences.

Shape legend: L layers, B rows, G key/value heads, S cache capacity, T new
tokens, A head width.

Rows are left-padded to a common length, so every row writes its new keys at
the same slot; ``pad[b]`` slots at the start of row b are masked out and
positions count from the first real token.
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
