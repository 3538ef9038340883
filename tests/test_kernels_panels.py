"""Weights in 16-row panels (QuantWeight.to_panels): per-channel int8 (moekit/kernels/cpu/qpanel.h), int4 and
grouped int8 (qpanelg.h). The layouts, their round trips, and the kernels against a float emulation of their
activation quantisation (256-column blocks against per-channel int8, as for int8 rows; 32 against groups;
tests/test_kernels_quant.py has the tolerances' rationale) at every token count: panels take int8
activations in prefill too, where per-channel int8 rows dequantise weight tiles and the others unpack them."""

import pytest
import torch

from moekit.kernels import cpu, reference
from moekit.kernels.weights import (PANEL, ExpertWeights, QuantWeight, from_panels, scales_from_panels,
                                    scales_to_panels, to_panels, weight_views)
from tests.test_kernels_quant import (MLP_TOL, assert_matches_emulation, moe64, no_fallback, one_and_two_threads,
                                     rel_norm)

g = torch.Generator().manual_seed(1)
VNNI = cpu.supported() and "avx512_vnni" in cpu.cpu_info()["flags"]
needs_kernels = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")
needs_vnni = pytest.mark.skipif(not VNNI, reason="the panel kernels need AVX-512 VNNI")
# the formats models load into panels: int8 per channel (moekit quantize), int8 / int4 in GGUF Q8_0 / Q4_0's groups
FMTS = {"int8": ("int8", None), "int8-g32": ("int8", 32), "int4": ("int4", 32)}


def panels(shape, scale=0.1, fmt="int8", group=None) -> QuantWeight:
    w = QuantWeight.quantize(torch.randn(*shape, generator=g) * scale, fmt, group)
    assert w.to_panels() and w.panels
    return w


@pytest.fixture(scope="module")
def kern():
    return cpu.CpuKernels(torch.bfloat16, gemm="moekit")


@pytest.mark.parametrize("fmt", FMTS)
def test_layout_and_round_trip(fmt):
    K = 40 if fmt == "int8" else 64
    w = QuantWeight.quantize(torch.randn(2, 64, K, generator=g), *FMTS[fmt])
    fmt, grouped = FMTS[fmt][0], FMTS[fmt][1] is not None
    q, deq, raw, sc = w.values().clone(), w.dequantize(torch.float32, index=1), w.data.clone(), w.scale.clone()
    views = {k: v.clone() for k, v in weight_views(w, "x", 1, rows=(16, 48), width=None).items()}
    cut = {k: v.clone() for k, v in weight_views(w, "x", 0, width=32).items()} if grouped else {}
    assert w.to_panels() and w.data.dtype == torch.uint8 and w.data.shape == raw.shape
    flat, W = w.data.reshape(2, -1), raw.shape[-1]  # bytes per row
    for e, n, k in [(0, 0, 0), (0, 21, 13), (1, 63, W - 1), (1, 17, 4)]:  # panel n // 16: [W / 4, 16, 4]
        at = n // PANEL * PANEL * W + k // 4 * 64 + n % PANEL * 4 + k % 4
        assert int(flat[e, at]) == (int(q[e, n, k]) + 128 if fmt == "int8" else int(raw[e, n, k]))
    if grouped:  # scales [E, N / 16, G, 16]: a group's 16 rows side by side
        assert w.scale.shape == (2, 4, 2, PANEL) and w.scale[1, 3, 1, 5] == sc[1, 53, 1]
        assert torch.equal(w.scale_rows(), sc) and torch.equal(scales_from_panels(scales_to_panels(sc)), sc)
        assert all(torch.equal(cut[k], v) for k, v in weight_views(w, "x", 0, width=32).items())
    else:
        assert torch.equal(w.scale, sc)
    assert torch.equal(w.values(), q) and torch.equal(w.dequantize(torch.float32, index=1), deq)
    assert all(torch.equal(views[k], v) for k, v in weight_views(w, "x", 1, rows=(16, 48)).items())
    assert torch.equal(from_panels(to_panels(q)), q)
    assert w.to_panels() and "panels" in repr(w)  # a second call changes nothing
    assert w.scale.shape == ((2, 4, 2, PANEL) if grouped else sc.shape)


