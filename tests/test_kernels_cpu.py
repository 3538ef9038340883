"""The C++ CPU kernels against their plain PyTorch twin (moekit/kernels/reference.py).

Every check runs with the reference functions patched to raise, so a silent fallback to the
reference path cannot pass for the fast path.
"""

import contextlib
import os
import warnings

import pytest
import torch

from moekit.kernels import cpu, reference
from moekit.kernels.weights import ExpertWeights, QuantWeight

pytestmark = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")


@pytest.fixture(scope="module")
def kern():
    return cpu.CpuKernels(torch.bfloat16, gemm="moekit")  # compiles once (about 30 s on a fresh machine)


@contextlib.contextmanager
def no_fallback(monkeypatch, *names):
    def boom(*a, **k):
        raise AssertionError("the CPU kernel fell back to the reference path")

    with monkeypatch.context() as m:
        for n in names:
            m.setattr(reference, n, boom)
        yield


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
g = torch.Generator().manual_seed(0)


def rnd(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D, N", [(1, 64, 37), (2, 100, 64), (3, 1030, 40), (8, 256, 300), (13, 96, 33),
                                     (32, 2048, 70)])
def test_linear(dtype, T, D, N, monkeypatch, kern):
    x, w, b = rnd(T, D, dtype=dtype), rnd(N, D, dtype=dtype, scale=0.1), rnd(N, dtype=dtype)
    with no_fallback(monkeypatch, "linear"):
        got = kern.linear(x, w, b)
    assert got.dtype == dtype and rel(got, torch.nn.functional.linear(x.double(), w.double(), b.double())) < TOL[dtype]


def experts(w13, w2, shared=None):
    """ExpertWeights from stacks and an optional (w13, w2, gate) shared expert."""
    return ExpertWeights(w13, w2, *(shared or ()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D, E, K, F, shared, gated", [
    (1, 64, 8, 2, 32, 0, False), (3, 100, 6, 3, 40, 24, False), (8, 256, 16, 6, 48, 64, True),
    (17, 70, 4, 4, 33, 0, False), (64, 96, 4, 2, 40, 16, True), (200, 128, 8, 2, 96, 0, False)])
@pytest.mark.parametrize("gemm", cpu.GEMMS)
def test_moe_experts(dtype, T, D, E, K, F, shared, gated, gemm, monkeypatch):
    kern = cpu.CpuKernels(dtype, gemm=gemm)  # experts with >= 16 tokens: moekit's microkernel or ATen's GEMMs
    x = rnd(T, D, dtype=dtype)
    w13, w2 = rnd(E, 2 * F, D, dtype=dtype, scale=0.1), rnd(E, D, F, dtype=dtype, scale=0.1)
    logits = torch.randn(T, E, generator=g)
    logits[:, 0] -= 50  # expert 0 gets no tokens
    w, ids = reference.route(logits, K)
    sh = None
    if shared:
        gate = torch.rand(T, generator=g) if gated else None
        sh = (rnd(2 * shared, D, dtype=dtype, scale=0.1), rnd(D, shared, dtype=dtype, scale=0.1), gate)
    want = reference.moe_experts(x.double(), experts(w13.double(), w2.double(), sh and (sh[0].double(), sh[1].double(),
                                                                                          sh[2])), ids, w.double())
    with no_fallback(monkeypatch, "moe_experts", "mlp"):
        got = kern.moe_experts(x, experts(w13, w2, sh), ids, w)
    assert got.dtype == dtype and rel(got, want) < TOL[dtype]


def test_moe_is_deterministic_and_handles_padded_experts(monkeypatch, kern):
    from moekit.models.moe import Experts

    ex = Experts(48, [8, 24, 16]).to(torch.bfloat16)
    torch.nn.init.normal_(ex.w13, generator=g)
    torch.nn.init.normal_(ex.w2, generator=g)
    ex.zero_padding()
    x = rnd(5, 48, dtype=torch.bfloat16)
    w, ids = reference.route(torch.randn(5, 3, generator=g), 2)
    with no_fallback(monkeypatch, "moe_experts"), torch.no_grad():
        a, b = kern.moe_experts(x, experts(ex.w13, ex.w2), ids, w), kern.moe_experts(x, experts(ex.w13, ex.w2), ids, w)
    assert torch.equal(a, b)
    with torch.no_grad():
        want = reference.moe_experts(x.double(), experts(ex.w13.double(), ex.w2.double()), ids, w.double())
    assert rel(a, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize("score_func, renorm, eps", [("softmax", True, 0.0), ("softmax", True, 1e-6),
                                                     ("softmax", False, 0.0), ("sigmoid", False, 0.0)])
def test_route(score_func, renorm, eps, monkeypatch, kern):
    logits = torch.randn(50, 16, generator=g) * 3
    logits[:5] = torch.randint(0, 3, (5, 16), generator=g).float()  # exact ties: lower index first
    want_w, want_ids = reference.route(logits, 4, score_func, renorm, eps)
    with no_fallback(monkeypatch, "route"):
        w, ids = kern.route(logits, 4, score_func, renorm, eps)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rotary_silu_mul(dtype, monkeypatch, kern):
    x, w = rnd(37, 1000, dtype=dtype), torch.rand(1000, generator=g).to(dtype)
    q = rnd(2, 4, 9, 64, dtype=dtype)
    ang = torch.rand(2, 9, 32, generator=g) * 6
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    h = rnd(21, 2 * 77, dtype=dtype)
    with no_fallback(monkeypatch, "rms_norm", "rotary", "silu_mul"):
        got = kern.rms_norm(x, w, 1e-6), kern.rotary(q, cos, sin), kern.silu_mul(h)
    want = (reference.rms_norm(x.double(), w.double(), 1e-6), reference.rotary(q.double(), cos.double(), sin.double()),
            reference.silu_mul(h.double()))
    for a, b in zip(got, want):
        assert a.dtype == dtype and rel(a, b) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, G, T, S, A, masked", [
    (1, 4, 4, 1, 600, 64, True), (2, 8, 2, 3, 40, 80, True), (1, 16, 4, 512, 512, 64, False),
    (2, 4, 4, 130, 130, 64, True), (1, 2, 2, 70, 100, 48, True), (3, 8, 8, 9, 9, 128, False)])
