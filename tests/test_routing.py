"""Routing math: property tests of the top-k forms and the reference expert kernel."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.kernels.reference import moe_experts
from moekit.kernels.weights import ExpertWeights
from moekit.kernels.reference import route
from moekit.models.moe import Experts

shapes = st.tuples(st.integers(1, 12), st.integers(2, 16)).flatmap(
    lambda te: st.tuples(st.just(te[0]), st.just(te[1]), st.integers(1, te[1]), st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_softmax_topk_renorm_equals_topk_then_softmax(args):
    T, E, k, seed = args
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    w, ids = route(logits, k, "softmax", renormalize=True)
    top_logits, top_ids = torch.topk(logits, k, dim=-1)  # LLaMA-MoE form: softmax over the k chosen logits
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(w.double(), top_logits.softmax(-1), rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([0.0, 1e-6, 1e-2]))
def test_weights_sum_as_specified(args, eps):
    T, E, k, seed = args
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 3
    probs = logits.softmax(-1)
    top = torch.topk(probs, k, dim=-1).values.sum(-1)
    w, _ = route(logits, k, "softmax", renormalize=True, eps=eps)
    torch.testing.assert_close(w.sum(-1), top / (top + eps))  # XVERSE: sum(w) / (sum(w) + 1e-6)
    w, _ = route(logits, k, "softmax", renormalize=False)
    torch.testing.assert_close(w.sum(-1), top)  # Qwen2-MoE / DeepSeek default: the raw top-k mass
    assert torch.all(w > 0)
    s, ids = route(logits, k, "sigmoid", renormalize=False)
    torch.testing.assert_close(s, torch.sigmoid(logits).gather(-1, ids))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 10), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_ties_go_to_lower_index_deterministically(E, n_distinct, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, n_distinct, (16, E), generator=g).float()  # many exact ties
    k = max(1, E // 2)
    w1, ids1 = route(logits, k)
    w2, ids2 = route(logits.clone(), k)
    assert torch.equal(ids1, ids2) and torch.equal(w1, w2)
    for row, chosen in zip(logits, ids1):
        # expected: sort by (-value, index)
        want = sorted(range(E), key=lambda e: (-row[e].item(), e))[:k]
        assert chosen.tolist() == want


def dense_moe(x, w13, w2, ids, weights):
    """Every expert on every token, masked by the routing: an oracle for the sparse kernel."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        gate, up = (x @ w13[e].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[e].T
        coef = (weights * (ids == e)).sum(-1, keepdim=True)
        out += coef * y
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_reference_kernel_matches_dense_oracle(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    D, Fw = 12, 10
    k = min(E, 1 + seed % 3)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * Fw, D, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, D, Fw, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    logits[:, 0] -= 100  # expert 0 never chosen unless k == E: zero-token experts are exercised
    w, ids = route(logits, k)
    got = moe_experts(x, ExpertWeights(w13, w2), ids, w.double())
    torch.testing.assert_close(got, dense_moe(x, w13, w2, ids, w.double()))


def test_padded_experts_equal_separate_mlps():
    g = torch.Generator().manual_seed(0)
    widths, D = [3, 7, 5], 8
    ex = Experts(D, widths).double()
    torch.nn.init.normal_(ex.w13, generator=g)
    torch.nn.init.normal_(ex.w2, generator=g)
    ex.zero_padding()
    x = torch.randn(9, D, generator=g, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]] * 3)
    w = torch.rand(9, 2, generator=g, dtype=torch.float64)
    got = moe_experts(x, ExpertWeights(ex.w13, ex.w2), ids, w)
    views = ex.views()
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(2):
            e = ids[t, j].item()
            h = F.silu(views[f"{e}.gate"] @ x[t]) * (views[f"{e}.up"] @ x[t])
            want[t] += w[t, j] * (views[f"{e}.down"] @ h)
    torch.testing.assert_close(got, want)
    assert views["0.gate"].shape == (3, D) and views["1.down"].shape == (D, 7)
