"""Paged attention: the reference against dense causal attention, its fast twins (C++, Triton) against the truth.

Every case fills the pool with NaN before writing the live rows through a shuffled block table,
so slots past lens[r], blocks outside the table and the table's unused columns (which point at
a NaN block) must never reach the output. Fast-path checks patch the reference to raise, so a
silent fallback cannot pass. The Triton kernel runs under the interpreter (TRITON_INTERPRET=1,
tiny shapes) without a GPU, as in test_kernels_triton.py.
"""

import contextlib

import pytest
import torch

from moekit.kernels import cpu, reference
from tests.tritonenv import GPU, interpreted_triton

tk = interpreted_triton()
if tk is not None:
    from moekit.kernels.triton.interpret import numpy_compat

needs_cpp = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")
needs_triton = pytest.mark.skipif(tk is None, reason="needs triton, imported under TRITON_INTERPRET=1 without a GPU "
                                                     "(run this file on its own)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
g = torch.Generator().manual_seed(0)


def make_case(ns, lens, H, G, A, C, dtype, device="cpu"):
    """(q, k_pool, v_pool, table, starts, lens) with live rows in shuffled blocks, NaN everywhere else."""
    R, blocks = len(ns), [-(-S // C) for S in lens]
    P = sum(blocks) + 2  # one spare block, and the last one: NaN, what unused table columns point at
    k = torch.full((P, G, C, A), float("nan"), dtype=dtype)
    v = torch.full((P, G, C, A), float("nan"), dtype=dtype)
    table = torch.full((R, max(blocks, default=0) + 2), P - 1, dtype=torch.int32)
    free = iter(torch.randperm(P - 1, generator=g).tolist())
    for r, S in enumerate(lens):
        for b in range(blocks[r]):
            table[r, b] = p = next(free)
            live = min(C, S - b * C)
            k[p, :, :live] = torch.randn(G, live, A, generator=g).to(dtype)
            v[p, :, :live] = torch.randn(G, live, A, generator=g).to(dtype)
    starts = torch.tensor([0] + torch.tensor(ns, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(ns), H, A, generator=g).to(dtype)
    return tuple(t.to(device) for t in (q, k, v, table, starts, torch.tensor(lens, dtype=torch.int32)))


def truth(q, k, v, table, starts, lens):
    """float64 dense causal attention, request by request, on contiguous keys (reference.attention + a mask)."""
    C = k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r, S in enumerate(lens.tolist()):
        q0, q1 = starts[r].item(), starts[r + 1].item()
        if q1 == q0:
            continue
        rows = [(table[r, j // C].item(), j % C) for j in range(S)]
        k_GSA = torch.stack([k[p, :, c] for p, c in rows], 1).cpu().double()
        v_GSA = torch.stack([v[p, :, c] for p, c in rows], 1).cpu().double()
        mask_TS = torch.arange(S)[None, :] <= torch.arange(S - (q1 - q0), S)[:, None]
        o = reference.attention(q[q0:q1].cpu().double().transpose(0, 1)[None], k_GSA[None], v_GSA[None], mask_TS[None])
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def rel(a, b):
    return ((a.cpu().double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@contextlib.contextmanager
def no_fallback(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the fast path fell back to the reference")

    with monkeypatch.context() as m:
        m.setattr(reference, "paged_attention", boom)
        yield


LAYOUTS = {  # name: (new tokens per request, keys per request, tokens per block)
    "decode": ([1] * 6, [1, 16, 17, 100, 300, 33], 16),
    "prefill": ([150], [150], 16),
    "later chunk": ([70], [201], 16),
    "mixed": ([1, 70, 1, 0, 3, 1], [40, 150, 513, 20, 9, 1], 16),
    "blocks of 8": ([5, 1, 40], [133, 1000, 77], 8),
}
HEADS = [(8, 8, 64), (8, 2, 80), (4, 1, 128), (4, 2, 32), (2, 2, 16)]  # H, G, A: MHA, GQA, MQA, small widths


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_is_dense_causal_attention(layout):
    ns, lens, C = LAYOUTS[layout]
    case = make_case(ns, lens, 8, 2, 16, C, torch.float64)
    got = reference.paged_attention(*case)
    assert torch.isfinite(got).all() and rel(got, truth(*case)) < 1e-12


# ----------------------------------------------------------------------------- C++
@pytest.fixture(scope="module")
def kern():
    return cpu.CpuKernels(torch.bfloat16, gemm="moekit")  # compiles once (about 30 s on a fresh machine)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, G, A", HEADS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cpu(layout, H, G, A, dtype, monkeypatch, kern):
    ns, lens, C = LAYOUTS[layout]
    for c in (C, 32):  # and larger blocks
        case = make_case(ns, lens, H, G, A, c, dtype)
        with no_fallback(monkeypatch):
            got = kern.paged_attention(*case)
        assert got.dtype == dtype and got.shape == case[0].shape and torch.isfinite(got).all()
        assert rel(got, truth(*case)) < TOL[dtype], f"C={c}"


@needs_cpp
def test_cpu_strided_q_int64_indices_and_no_queries(monkeypatch, kern):
    q, k, v, table, starts, lens = make_case([3, 0, 40], [9, 5, 64], 4, 2, 64, 16, torch.float32)
    qkv = torch.cat([q, torch.randn(q.shape[0], 2, 64, generator=g)], 1)  # q as a view of a wider projection
    with no_fallback(monkeypatch):
        got = kern.paged_attention(qkv[:, :4], k, v, table.long(), starts.long(), lens.long(), scale=0.3)
        empty = kern.paged_attention(q[:0], k, v, table[:2], torch.zeros(3, dtype=torch.int32), lens[:2])
    assert rel(got, reference.paged_attention(q.double(), k.double(), v.double(), table, starts, lens, 0.3)) < 1e-5
    assert empty.shape == (0, 4, 64)


@needs_cpp
def test_cpu_fallbacks_and_bad_tables(kern):
    case = make_case([2, 1], [9, 30], 4, 2, 24, 16, torch.float32)
    with pytest.warns(UserWarning, match="'paged_attention' ran on the plain PyTorch reference path: head width 24"):
        assert rel(kern.paged_attention(*case), truth(*case)) < 1e-5
    q, k, v, table, starts, lens = make_case([2, 1], [9, 30], 4, 2, 32, 16, torch.float32)
    with pytest.warns(UserWarning, match="autograd"):
        kern.paged_attention(q.requires_grad_(), k, v, table, starts, lens).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    bad = table.clone()
    bad[1, 1] = k.shape[0]
    with torch.no_grad(), pytest.raises(RuntimeError, match="block table entries must index the pool"):
        kern.paged_attention(q, k, v, bad, starts, lens)
    with torch.no_grad(), pytest.raises(RuntimeError, match="lens"):
        kern.paged_attention(q, k, v, table, starts, torch.tensor([1, 30], dtype=torch.int32))


# ----------------------------------------------------------------------------- Triton
@pytest.fixture(scope="module")
def interpreter():
    """Interpreted kernels read TRITON_INTERPRET while they run, so it stays set for these tests only."""
    if GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as m, numpy_compat():
        m.setenv("TRITON_INTERPRET", "1")
        yield


TINY = {  # interpreter-sized layouts: decodes, a chunk among decodes with empty requests, a prefill
    "decode": ([1, 1, 3], [1, 17, 40], 16),
    "mixed": ([20, 1, 0, 2], [33, 9, 4, 2], 8),
    "prefill": ([35], [35], 4),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, G, A", [(4, 2, 16), (4, 1, 24), (2, 2, 32)])
@pytest.mark.parametrize("layout", list(TINY))
def test_triton(layout, H, G, A, dtype, monkeypatch, interpreter):
    ns, lens, C = TINY[layout]
    case = make_case(ns, lens, H, G, A, C, dtype, "cuda" if GPU else "cpu")
    with no_fallback(monkeypatch):
        got = tk.paged_attention(*case)
        tiles = tk.paged.paged_attention(*case, block_m=16, block_n=16)  # narrower key tiles
    for out in (got, tiles):
        assert out.dtype == dtype and torch.isfinite(out).all() and rel(out, truth(*case)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU or tk is None, reason="needs a CUDA GPU and triton")
def test_triton_full_shape_in_a_cuda_graph():
    """16 decodes over 1024 keys and a 512-token chunk, captured once and replayed on new lengths and tables."""
    ns, lens = [512] + [1] * 16, [512] + [1024] * 16
    case = make_case(ns, lens, 32, 8, 128, 16, torch.bfloat16, "cuda")
    static = [t.clone() for t in case]
    tk.paged_attention(*static)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk.paged_attention(*static)
    for shift in (0, 300):  # shorter requests on the same shapes: only the device tensors change
        case2 = (*case[:4], case[4], case[5] - torch.tensor([0] + [shift] * 16, dtype=torch.int32, device="cuda"))
        for s, t in zip(static, case2):
            s.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, truth(*case2)) < TOL[torch.bfloat16]