def test_attention(dtype, B, H, G, T, S, A, masked, monkeypatch, kern):
    q, k, v = rnd(B, H, T, A, dtype=dtype), rnd(B, G, S, A, dtype=dtype), rnd(B, G, S, A, dtype=dtype)
    mask = None
    if masked:  # causal with left padding, like the KV cache builds it
        pad = torch.randint(0, S - T + 1, (B,), generator=g)
        qs, ks = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
        mask = (ks <= qs)[None] & (ks[None] >= pad[:, None, None]) | (ks == qs)[None]
    elif S != T:
        pytest.skip("causal attention without a mask needs S == T")
    want = reference.attention(q.double(), k.double(), v.double(), mask)
    with no_fallback(monkeypatch, "attention"):
        got = kern.attention(q, k, v, mask)
    assert got.dtype == dtype and rel(got, want) < TOL[dtype]


def test_autograd_uses_the_reference_path_and_says_so_once():
    kern = cpu.CpuKernels(torch.float32, gemm="moekit")
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    with pytest.warns(UserWarning, match="'linear' ran on the plain PyTorch reference path: autograd"):
        kern.linear(x, w).sum().backward()
    assert x.grad is not None and w.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        kern.linear(x, w)


def test_gemm_pick_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("MOEKIT_CPU_GEMM", raising=False)
    monkeypatch.setattr(cpu, "extension", lambda: "ext")  # the timing is faked; the cache is real
    monkeypatch.setattr(cpu.OtherLoad, "cores", lambda self: 0.0)
    timed = []
    monkeypatch.setattr(cpu, "_time_gemms", lambda ext, dtype: timed.append(dtype) or {"moekit": 2.0, "aten": 1.0})
    first = cpu.pick_gemm(torch.bfloat16)
    assert first["gemm"] == "aten" and first["seconds"] == {"moekit": 2.0, "aten": 1.0} and len(timed) == 1
    assert cpu.pick_gemm(torch.bfloat16) == first and len(timed) == 1  # read back, not measured again
    assert len(list(tmp_path.rglob("gemm-bfloat16-*threads.json"))) == 1
    monkeypatch.setattr(cpu.OtherLoad, "cores", lambda self: 1.0)  # another process kept a core busy
    busy = cpu.pick_gemm(torch.float32)
    assert busy["gemm"] == "aten" and "not cached" in busy["source"] and len(timed) == 2
    assert not list(tmp_path.rglob("gemm-float32-*"))  # measured again next time
    monkeypatch.setenv("MOEKIT_CPU_GEMM", "moekit")
    assert cpu.pick_gemm(torch.bfloat16)["gemm"] == "moekit"
    monkeypatch.setenv("MOEKIT_CPU_GEMM", "amx")
    with pytest.raises(ValueError, match="MOEKIT_CPU_GEMM='amx'"):
        cpu.pick_gemm(torch.bfloat16)


def test_gemm_timing_runs_both_paths(kern):
    secs = cpu._time_gemms(cpu.extension(), torch.bfloat16)
    assert set(secs) == set(cpu.GEMMS) and all(v > 0 for v in secs.values())


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="this kernel has no transparent huge pages")
def test_advise_weights_marks_large_tensors_for_huge_pages():
    big = torch.empty(16 << 20, dtype=torch.uint8)  # fresh mmap: its own mapping
    small = torch.empty(1 << 20, dtype=torch.uint8)  # below 2 huge pages: left alone, no error
    cpu.advise_weights([big, small])
    assert "hg" in _vm_flags(big.data_ptr() + (8 << 20))  # MADV_HUGEPAGE took effect on the large one
    big.fill_(1)  # the memory stays ordinary, writable memory
    assert int(big.sum()) == 16 << 20


def test_the_loader_advises_weights_of_a_cpu_backend_model(tmp_path, monkeypatch):
    import moekit
    from moekit.config import MoEConfig, ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_width=16))
    model = moekit.MoEDecoder(cfg)
    model.init_weights()  # the loader refuses the NaNs uninitialised memory may hold
    moekit.save(model, tmp_path, family="mixtral")
    seen = []
    monkeypatch.setattr(cpu, "advise_weights", lambda ts: seen.extend(t.data_ptr() for t in ts))
    model = moekit.load(tmp_path, kernels="cpu", quantize="int8")  # a quantised weight's data and scales are buffers
    quant = [m for m in model.modules() if isinstance(m, QuantWeight)]
    weights = {p.data_ptr() for p in model.parameters()} | {t.data_ptr() for m in quant for t in (m.data, m.scale)}
    assert quant and weights <= set(seen)
