"""The Triton kernels against their plain PyTorch twin (moekit/kernels/reference.py).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors,
small shapes); the ``gpu``-marked tests at the end run the real shapes on CUDA. Fast-path
checks patch the reference functions to raise, so a silent fallback cannot pass.
"""

import contextlib
import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if importlib.util.find_spec("triton") is None:
    pytest.skip("the Triton kernels need the triton package (pip install triton)", allow_module_level=True)

from tests.tritonenv import GPU, interpreted_triton

# Without a GPU, triton must be imported under TRITON_INTERPRET=1: triton.language's own helpers
# (tl.sum, ...) and moekit's kernels are both built for the interpreter when decorated.
tk = interpreted_triton()
if tk is None:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set, so it cannot run on the CPU in this "
                "session (run this file on its own)", allow_module_level=True)
from moekit.kernels import get_backend, reference
from moekit.kernels.triton import align as align_mod
from moekit.kernels.triton import routing
from moekit.kernels.triton.interpret import numpy_compat
from moekit.kernels.triton.moe import fused_moe
from moekit.kernels.weights import ExpertWeights

DEV = "cuda" if GPU else "cpu"


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Interpreted kernels read TRITON_INTERPRET while they run, so it stays set for this module only."""
    if GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as m, numpy_compat():
        m.setenv("TRITON_INTERPRET", "1")
        yield


@contextlib.contextmanager
def no_fallback(monkeypatch, *names):
    def boom(*a, **k):
        raise AssertionError("the Triton backend fell back to the reference path")

    with monkeypatch.context() as m:
        for n in names:
            m.setattr(reference, n, boom)
        yield


g = torch.Generator(DEV).manual_seed(0)  # on the device: full-shape weights are drawn there
cpu_g = torch.Generator().manual_seed(1)


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


# The interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest), which costs the kernels up to one
# more bf16 ulp per rounding there; a wrong expert, weight or mask is off by O(1), far beyond either slack.
BF16_SLACK = 1e-3 if GPU else 2 ** -8


def assert_as_good(got, ref, truth, dtype):
    """fp32: equal to the float64 truth; bf16: no worse than twice the reference path's own error (+ slack)."""
    got, truth = got.double().cpu(), truth.double().cpu()
    scale = truth.abs().max().clamp_min(1e-6)
    err = (got - truth).abs().max() / scale
    if dtype == torch.float32:
        assert err < 1e-5, f"relative error {err:.2e}"
    else:
        ref_err = (ref.double().cpu() - truth).abs().max() / scale
        assert err <= 2 * ref_err + BF16_SLACK, f"relative error {err:.2e}, reference path {ref_err:.2e}"


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("T, E, K, score, renorm, eps, bias", [
    (1, 8, 2, "softmax", True, 0.0, False), (5, 16, 6, "softmax", True, 1e-6, False),
    (33, 64, 6, "softmax", False, 0.0, False), (7, 16, 4, "sigmoid", True, 0.0, True),
    (3, 3, 3, "softmax", True, 0.0, True), (70, 8, 1, "sigmoid", False, 0.0, False), (0, 8, 2, "softmax", True, 0, 0)])
def test_route(T, E, K, score, renorm, eps, bias):
    logits = rnd(T, E, scale=2.0)
    b = rnd(E, scale=0.5) if bias else None
    w, ids = routing.route(logits, K, score, renorm, eps, b)
    w_ref, ids_ref = reference.route(logits, K, score, renorm, eps, b)
    assert ids.dtype == ids_ref.dtype and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_route_ties_go_to_the_lower_index():
    logits = torch.zeros(3, 8, device=DEV)
    logits[1, 5] = logits[1, 2] = 1.0
    w, ids = routing.route(logits, 3)
    assert ids.tolist() == reference.route(logits, 3)[1].tolist() == [[0, 1, 2], [2, 5, 0], [0, 1, 2]]


