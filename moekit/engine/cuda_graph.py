"""Decode steps on fixed shapes, captured as CUDA graphs: a step runner, nothing more.

Shape legend: Bb rows of a batch-size bucket, M block-table width, V vocabulary.

A decode step launches hundreds of small kernels (about 17 per layer); replaying them as
one captured graph removes the CPU launch cost. A graph fixes every shape and pointer, so
:class:`GraphRunner` keeps, per batch-size bucket, static input tensors (token ids,
positions, cache slots, block tables of the full context width, key counts) and one
:class:`~moekit.engine.kv_cache.PagedBatch` over them. The engine hands it a pure decode
step (one token per request, at most the largest bucket): rows are copied in, padding rows
point at block 0 (the pool's scratch page), the graph is replayed, and the logits of the
real rows come back. The engine alone samples, applies penalties and decides what ends.
Off CUDA (tests) the same fixed-shape step runs without capture.
"""

from __future__ import annotations

import torch

from moekit.engine.kv_cache import PagedBatch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def applies(model) -> bool:
    """Whether fixed-shape steps can run this model: dynamic-NTK RoPE needs the true max position, and a
    capture needs kernels without host syncs (the Triton backend) when on CUDA."""
    scaling = model.config.rope_scaling
    if scaling is not None and scaling.kind == "dynamic":
        return False
    return model.embed.weight.device.type != "cuda" or model.kernels.name == "triton"


class _Step:
    """The static tensors, batch view and (on CUDA) captured graph of one bucket."""

    def __init__(self, engine, rows: int, width: int):
        dev = engine.device
        self.ids_1B = torch.zeros(1, rows, dtype=torch.long, device=dev)
        self.pos_B = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slots_B = torch.zeros(rows, dtype=torch.long, device=dev)
        self.table_BM = torch.zeros(rows, width, dtype=torch.int32, device=dev)
        self.lens_B = torch.ones(rows, dtype=torch.int32, device=dev)
        self.at_B = torch.arange(rows, device=dev)
        starts = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        self.batch = PagedBatch(engine.kv, self.pos_B, self.slots_B, self.table_BM, starts, self.lens_B,
                                width * engine.pool.block_size)  # every position a full-width table can hold
        self.model, self.graph, self.logits_BV = engine.model, None, None

    def forward(self) -> torch.Tensor:
        return self.model(self.ids_1B, cache=self.batch, logits_at=self.at_B)[0]

    def capture(self) -> None:
        """Warm up on a side stream (autotuning, allocator), then capture. Warm-up writes only the
        slots the current inputs name, which the replay rewrites."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV = self.forward()
        # the graph reads the RoPE tables it saw; keep them alive should a later call regrow them
        self.rope_tables = list(self.model.rotary._table.values())


class GraphRunner:
    """Fixed-shape decode steps per batch-size bucket over the engine's paged cache."""

    def __init__(self, engine, capture: bool):
        self.engine, self.capture = engine, capture
        cfg = engine.model.config
        self.width = -(-cfg.max_position_embeddings // engine.pool.block_size)
        self.buckets = [b for b in BUCKETS if b <= max(engine.scheduler.max_num_seqs, 1)] or [1]
        if self.buckets[-1] < engine.scheduler.max_num_seqs:
            self.buckets.append(engine.scheduler.max_num_seqs)
        self._steps: dict[int, _Step] = {}

    def fits(self, rows: int, width: int) -> bool:
        return rows <= self.buckets[-1] and width <= self.width

    @torch.inference_mode()
    def run(self, ids: list[int], pos: list[int], slots: list[int], table: list[list[int]], lens: list[int]
            ) -> torch.Tensor:
        """Logits [R, V] of one decode step of R requests (the buffer is reused by the next call)."""
        R = len(ids)
        rows = next(b for b in self.buckets if b >= R)
        step = self._steps.get(rows)
        if step is None:
            step = self._steps[rows] = _Step(self.engine, rows, self.width)
        pad = rows - R
        dev = self.engine.device
        step.ids_1B[0].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        step.pos_B.copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        step.slots_B.copy_(torch.tensor(slots + [0] * pad), non_blocking=True)  # pads write block 0's slot 0
        tab = torch.zeros(rows, self.width, dtype=torch.int32)
        for r, t in enumerate(table):
            tab[r, :len(t)] = torch.tensor(t, dtype=torch.int32)
        step.table_BM.copy_(tab.to(dev), non_blocking=True)
        step.lens_B.copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        if not self.capture:
            return step.forward()[:R]
        if step.graph is None:
            step.capture()
        step.graph.replay()
        return step.logits_BV[:R]
