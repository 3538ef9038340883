"""The low-bit CPU kernels (int8 / int4 weights, moekit/kernels/cpu/qgemm.h) against the reference
on dequantised weights (QuantWeight.dequantize is the spec).

Tolerances. With many tokens, per-channel int8 rows dequantise weight tiles to exactly the reference's
values, so they meet the bf16 path's bounds (``TOL``). With few tokens (decode), and against int4 and
grouped int8 at any count (16-row tiles unpacked for VNNI, cpu/qtile.h), the kernels quantise the
activations to int8 per 32-column block (round to nearest, scale max|x| / 127, llama.cpp's Q8_0;
per 256-column block against per-channel int8 weights, as llama.cpp's Q8_K against its K-quants):
each input carries a relative error of about 0.3-0.5% (rms), so a linear layer is held to 1% of
the output's norm, and an MLP or MoE layer, whose SwiGLU activation is quantised a second time and
is heavy-tailed, to 2.5% (measured: 1.0-1.5%). A float32 emulation of that quantisation checks those
kernels to 1e-5, so a layout error cannot hide inside the looser bounds. (Per-channel int8 in panels
quantises at every count too: tests/test_kernels_panels.py.)
Every check runs with the reference functions patched to raise: no silent fallback passes.
"""

import contextlib
import warnings

import pytest
import torch

from moekit.kernels import cpu, reference
from moekit.kernels.weights import ExpertWeights, QuantWeight

pytestmark = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")

