"""Per-channel int8 weights in 16-row panels (QuantWeight.to_panels, moekit/kernels/cpu/qpanel.h): the
layout, its round trip, and the kernel against a float emulation of its activation quantisation (256-column
blocks, as for int8 rows; tests/test_kernels_quant.py has the tolerances' rationale) at every token count:
panels take int8 activations in prefill too, where int8 rows dequantise weight tiles."""

import pytest
import torch

from moekit.kernels import cpu, reference
from moekit.kernels.weights import PANEL, ExpertWeights, QuantWeight, from_panels, to_panels, weight_views
from tests.test_kernels_quant import MLP_TOL, moe64, no_fallback, one_and_two_threads, q8_blocks, rel_max, rel_norm

g = torch.Generator().manual_seed(1)
VNNI = cpu.supported() and "avx512_vnni" in cpu.cpu_info()["flags"]
needs_kernels = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")


def panels(shape, scale=0.1) -> QuantWeight:
    w = QuantWeight.quantize(torch.randn(*shape, generator=g) * scale, "int8")
    assert w.to_panels() and w.panels
    return w


@pytest.fixture(scope="module")
def kern():
    return cpu.CpuKernels(torch.bfloat16, gemm="moekit")


def test_layout_and_round_trip():
    w = QuantWeight.quantize(torch.randn(2, 64, 40, generator=g), "int8")
    q, deq = w.values().clone(), w.dequantize(torch.float32, index=1)
    views = {k: v.clone() for k, v in weight_views(w, "x", 1, rows=(16, 48), width=None).items()}
    assert w.to_panels() and w.data.dtype == torch.uint8 and w.data.shape == q.shape
    flat = w.data.reshape(2, -1)
    for e, n, k in [(0, 0, 0), (0, 21, 13), (1, 63, 39), (1, 17, 4)]:  # panel n // 16: [K / 4, 16, 4] of q + 128
        at = n // PANEL * PANEL * 40 + k // 4 * 64 + n % PANEL * 4 + k % 4
        assert int(flat[e, at]) == int(q[e, n, k]) + 128
    assert torch.equal(w.values(), q) and torch.equal(w.dequantize(torch.float32, index=1), deq)
    assert all(torch.equal(views[k], v) for k, v in weight_views(w, "x", 1, rows=(16, 48)).items())
    assert torch.equal(from_panels(to_panels(q)), q)
    assert w.to_panels() and "panels" in repr(w)  # a second call changes nothing


@pytest.mark.parametrize("fmt, group, shape", [
    ("int8", None, (48, 64)),  # rows not a multiple of 32
    ("int8", None, (64, 102)),  # columns not a multiple of 4
    ("int8", 32, (64, 64)),  # grouped scales
    ("int4", 32, (64, 64))])
def test_other_weights_stay_as_they_are(fmt, group, shape):
    w = QuantWeight.quantize(torch.randn(*shape, generator=g), fmt, group)
    before = w.data.clone()
    assert not w.to_panels() and not w.panels and torch.equal(w.data, before)


@needs_kernels
@pytest.mark.skipif(not VNNI, reason="the panel kernel needs AVX-512 VNNI")
@pytest.mark.parametrize("N", [32, 96, 1024])
@pytest.mark.parametrize("K", [100, 448, 1024])  # a partial 256-column block; 3/4 of one; whole blocks
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 15, 16, 23, 40])  # every token block and tail, decode and prefill
def test_matches_emulated_activation_quantisation(N, K, T, kern, monkeypatch):
    w, x = panels((N, K)), torch.randn(T, K, generator=g) * 3
    x[0, :40] = 0
    x[-1, :32] *= 50
    with no_fallback(monkeypatch):
        got = kern.linear(x, w)
    want = torch.nn.functional.linear(q8_blocks(x, 256), w.dequantize(torch.float64))
    assert rel_max(got, want) < 1e-5


