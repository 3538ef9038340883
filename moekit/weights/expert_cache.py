"""The expert cache of an offloaded model: routed experts read from the checkpoint on demand.

Every MoE layer keeps its expert stacks (w13 [E, 2F, D], w2 [E, D, F], or a quantised stack's
data and scales) at full size, but as virtual memory: only experts in the cache have physical
pages behind them. The cache owns a fixed pool of pages, allocated once (its capacity). Loading
expert B moves pages from the pool, or from the least recently used expert A, to B's place in
its stack with Linux's ``mremap`` (no copy, no page faults), then reads B's bytes from the
checkpoint (safetensors files, or a GGUF file) into them with ``preadv`` at the header's offsets.
Plain reads rather than a memory map: page-cache pages never count in the process's resident set,
so it stays at the resident weights plus the pool.

The kernels get the ordinary stacks and expert ids. A pool of S slots with ids remapped to slot
numbers would work too, but it changes the order in which the kernels sum the experts' outputs
(they walk experts by index), so results would differ from the in-memory model's in the last
bit; here they are equal by construction.

Keys are (layer, expert); one LRU list spans all layers, so a layer that routes widely (a long
prompt) can use capacity the others are not using. Reads happen when a layer needs them: a
prefetch of the next layer's likely experts (its router on the current hidden state, read by a
background thread) lost throughput on a 2-core machine and was removed (docs/quantization.md).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from moekit.errors import MoekitError
from moekit.kernels import reference
from moekit.kernels.weights import QUANT_PIECE
from moekit.weights.io import CheckpointError

PAGE = mmap.PAGESIZE
_NORESERVE, _POPULATE, _FIXED = 0x4000, 0x8000, 0x10  # linux/mman.h (asm-generic: x86-64, arm64)
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE


def _libc():
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype, libc.mremap.restype = ctypes.c_void_p, ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return libc


_FAILED = ctypes.c_void_p(-1).value


def virtual(nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor over fresh anonymous memory with no physical pages yet (they cost nothing until written)."""
    m = mmap.mmap(-1, max(nbytes, 1), flags=_ANON)
    return torch.frombuffer(m, dtype=dtype, count=nbytes // dtype.itemsize).view(shape)  # the tensor keeps m


class PagePool:
    """Physical pages that move between page-aligned ranges of anonymous memory (``mremap``)."""

    def __init__(self, nbytes: int):
        self.libc = _libc()
        self.capacity = nbytes
        self.reserve = mmap.mmap(-1, max(nbytes, PAGE), flags=_ANON | _POPULATE) if nbytes else None
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.reserve)) if nbytes else 0
        self.free: list[tuple[int, int]] = [(base, nbytes)] if nbytes else []  # (address, bytes), each in one mapping
        self.free_bytes = nbytes

    def take(self, addr: int, nbytes: int) -> list[tuple[int, int]]:
        """Give [addr, addr + nbytes) pages from the pool; returns the pieces moved (for :meth:`give`)."""
        pieces, done = [], 0
        while done < nbytes:
            src, n = self.free.pop()
            k = min(n, nbytes - done)
            self._move(src, addr + done, k)
            if k < n:
                self.free.append((src + k, n - k))
            pieces.append((addr + done, k))
            done += k
        self.free_bytes -= nbytes
        return pieces

    def give(self, pieces: list[tuple[int, int]]) -> None:
        """Return an evicted expert's pages (they stay where they are until taken again)."""
        self.free += pieces
        self.free_bytes += sum(n for _, n in pieces)

    def _move(self, src: int, dst: int, n: int) -> None:
        if self.libc.mremap(src, n, n, _MREMAP_MAYMOVE | _MREMAP_FIXED, dst) == _FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mremap of {n} bytes failed: {os.strerror(err)}")
        # the range left behind gets fresh page-less memory, so the stack it belongs to stays mapped
        if self.libc.mmap(src, n, mmap.PROT_READ | mmap.PROT_WRITE, _ANON | _FIXED, -1, 0) == _FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {n} bytes failed: {os.strerror(err)}")