DECODE, PREFILL = (1, 3, 8), (40,)  # token counts below / above cpu.QDECODE_TOKENS
FORMATS = [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # max-error bounds of the bf16 path (tests/test_kernels_cpu.py)
LINEAR_TOL, MLP_TOL = 1e-2, 2.5e-2  # decode: norm-relative bounds (see the module doc)
g = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def kern():
    return cpu.CpuKernels(torch.bfloat16, gemm="moekit")


@contextlib.contextmanager
def no_fallback(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the CPU kernel fell back to the reference path")

    with monkeypatch.context() as m:
        for name in ("linear", "mlp", "moe_experts"):
            m.setattr(reference, name, boom)
        yield


def one_and_two_threads(run, monkeypatch):
    """run() on one thread, then on two (no reference fallback allowed): the two results."""
    before = torch.get_num_threads()
    try:
        with no_fallback(monkeypatch):
            torch.set_num_threads(1)
            one = run()
            torch.set_num_threads(2)
            return one, run()
    finally:
        torch.set_num_threads(before)


def rel_max(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def int8_acts(group, T: int) -> bool:
    """Whether the kernels quantise the activations at T tokens: against int4 and grouped int8 always, against
    per-channel int8 rows below the decode limit."""
    return group is not None or T < cpu.QDECODE_TOKENS


def check(got, want, dtype, decode: bool, bound):
    """Prefill: the bf16 path's bounds; decode: the stated bound for activation quantisation."""
    assert got.dtype == dtype
    if decode:
        assert rel_norm(got, want) < bound
    else:
        assert rel_max(got, want) < TOL[dtype]


def quant(shape, fmt, group, scale=0.1):
    return QuantWeight.quantize(torch.randn(*shape, generator=g) * scale, fmt, group)


def act_block(fmt: str, group) -> int:
    """The decode kernels' activation block: 256 columns against per-channel int8 weights, else 32."""
    return 256 if fmt == "int8" and group is None else 32


def q8_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The activations as the decode kernels see them: int8 per block of columns, back in float64."""
    T, K = x.shape
    xb = torch.nn.functional.pad(x.float(), (0, -K % block)).view(T, -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)  # a true division, as the kernel's
    q = torch.round(xb * inv)  # to nearest even
    return (q.double() * (amax / 127).double()).view(T, -1)[:, :K]


def emulated(x: torch.Tensor, w: QuantWeight, block: int) -> torch.Tensor:
    """The linear as the int8-activation kernels compute it, in float64: activations in int8 blocks of
    ``block`` columns, weights dequantised."""
    return torch.nn.functional.linear(q8_blocks(x, block), w.dequantize(torch.float64))


def assert_matches_emulation(kern, w: QuantWeight, x: torch.Tensor, block: int, monkeypatch) -> torch.Tensor:
    """kern.linear(x, w) on the C++ kernels within 1e-5 (max-relative) of :func:`emulated`; returns it."""
    with no_fallback(monkeypatch):
        got = kern.linear(x, w)
    assert rel_max(got, emulated(x, w, block)) < 1e-5
    return got


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", DECODE + PREFILL)
def test_linear(fmt, group, dtype, T, kern, monkeypatch):
    K = {None: 100, 32: 96, 64: 192, 128: 384}[group]  # not multiples of 64 where the format allows
    w, x = quant((37, K), fmt, group), torch.randn(T, K, generator=g).to(dtype)
    b = torch.randn(37, generator=g).to(dtype)
    with no_fallback(monkeypatch):
        got = kern.linear(x, w, b)
    want = torch.nn.functional.linear(x.double(), w.dequantize(torch.float64), b.double())
    check(got, want, dtype, int8_acts(group, T), LINEAR_TOL)


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("T, N", [(1, 70), (3, 33), (6, 8), (13, 130), (1, 1000), (2, 1000)])  # 1000: four-region
# schedules (qact.h) with a remainder of rows in each thread's part
@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_decode_matches_emulated_activation_quantisation(fmt, group, T, N, long, kern, monkeypatch):
    # short: the last chunk partial (64 columns for int8, 128 for int4); long: int4 rows with whole
    # four-chunk stretches (the quad kernel) ahead of a whole chunk and a partial one
    K = ({None: 1000, 32: 736, 64: 704, 128: 768} if long else {None: 100, 32: 224, 64: 320, 128: 384})[group]
    w, x = quant((N, K), fmt, group), torch.randn(T, K, generator=g) * 3
    x[0, :40] = 0  # an all-zero block
    assert_matches_emulation(kern, w, x, act_block(fmt, group), monkeypatch)


@pytest.mark.skipif("avx512_vnni" not in cpu.cpu_info()["flags"], reason="the prefill tile kernel needs AVX-512 VNNI")
@pytest.mark.parametrize("fmt, group", [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32), ("int8", 64)])
@pytest.mark.parametrize("N", [16, 37, 96])  # one tile; two and 5 rows for the row kernel; six
@pytest.mark.parametrize("T", [16, 23, 40])  # 8-token blocks and every tail
@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_prefill_tiles_match_emulated_activation_quantisation(fmt, group, N, T, long, kern, monkeypatch):
    K = {32: 736, 64: 704, 128: 768}[group] if long else {32: 224, 64: 320, 128: 384}[group]  # partial last chunks
    w, x = quant((N, K), fmt, group), torch.randn(T, K, generator=g) * 3
    x[0, :40] = 0  # an all-zero block
    x[-1, 64:96] *= 50  # one block's scale far above the others'
    assert_matches_emulation(kern, w, x, 32, monkeypatch)


@pytest.mark.parametrize("T", [1, 2, 8, 9])  # 8 and more: the 4-token blocks
@pytest.mark.parametrize("K", [448, 512, 1000])  # a last block of 3 whole chunks; none; of 4, the last partial
def test_per_channel_decode_blocks_of_256(T, K, kern, monkeypatch):
    # the int32 sums of a 256-column block's chunks take one conversion and one scale, whatever the tail
    w, x = quant((70, K), "int8", None), torch.randn(T, K, generator=g) * 3
    x[-1, 256:300] *= 50  # one block's scale far above the others'
    got = assert_matches_emulation(kern, w, x, 256, monkeypatch)
    assert rel_max(got, emulated(x, w, 32)) > 1e-4


@pytest.mark.parametrize("fmt, group", FORMATS[:3] + FORMATS[4:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", (1, 5, 40))
def test_mlp(fmt, group, dtype, T, kern, monkeypatch):
    D, F = 256, 128
    w13, w2 = quant((2 * F, D), fmt, group), quant((D, F), fmt, group)
    x = torch.randn(T, D, generator=g).to(dtype)
    with no_fallback(monkeypatch):
        got = kern.mlp(x, w13, w2)
    check(got, reference.mlp(x.double(), w13.dequantize(torch.float64), w2.dequantize(torch.float64)), dtype,
          int8_acts(group, T), MLP_TOL)


def moe64(x, ex: ExpertWeights, ids, w):
    """The oracle in float64 on dequantised weights."""
    d = (lambda t: t.dequantize(torch.float64) if isinstance(t, QuantWeight) else t.double())
    shared = (d(ex.shared_w13), d(ex.shared_w2), ex.shared_gate_T) if ex.has_shared else ()
    return reference.moe_experts(x.double(), ExpertWeights(d(ex.w13), d(ex.w2), *shared), ids, w.double())


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D, E, K, F, shared, gated", [
    (1, 128, 8, 2, 128, 0, False), (3, 128, 6, 3, 64, 64, False), (8, 256, 16, 6, 128, 128, True),
    (64, 128, 4, 2, 64, 64, True), (200, 128, 8, 2, 128, 0, False)])
@pytest.mark.parametrize("gemm", cpu.GEMMS)
def test_moe_experts(fmt, group, dtype, T, D, E, K, F, shared, gated, gemm, monkeypatch):
    if group and (F % group or shared % group):
        pytest.skip("the expert width does not end on a group")
    kern = cpu.CpuKernels(dtype, gemm=gemm)  # experts with >= 16 tokens: dequantised tiles, or ATen on a copy
    x = torch.randn(T, D, generator=g).to(dtype)
    logits = torch.randn(T, E, generator=g)
    logits[:, 0] -= 50  # expert 0 gets no tokens
    w, ids = reference.route(logits, K)
    sh = ()
    if shared:  # gated: both shared matrices quantised; ungated: the down projection plain (a mixed layer)
        s2 = quant((D, shared), fmt, group) if gated else (torch.randn(D, shared, generator=g) * 0.1).to(dtype)
        sh = (quant((2 * shared, D), fmt, group), s2, torch.rand(T, generator=g) if gated else None)
    ex = ExpertWeights(quant((E, 2 * F, D), fmt, group), quant((E, D, F), fmt, group), *sh)
    want = moe64(x, ex, ids, w)
    with no_fallback(monkeypatch):
        got = kern.moe_experts(x, ex, ids, w)
        assert torch.equal(got, kern.moe_experts(x, ex, ids, w))  # deterministic
    counts = torch.bincount(ids.flatten(), minlength=E)
    decode = group is not None or bool(((counts > 0) & (counts < cpu.QDECODE_TOKENS)).any()) \
        or (shared and T < cpu.QDECODE_TOKENS)
    check(got, want, dtype, decode, MLP_TOL)


SCHEDULE_CASES = [(1, 8, 2, 96, 0), (1, 16, 6, 64, 128), (2, 8, 2, 40, 0), (1, 4, 2, 200, 0)]


@pytest.mark.parametrize("fmt, group, T, E, K, F, shared", [  # widths that end on the format's group
    (fmt, group, *case) for fmt, group in [(None, None)] + FORMATS for case in SCHEDULE_CASES
    if not group or (case[3] % group == 0 and case[4] % group == 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_schedules_agree_bit_for_bit(fmt, group, dtype, T, E, K, F, shared, monkeypatch):
    """At two threads a decode step gives whole experts to threads (moe.h); at one, experts run in row
    blocks. The engine moves between one and two threads with the machine's load, so both must give the
    same bits, gate/up boundaries that fall inside a 16-row group included (F = 40, 200)."""
    D = 256
    mk = (lambda shape: (torch.randn(*shape, generator=g) * 0.1).to(dtype)) if fmt is None else \
        (lambda shape: quant(shape, fmt, group))
    sh = (mk((2 * shared, D)), mk((D, shared)), torch.rand(T, generator=g)) if shared else ()
    ex = ExpertWeights(mk((E, 2 * F, D)), mk((E, D, F)), *sh)
    x = torch.randn(T, D, generator=g).to(dtype)
    w, ids = reference.route(torch.randn(T, E, generator=g), K)
    kern = cpu.CpuKernels(dtype, gemm="moekit")
    one, two = one_and_two_threads(lambda: kern.moe_experts(x, ex, ids, w), monkeypatch)
    assert torch.equal(one, two)


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("T, N", [(1, 1000), (2, 1000), (5, 130), (1, 37)])
def test_decode_linear_same_bits_on_one_and_two_threads(fmt, group, T, N, kern, monkeypatch):
    """A few-token linear splits its rows into one part a thread (linear.cpp); the engine moves between one
    and two threads with the machine's load, so the split must not change a bit."""
    K = {None: 1000, 32: 736, 64: 704, 128: 768}[group]
    w, x = quant((N, K), fmt, group), torch.randn(T, K, generator=g).bfloat16()
    one, two = one_and_two_threads(lambda: kern.linear(x, w), monkeypatch)
    assert torch.equal(one, two)


@pytest.mark.parametrize("fmt, group", [("int4", 32), ("int4", 128), ("int8", 32)])
def test_prefill_tiles_same_bits_on_one_and_two_threads(fmt, group, kern, monkeypatch):
    """Prefill on 16-row tiles (the rows past the last whole tile on the row kernels): at two threads whole
    experts go to threads and a linear's rows split in two parts, at one thread experts run in row blocks.
    Tiles start on 16-row boundaries either way, so the bits are the same."""
    T, E, D, F = 40, 4, 256, 128
    ex = ExpertWeights(quant((E, 2 * F, D), fmt, group), quant((E, D, F), fmt, group))
    x = torch.randn(T, D, generator=g).bfloat16()
    w, ids = reference.route(torch.randn(T, E, generator=g), 2)
    one, two = one_and_two_threads(lambda: kern.moe_experts(x, ex, ids, w), monkeypatch)
    assert torch.equal(one, two)
    lin = quant((1000 + 8, D), fmt, group)
    one, two = one_and_two_threads(lambda: kern.linear(x, lin), monkeypatch)
    assert torch.equal(one, two)


def test_mixed_plain_and_quantised_experts(kern, monkeypatch):
    """quantize leaves a matrix whose width does not end on a group plain: here w13 int4, w2 bf16."""
    x = torch.randn(4, 128, generator=g).bfloat16()
    w, ids = reference.route(torch.randn(4, 4, generator=g), 2)
    ex = ExpertWeights(quant((4, 2 * 48, 128), "int4", 64), (torch.randn(4, 128, 48, generator=g) * 0.1).bfloat16())
    want = moe64(x, ex, ids, w)
    with no_fallback(monkeypatch):
        assert rel_norm(kern.moe_experts(x, ex, ids, w), want) < MLP_TOL


@pytest.mark.parametrize("make, reason", [
    (lambda w: w, "dtypes"),  # float16 activations
    (lambda w: _transposed(w), "non-contiguous weight"),
    (lambda w: _float_scales(w), "stored as torch.int8 with torch.float32 scales")])
def test_unfit_calls_run_the_reference_and_say_so_once(make, reason):
    kern = cpu.CpuKernels(torch.bfloat16, gemm="moekit")
    w = make(quant((64, 128), "int8", None))
    x = torch.randn(2, 128, generator=g).to(torch.float16 if reason == "dtypes" else torch.bfloat16)
    with pytest.warns(UserWarning, match=f"'linear' ran on the plain PyTorch reference path: .*{reason}"):
        got = kern.linear(x, w)
    assert rel_norm(got, torch.nn.functional.linear(x.double(), w.dequantize(torch.float64))) < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        kern.linear(x, w)


def _transposed(w: QuantWeight) -> QuantWeight:
    w.data = w.data.t().contiguous().t()  # same values, column-major storage
    return w


def _float_scales(w: QuantWeight) -> QuantWeight:
    w.scale = w.scale.float()
    return w


def test_zero_tokens(kern, monkeypatch):
    w = quant((40, 64), "int4", 32)
    with no_fallback(monkeypatch):
        assert kern.linear(torch.zeros(0, 64, dtype=torch.bfloat16), w).shape == (0, 40)