def test_route_bf16_logits_and_bad_k():
    logits = rnd(9, 16, dtype=torch.bfloat16)
    assert torch.equal(routing.route(logits, 4)[1], reference.route(logits, 4)[1])
    with pytest.raises(ValueError, match="k=17"):
        routing.route(logits, 17)


# ----------------------------------------------------------------------------- alignment
def expected_alignment(ids, E, C, bm):
    T, K = ids.shape
    e = torch.cat([ids.cpu(), (E + torch.arange(C)).expand(T, C)], 1).reshape(-1)
    slots, blocks = [], []
    for x in range(E + C):
        mine = (e == x).nonzero().flatten().tolist()
        n = -(-len(mine) // bm) * bm
        slots += mine + [T * (K + C)] * (n - len(mine))
        blocks += [x] * (n // bm)
    return slots, blocks


@pytest.mark.parametrize("T, E, K, C, bm, skew", [
    (1, 8, 2, 0, 16, False), (5, 16, 4, 2, 16, False), (40, 4, 2, 1, 16, True), (3, 64, 6, 2, 16, False),
    (100, 16, 6, 0, 32, False), (37, 8, 3, 3, 64, True), (0, 8, 2, 0, 16, False)])
def test_align(T, E, K, C, bm, skew):
    ids = torch.stack([torch.randperm(E, generator=cpu_g)[:K] for _ in range(T)]) if T else torch.empty(0, K).long()
    if skew:  # every token on the same few experts: the rest have zero tokens
        ids = torch.arange(K).expand(T, K) * 2 % E
    sorted_u, block_expert, total = align_mod.align(ids.to(DEV), E, C, bm)
    slots, blocks = expected_alignment(ids, E, C, bm)
    n = int(total)
    assert n == len(slots) and n <= sorted_u.numel() == align_mod.padded_bound(T * (K + C), E + C, bm)
    assert sorted_u[:n].tolist() == slots
    assert block_expert[:n // bm].tolist() == blocks and (block_expert[n // bm:] == -1).all()


# ----------------------------------------------------------------------------- fused MoE
def moe_case(T, D, F, E, K, Fs, gated, dtype, skew=False):
    x = rnd(T, D, dtype=dtype)
    w13, w2 = rnd(E, 2 * F, D, dtype=dtype, scale=D ** -0.5), rnd(E, D, F, dtype=dtype, scale=F ** -0.5)
    logits = rnd(T, E)
    if skew:  # a ragged load: most tokens pile onto expert 0, several experts get none
        logits[:, 0] += 4.0
        logits[:, E // 2:] -= 8.0
    w, ids = reference.route(logits, K)
    shared = None
    if Fs:
        shared = (rnd(2 * Fs, D, dtype=dtype, scale=D ** -0.5), rnd(D, Fs, dtype=dtype, scale=Fs ** -0.5),
                  torch.rand(T, generator=g, device=DEV).to(dtype) if gated else None)
    return x, w13, w2, ids, w, shared


def ref_moe(x, w13, w2, ids, w, shared=None):
    """The reference experts over a case's stacks and optional (w13, w2, gate) shared expert."""
    return reference.moe_experts(x, ExpertWeights(w13, w2, *(shared or ())), ids, w)


def truth_of(x, w13, w2, ids, w, shared):
    d = lambda t: None if t is None else t.double()
    sh = None if shared is None else tuple(d(t) for t in shared)
    return ref_moe(d(x), d(w13), d(w2), ids, w.double(), sh)


MOE_CASES = [  # T, D, F, E, K, Fs, gated, skew, paths
    (1, 32, 16, 8, 2, 0, False, False, "decode grouped"), (3, 48, 16, 16, 6, 32, True, False, "decode grouped"),
    (9, 32, 24, 4, 2, 40, False, False, "decode grouped"), (6, 32, 16, 4, 1, 24, True, True, "decode"),
    (20, 32, 16, 16, 4, 16, True, True, "grouped"), (40, 64, 32, 8, 2, 0, False, True, "grouped")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path, T, D, F, E, K, Fs, gated, skew",
                         [(p, *c[:-1]) for c in MOE_CASES for p in c[-1].split()])
def test_fused_moe(T, D, F, E, K, Fs, gated, skew, dtype, path):
    case = moe_case(T, D, F, E, K, Fs, gated, dtype, skew)
    got = fused_moe(*case, path=path)
    assert got.dtype == dtype and got.shape == (T, D)
    assert_as_good(got, ref_moe(*case), truth_of(*case), dtype)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(1, 24), E=st.sampled_from([2, 5, 16]), K=st.integers(1, 4), F=st.sampled_from([16, 24]),
       Fs=st.sampled_from([0, 16, 40]), gated=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_moe_random_shapes(T, E, K, F, Fs, gated, seed):
    """Random shapes (ragged loads, zero-token experts, shared widths that split unevenly), both paths."""
    g.manual_seed(seed)
    case = moe_case(T, 32, F, E, min(K, E), Fs, gated, torch.float32, skew=seed % 2 == 0)
    truth = truth_of(*case)
    for path in ("grouped",) + (("decode",) if T <= 8 else ()):
        assert_as_good(fused_moe(*case, path=path), None, truth, torch.float32)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(0, 150), E=st.integers(1, 40), K=st.integers(1, 6), C=st.integers(0, 3),
       bm=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_align_random_shapes(T, E, K, C, bm, seed):
    K = min(K, E)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.empty(0, K).long()
    sorted_u, block_expert, total = align_mod.align(ids.to(DEV), E, C, bm)
    slots, blocks = expected_alignment(ids, E, C, bm)
    n = int(total)
    assert sorted_u[:n].tolist() == slots and block_expert[:n // bm].tolist() == blocks


@pytest.mark.parametrize("path, config", [("grouped", {"BLOCK_N": 32, "BLOCK_K": 16}),
                                          ("decode", {"BLOCK_N": 8, "BLOCK_K": 64})])
def test_fused_moe_other_tiles(path, config):
    """Tiles that do not divide the widths: the masks on N and K edges."""
    case = moe_case(11, 40, 24, 8, 3, 40, True, torch.float32)
    assert_as_good(fused_moe(*case, path=path, config=config), None, truth_of(*case), torch.float32)


def test_fused_moe_zero_tokens_and_bad_shapes():
    x, w13, w2, ids, w, shared = moe_case(4, 32, 16, 8, 2, 16, False, torch.float32)
    assert fused_moe(x[:0], w13, w2, ids[:0], w[:0], shared).shape == (0, 32)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w13, w2[:, :, :8], ids, w, shared)
    with pytest.raises(ValueError, match="shared"):
        fused_moe(x, w13, w2, ids, w, (shared[0], shared[1][:, :8], None))


# ----------------------------------------------------------------------------- row-wise kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_mul(dtype, monkeypatch):
    x, w = rnd(2, 5, 48, dtype=dtype), rnd(48, dtype=dtype)
    h = rnd(7, 2 * 40, dtype=dtype)
    with no_fallback(monkeypatch, "rms_norm", "silu_mul"):
        got_n, got_s = tk.rms_norm(x, w, 1e-6), tk.silu_mul(h)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got_n, reference.rms_norm(x, w, 1e-6), **tol)
    torch.testing.assert_close(got_s, reference.silu_mul(h), **tol)


@pytest.mark.parametrize("B, T, H, G, A", [(1, 1, 4, 2, 16), (2, 5, 4, 4, 20), (3, 9, 2, 1, 8)])
def test_rotary_on_strided_views(B, T, H, G, A, monkeypatch):
    """q and k as the attention layer makes them: strided views into one qkv projection."""
    qkv = rnd(B, T, H + 2 * G, A)
    q, k, _ = qkv.transpose(1, 2).split((H, G, G), dim=1)
    cos, sin = rnd(B, T, A), rnd(B, T, A)
    with no_fallback(monkeypatch, "rotary"):
        got_q, got_k = tk.rotary(q, cos, sin), tk.rotary(k, cos, sin)
    torch.testing.assert_close(got_q, reference.rotary(q, cos, sin), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_k, reference.rotary(k, cos, sin), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- backend and model
def test_backend_selection_and_fallbacks():
    assert get_backend("triton").name == "triton"
    assert get_backend("auto", 1_000, device="cuda:0").name == "triton"
    assert get_backend("auto", 1_000, device="cpu").name == "reference"
    x = rnd(3, 32).requires_grad_()  # autograd: the reference path, so gradients flow
    w13, w2 = rnd(4, 32, 32, scale=0.2), rnd(4, 32, 16, scale=0.2)
    w, ids = reference.route(rnd(3, 4), 2)
    tk.moe_experts(x, ExpertWeights(w13, w2), ids, w).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def tiny_model(kernels, dtype=torch.float32, shared_gate=True):
    from moekit.config import ModelConfig, MoEConfig
    from moekit.models import MoEDecoder

    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      moe=MoEConfig(num_experts=8, top_k=2, expert_width=16, shared_width=24,
                                    shared_gate=shared_gate, renormalize_eps=1e-6),
                      max_position_embeddings=64)
    model = MoEDecoder(cfg, kernels=kernels)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(3))
    return model.to(dtype=dtype, device=DEV).eval()


def test_tiny_model_logits_and_greedy_decode_match_reference(monkeypatch):
    from moekit.engine import Engine, SamplingParams

    fast, ref = tiny_model("triton"), tiny_model("reference")
    ids = torch.randint(0, 96, (2, 7), generator=cpu_g).to(DEV)
    with torch.inference_mode(), no_fallback(monkeypatch, "moe_experts", "route", "rms_norm", "rotary"):
        got = fast(ids)
    with torch.inference_mode():
        want = ref(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 11], [7, 1, 2, 3, 4]]
    assert ([c.token_ids for c in Engine(fast).generate(prompts, params)]
            == [c.token_ids for c in Engine(ref).generate(prompts, params)])


# ----------------------------------------------------------------------------- GPU, full shapes
SHAPES = {  # D, F, E, K, Fs, gated
    "xverse": (2560, 1728, 64, 6, 3456, False),
    "qwen2-moe": (2048, 1408, 60, 4, 5632, True),
    "mixtral": (4096, 14336, 8, 2, 0, False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_moe_full_shapes(shape):
    """Both paths from 1 to 2048 tokens on one set of full-size weights per shape (bf16 vs the float64 truth)."""
    D, F, E, K, Fs, gated = SHAPES[shape]
    x, w13, w2, ids, w, shared = moe_case(2048, D, F, E, K, Fs, gated, torch.bfloat16)
    for T in (1, 4, 16, 17, 300, 2048):
        case = (x[:T], w13, w2, ids[:T], w[:T], None if shared is None else
                (shared[0], shared[1], None if shared[2] is None else shared[2][:T]))
        truth, ref = truth_of(*case), ref_moe(*case)
        for path in ("decode", "grouped") if T <= 64 else ("grouped",):
            assert_as_good(fused_moe(*case, path=path), ref, truth, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_route_full_shape():
    logits = rnd(4096, 64)
    for score in ("softmax", "sigmoid"):
        w, ids = routing.route(logits, 6, score, True, 1e-6)
        w_ref, ids_ref = reference.route(logits, 6, score, True, 1e-6)
        assert (ids == ids_ref).float().mean() > 0.9999  # exp() may differ in the last bit on near-ties
        torch.testing.assert_close(w.sort(-1).values, w_ref.sort(-1).values, rtol=1e-4, atol=1e-6)