def pread_exact(fd: int, addr: int, nbytes: int, offset: int, path: Path, name: str) -> None:
    """Read ``nbytes`` of a file at ``offset`` into memory at ``addr``; a short file names the tensor."""
    mem = memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [mem[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(f"{path.name}: tensor {name!r} ends past the end of the file "
                                  f"(truncated at byte {offset + got})")
        got += n


def buffer_for(reads) -> torch.Tensor:
    """One buffer for every read of ``reads`` [(source, views)] that converts its bytes, reused: a fresh one
    per read fragments the heap (measured: RSS grew 35 MiB over 129 decoded tokens of a Q4_0 GGUF offloaded
    with 2 MiB reads, against 9-11 MiB with one buffer)."""
    return torch.empty(max((s.buffer_bytes(views) for s, views in reads), default=0), dtype=torch.uint8)


def read_buffer(buffer: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    """``nbytes`` of a caller's reusable buffer, else a fresh one."""
    return torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]


class Source(Protocol):
    """A checkpoint tensor, or part of one, that the loader and the cache read (:class:`Stored`, or
    :class:`moekit.weights.gguf_tensors.GGUFSlice`): ``fill`` writes it into the model's views it
    stands for, ``scratch`` is the memory a fill takes beyond them (0 when read in place), of which
    ``buffer_bytes`` can be a buffer the caller allocates once and passes to every fill."""

    path: Path
    name: str
    nbytes: int

    def scratch(self, views: tuple[torch.Tensor, ...]) -> int: ...

    def buffer_bytes(self, views: tuple[torch.Tensor, ...]) -> int: ...

    def fill(self, fd: int, views: tuple[torch.Tensor, ...], drop_page_cache: bool = False,
             buffer: torch.Tensor | None = None) -> None: ...


@dataclass(frozen=True)
class Stored:
    """Where one safetensors tensor's bytes are: file, absolute byte offset, size, dtype, shape (a
    :class:`Source` filling one view, or quantised into a (data, scales) pair by ``kernels.quantize_into``,
    a kernel backend's, its values rounded to ``compute`` first)."""

    path: Path
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    compute: torch.dtype | None = None
    kernels: Any = reference

    def direct(self, view: torch.Tensor) -> bool:
        """Whether the file's bytes can be read straight into ``view`` (same dtype, contiguous)."""
        return view.is_contiguous() and view.dtype == self.dtype and view.numel() * view.element_size() == self.nbytes

    def scratch(self, views: tuple[torch.Tensor, ...]) -> int:
        if len(views) == 2:
            return self.nbytes + 4 * QUANT_PIECE  # and quantize_into's float32 pieces
        return 0 if self.direct(views[0]) else self.nbytes

    def buffer_bytes(self, views: tuple[torch.Tensor, ...]) -> int:
        return self.scratch(views) and self.nbytes

    def fill(self, fd: int, views: tuple[torch.Tensor, ...], drop_page_cache: bool = False,
             buffer: torch.Tensor | None = None) -> None:
        """Fill the view from the file (through ``buffer``, uint8 of at least ``nbytes``, or a temporary
        one, when dtypes or layouts differ)."""
        view = views[0]
        buf = view if len(views) == 1 and self.direct(view) else read_buffer(buffer, self.nbytes)
        pread_exact(fd, buf.data_ptr(), self.nbytes, self.offset, self.path, self.name)
        if drop_page_cache:
            os.posix_fadvise(fd, self.offset, self.nbytes, os.POSIX_FADV_DONTNEED)
        if len(views) == 2:
            self.kernels.quantize_into(buf.view(self.dtype).view(self.shape), *views, dtype=self.compute)
        elif buf is not view:
            view.copy_(buf.view(self.dtype).view(self.shape))


@dataclass(eq=False)
class Expert:
    """One (layer, expert): its page-aligned ranges in the stacks and the tensors to read into them."""

    spans: list[tuple[int, int]]  # (address, bytes)
    reads: list[tuple[Source, tuple[torch.Tensor, ...]]]  # a checkpoint source -> the views it fills
    covered: bool  # the reads fill the spans entirely (else padding is zeroed first)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.spans)


def size(nbytes: float) -> str:
    """A byte count for messages: MiB below 1 GiB, else GiB."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


@dataclass
class OffloadStats:
    """What the cache did. hits: experts already in memory when a layer needed them; misses: read
    from the checkpoint then (the layer waited for them)."""

    capacity_bytes: int = 0  # the page pool
    resident_bytes: int = 0  # weights always in memory (everything but the offloaded experts)
    working_bytes: int = 0  # budget left for the KV cache and activations
    buffer_bytes: int = 0  # budget for converting an expert read on the way in (0: read in place)
    expert_bytes: int = 0  # all offloaded experts, as stored in memory
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}

    def summary(self) -> str:
        return (f"expert offload: {self.hit_rate:.1%} of expert uses hit the cache ({self.hits} hits, {self.misses} "
                f"misses); {size(self.bytes_read)} read in {self.read_seconds:.2f} s; a {size(self.capacity_bytes)} "
                f"cache for {size(self.expert_bytes)} of experts, {size(self.resident_bytes)} resident")


@dataclass(eq=False)
class ExpertCache:
    """An LRU cache of (layer, expert) entries over a :class:`PagePool` of ``capacity`` bytes."""

    experts: dict[tuple[int, int], Expert]
    capacity: int
    stats: OffloadStats = field(default_factory=OffloadStats)
    drop_page_cache: bool = False  # advise the kernel to drop each range read (measures reads from disk)

    def __post_init__(self):
        self.pool = PagePool(self.capacity)
        self.stats.capacity_bytes = self.capacity
        self.stats.expert_bytes = sum(x.nbytes for x in self.experts.values())
        self.lru: OrderedDict[tuple[int, int], list[tuple[int, int]]] = OrderedDict()  # key -> its pages
        self.verified: set[tuple[int, int]] = set()
        self.fds = {p: os.open(p, os.O_RDONLY) for p in {s.path for x in self.experts.values() for s, _ in x.reads}}
        self.buffer = buffer_for([r for x in self.experts.values() for r in x.reads])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def ensure(self, layer: int, ids_TK: torch.Tensor) -> None:
        """Make the experts of ``layer`` named in ``ids_TK`` resident (reading the missing ones from
        the checkpoint) and most recently used."""
        keys = [(layer, e) for e in sorted(set(ids_TK.reshape(-1).tolist()))]
        missing = [k for k in keys if k not in self.lru]
        self._make_room(sum(self.experts[k].nbytes for k in missing), set(keys))
        for k in missing:
            self.lru[k] = [p for addr, n in self.experts[k].spans for p in self.pool.take(addr, n)]
            self._read(k)
            self._verify(k)
        self.stats.misses += len(missing)
        self.stats.hits += len(keys) - len(missing)
        for k in keys:
            self.lru.move_to_end(k)

    def _make_room(self, nbytes: int, keep: set) -> None:
        while self.pool.free_bytes < nbytes:
            victim = next((k for k in self.lru if k not in keep), None)
            if victim is None:  # the loader's minimum (a whole layer's experts) rules this out
                raise MoekitError(f"expert cache: {len(keep)} experts of one layer need {size(nbytes)} more than "
                                  f"the {size(self.capacity)} cache can free")
            self.pool.give(self.lru.pop(victim))
            self.stats.evictions += 1

    def _read(self, key) -> None:
        """Read one expert from the checkpoint into its (just assigned) pages."""
        t0 = time.perf_counter()
        x = self.experts[key]
        if not x.covered:  # padded experts: pages reused from another expert hold its bytes
            for addr, n in x.spans:
                ctypes.memset(addr, 0, n)
        for source, views in x.reads:
            source.fill(self.fds[source.path], views, self.drop_page_cache, self.buffer)
        self.stats.bytes_read += sum(s.nbytes for s, _ in x.reads)
        self.stats.read_seconds += time.perf_counter() - t0

    def _verify(self, key) -> None:
        """NaN / infinity check of an expert's floating-point tensors, the first time it is read."""
        if key in self.verified:
            return
        for stored, view in ((s, v) for s, views in self.experts[key].reads for v in views):
            if view.is_floating_point() and not bool(torch.isfinite(view.sum())) and not bool(
                    torch.isfinite(view).all()):
                bad = int((~torch.isfinite(view)).sum())
                raise CheckpointError(f"{stored.path.name}: tensor {stored.name!r} has {bad} NaN or infinite "
                                      f"value(s) of {view.numel()}")
        self.verified.add(key)