@needs_kernels
@pytest.mark.skipif(not VNNI, reason="the panel kernel needs AVX-512 VNNI")
def test_a_token_gives_the_same_bits_alone_or_in_prefill(kern, monkeypatch):
    """Prefill and decode compute alike: 40 tokens in one call (8-token blocks, the prefill schedule of the
    MoE layer) give each token the bits it gets alone."""
    T, E, D, F = 40, 4, 256, 64
    w = panels((96, D))
    ex = ExpertWeights(panels((E, 2 * F, D)), panels((E, D, F)), panels((2 * F, D)), panels((D, F)), None)
    x = torch.randn(T, D, generator=g).bfloat16()
    rw, ids = reference.route(torch.randn(T, E, generator=g), 2)
    with no_fallback(monkeypatch):
        assert torch.equal(kern.linear(x, w), torch.cat([kern.linear(x[t:t + 1], w) for t in range(T)]))
        alone = torch.cat([kern.moe_experts(x[t:t + 1], ex, ids[t:t + 1], rw[t:t + 1]) for t in range(T)])
        assert torch.equal(kern.moe_experts(x, ex, ids, rw), alone)


@needs_kernels
@pytest.mark.parametrize("T, E, K, F, shared", [(1, 8, 2, 48, 0), (3, 6, 3, 64, 96), (8, 16, 6, 96, 128),
                                                (40, 4, 2, 64, 64), (300, 8, 2, 96, 0)])
def test_moe_experts(T, E, K, F, shared, monkeypatch):
    """F = 48: the up half of w13 starts inside a 32-row block, on a panel; 40 and 300 tokens: prefill."""
    D = 256
    x = torch.randn(T, D, generator=g).bfloat16()
    w, ids = reference.route(torch.randn(T, E, generator=g), K)
    sh = (panels((2 * shared, D)), panels((D, shared)), torch.rand(T, generator=g)) if shared else ()
    ex = ExpertWeights(panels((E, 2 * F, D)), panels((E, D, F)), *sh)
    want = moe64(x, ex, ids, w)
    kern = cpu.CpuKernels(torch.bfloat16, gemm="moekit")
    one, two = one_and_two_threads(lambda: kern.moe_experts(x, ex, ids, w), monkeypatch)
    assert torch.equal(one, two)  # whole experts a thread or row blocks: the same bits
    assert rel_norm(two, want) < MLP_TOL


@needs_kernels
@pytest.mark.parametrize("T", [1, 5, 40])
def test_mlp(T, kern, monkeypatch):
    w13, w2 = panels((2 * 96, 256)), panels((256, 96))
    x = torch.randn(T, 256, generator=g).bfloat16()
    with no_fallback(monkeypatch):
        got = kern.mlp(x, w13, w2)
    want = reference.mlp(x.double(), w13.dequantize(torch.float64), w2.dequantize(torch.float64))
    assert rel_norm(got, want) < MLP_TOL


@needs_kernels
@pytest.mark.parametrize("fmt", ["bf16", "int8 panels", "int4"])
def test_left_over_expert_in_blocks_gives_the_same_bits(fmt, monkeypatch):
    """Five equal experts of two tokens each on two threads: four run whole, one per thread at a time, and
    the fifth in row blocks shared by both (moe.h, whole_experts); one thread runs all five in blocks."""
    T, E, D, F = 5, 5, 256, 64

    def mk(shape):
        if fmt == "bf16":
            return (torch.randn(*shape, generator=g) * 0.1).bfloat16()
        return panels(shape) if fmt == "int8 panels" else QuantWeight.quantize(torch.randn(*shape, generator=g) * 0.1,
                                                                               "int4", 32)

    ex = ExpertWeights(mk((E, 2 * F, D)), mk((E, D, F)))
    x = torch.randn(T, D, generator=g).bfloat16()
    ids = torch.tensor([[t, (t + 1) % E] for t in range(T)])
    w = torch.rand(T, 2, generator=g)
    kern = cpu.CpuKernels(torch.bfloat16, gemm="moekit")
    one, two = one_and_two_threads(lambda: kern.moe_experts(x, ex, ids, w), monkeypatch)
    assert torch.equal(one, two)
    assert rel_norm(two, moe64(x, ex, ids, w)) < (MLP_TOL if fmt != "bf16" else 1e-2)