def test_int4_with_one_group_a_row_says_it_is_in_panels():
    """int4 panels are told by their scales' extra dim, also where a row has one group (K = group)."""
    w = QuantWeight.quantize(torch.randn(2, 32, 64, generator=g), "int4", 64)
    deq = w.dequantize()
    assert w.to_panels() and w.panels and w.scale.shape == (2, 2, 1, PANEL)
    assert torch.equal(w.dequantize(), deq) and "panels" in repr(w)


@pytest.mark.parametrize("fmt, group, shape", [
    ("int8", None, (48, 64)),  # rows not a multiple of 32
    ("int8", None, (64, 102)),  # columns not a multiple of 4
    ("int8", 32, (48, 64)),  # rows not a multiple of 32
    ("int4", 32, (48, 64))])
def test_other_weights_stay_as_they_are(fmt, group, shape):
    w = QuantWeight.quantize(torch.randn(*shape, generator=g), fmt, group)
    before = w.data.clone()
    assert not w.to_panels() and not w.panels and torch.equal(w.data, before)


@needs_kernels
@needs_vnni
@pytest.mark.parametrize("N", [32, 96, 1024])
@pytest.mark.parametrize("K", [100, 448, 1024])  # a partial 256-column block; 3/4 of one; whole blocks
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 15, 16, 23, 40])  # every token block and tail, decode and prefill
def test_matches_emulated_activation_quantisation(N, K, T, kern, monkeypatch):
    w, x = panels((N, K)), torch.randn(T, K, generator=g) * 3
    x[0, :40] = 0
    x[-1, :32] *= 50
    assert_matches_emulation(kern, w, x, 256, monkeypatch)


@needs_kernels
@needs_vnni
@pytest.mark.parametrize("fmt, group, K", [("int4", 32, 96), ("int4", 32, 448), ("int4", 64, 192), ("int4", 64, 1728),
                                           ("int4", 128, 384), ("int4", 128, 1024), ("int4", 64, 64), ("int8", 32, 96),
                                           ("int8", 32, 1728), ("int8", 64, 448)])
@pytest.mark.parametrize("N", [32, 96])  # 2 panels (a group of 4 not full); 6 (one full group and 2)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 16, 23, 40])  # every token block and tail, decode and prefill
def test_grouped_matches_emulated_activation_quantisation(fmt, group, K, N, T, kern, monkeypatch):
    w, x = panels((N, K), fmt=fmt, group=group), torch.randn(T, K, generator=g) * 3
    x[0, :40] = 0  # an all-zero block
    x[-1, 64:96] *= 50  # one block's scale far above the others'
    assert_matches_emulation(kern, w, x, 32, monkeypatch)


@needs_kernels
@needs_vnni
@pytest.mark.parametrize("fmt", FMTS)
def test_a_token_gives_the_same_bits_alone_or_in_prefill(fmt, kern, monkeypatch):
    """Prefill and decode compute alike: 40 tokens in one call (8-token blocks, the prefill schedule of the
    MoE layer) give each token the bits it gets alone."""
    T, E, D, F = 40, 4, 256, 64
    mk = lambda shape: panels(shape, 0.1, *FMTS[fmt])  # noqa: E731
    w = mk((96, D))
    ex = ExpertWeights(mk((E, 2 * F, D)), mk((E, D, F)), mk((2 * F, D)), mk((D, F)), None)
    x = torch.randn(T, D, generator=g).bfloat16()
    rw, ids = reference.route(torch.randn(T, E, generator=g), 2)
    with no_fallback(monkeypatch):
        assert torch.equal(kern.linear(x, w), torch.cat([kern.linear(x[t:t + 1], w) for t in range(T)]))
        alone = torch.cat([kern.moe_experts(x[t:t + 1], ex, ids[t:t + 1], rw[t:t + 1]) for t in range(T)])
        assert torch.equal(kern.moe_experts(x, ex, ids, rw), alone)


@needs_kernels
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("T, E, K, F, shared, gemm", [
    (1, 8, 2, 48, 0, "moekit"), (3, 6, 3, 64, 96, "moekit"), (8, 16, 6, 96, 128, "moekit"),
    (40, 4, 2, 64, 64, "moekit"), (300, 8, 2, 96, 0, "moekit"), (40, 4, 2, 64, 64, "aten")])
def test_moe_experts(fmt, T, E, K, F, shared, gemm, monkeypatch):
    """F = 48: the up half of w13 starts inside a 32-row block, on a panel; 40 and 300 tokens: prefill;
    ATen's GEMMs take a dequantised copy of experts with many tokens."""
    if FMTS[fmt][1] and F % FMTS[fmt][1]:
        pytest.skip("the down projection's width does not end on a group")
    D = 256
    mk = lambda shape: panels(shape, 0.1, *FMTS[fmt])  # noqa: E731
    x = torch.randn(T, D, generator=g).bfloat16()
    w, ids = reference.route(torch.randn(T, E, generator=g), K)
    sh = (mk((2 * shared, D)), mk((D, shared)), torch.rand(T, generator=g)) if shared else ()
    ex = ExpertWeights(mk((E, 2 * F, D)), mk((E, D, F)), *sh)
    want = moe64(x, ex, ids, w)
    kern = cpu.CpuKernels(torch.bfloat16, gemm=gemm)
    one, two = one_and_two_threads(lambda: kern.moe_experts(x, ex, ids, w), monkeypatch)
    if gemm == "moekit":  # (ATen's GEMMs need not give the same bits on one and two threads)
        assert torch.equal(one, two)  # whole experts a thread or row blocks: the same bits
    assert rel_norm(one, want) < MLP_TOL and rel_norm(two, want) < MLP_TOL


@needs_kernels
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("T", [1, 5, 40])
def test_mlp(fmt, T, kern, monkeypatch):
    w13, w2 = panels((2 * 96, 256), 0.1, *FMTS[fmt]), panels((256, 96), 0.1, *FMTS[fmt])
    x = torch.randn(T, 256, generator=g).bfloat16()
    with no_fallback(monkeypatch):
        got = kern.mlp(x, w13, w2)
    want = reference.mlp(x.double(), w13.dequantize(torch.float64), w2.dequantize(torch.float64))
    assert rel_norm(got, want) < MLP_TOL


@needs_kernels
@pytest.mark.parametrize("fmt", ["bf16", "int8 panels", "int4", "int4 panels", "int8-g32 panels"])
def test_left_over_expert_in_blocks_gives_the_same_bits(fmt, monkeypatch):
    """Five equal experts of two tokens each on two threads: four run whole, one per thread at a time, and
    the fifth in row blocks shared by both (moe.h, whole_experts); one thread runs all five in blocks."""
    T, E, D, F = 5, 5, 256, 64

    def mk(shape):
        if fmt == "bf16":
            return (torch.randn(*shape, generator=g) * 0.1).bfloat16()
        if fmt.endswith("panels"):
            return panels(shape, 0.1, *FMTS[fmt.split()[0]])
        return QuantWeight.quantize(torch.randn(*shape, generator=g) * 0.1, "int4", 32)

    ex = ExpertWeights(mk((E, 2 * F, D)), mk((E, D, F)))
    x = torch.randn(T, D, generator=g).bfloat16()
    ids = torch.tensor([[t, (t + 1) % E] for t in range(T)])
    w = torch.rand(T, 2, generator=g)
    kern = cpu.CpuKernels(torch.bfloat16, gemm="moekit")
    one, two = one_and_two_threads(lambda: kern.moe_experts(x, ex, ids, w), monkeypatch)
    assert torch.equal(one, two)
    assert rel_norm(two, moe64(x, ex, ids, w)) < (MLP_TOL if fmt != "bf16" else 1e-2)
