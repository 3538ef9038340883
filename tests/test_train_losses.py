"""Training losses against hand-computed values and transformers' own implementation."""

import math

import torch

from moekit.config import MoEConfig
from moekit.kernels.reference import capacity_drop, route
from moekit.models.loss import next_token_nll, perplexity, window_nll
from moekit.models.moe import Routing
from moekit.train.losses import bias_update, cv2_loss, cv_squared, router_losses, smooth_load, switch_loss, z_loss


def routing(logits, k):
    w, ids = route(logits, k)
    return Routing(logits.float(), ids, w)


def test_next_token_nll_masks_positions():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    targets = torch.tensor([[0, 1]])
    total, n = next_token_nll(logits, targets)
    assert n == 2 and math.isclose(total.item(), math.log(2) + math.log(1 + math.exp(2)), rel_tol=1e-6)
    total, n = next_token_nll(logits, targets, torch.tensor([[True, False]]))
    assert n == 1 and math.isclose(total.item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(perplexity(total.item(), n.item()), 2.0, rel_tol=1e-6)
    assert perplexity(1e6, 1) == math.exp(50)  # capped, no overflow


def test_window_nll_scores_each_token_from_the_ones_before():
    """A bigram table as the model: window_nll equals the hand sum of -log p(next | previous)."""
    table_VV = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    tokens_BT = torch.tensor([[1, 3, 0, 4], [2, 2, 1, 0]])
    mask_BT = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    total, n = window_nll(lambda ids: table_VV[ids], tokens_BT, mask_BT)
    logp = table_VV.log_softmax(-1)
    expect = [-logp[row[t - 1], row[t]].item() for row, m in zip(tokens_BT, mask_BT) for t in range(1, 4) if m[t]]
    assert n == 5 and math.isclose(total.item(), sum(expect), rel_tol=1e-6)


def test_switch_loss_hand_computed():
    # two tokens, two experts, top-1: token 0 -> expert 0 (p = 0.5, 0.5 after equal logits: tie -> 0),
    # token 1 -> expert 1 (logits 0, ln 3: p = 0.25, 0.75)
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    f = torch.tensor([0.5, 0.5])
    p = torch.tensor([(0.5 + 0.25) / 2, (0.5 + 0.75) / 2])
    assert math.isclose(switch_loss([routing(logits, 1)], 2).item(), 2 * float((f * p).sum()), rel_tol=1e-6)


def test_switch_loss_equals_transformers_mixtral():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(40, 8, generator=g) * 2 for _ in range(3)]
    ours = switch_loss([routing(lg, 2) for lg in layers], 8)
    theirs = load_balancing_loss_func(tuple(layers), num_experts=8, top_k=2)
    assert math.isclose(ours.item(), theirs.item(), rel_tol=1e-5)
    balanced = [torch.zeros(8, 4) + torch.eye(4).repeat(2, 1) * 10]  # tokens spread evenly over 4 experts
    assert math.isclose(switch_loss([routing(lg, 1) for lg in balanced], 4).item(), 1.0, rel_tol=1e-3)


def test_cv_squared_and_cv2_loss_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert math.isclose(cv_squared(x).item(), 1.0 / 4.0, rel_tol=1e-6)  # unbiased var 1, mean 2
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    r = routing(logits, 1)  # both tokens -> expert 0 with weight 1 (renormalised)
    importance, load = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 0.0])
    want = cv_squared(importance) + cv_squared(load)
    assert math.isclose(cv2_loss([r], 3, 1).item(), want.item(), rel_tol=1e-6)
    assert math.isclose(want.item(), 2 * 3.0, rel_tol=1e-6)  # var [2,0,0] = 4/3, mean^2 = 4/9


def test_smooth_load_hand_computed():
    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[1.2, -0.1, -0.9]])
    std = torch.tensor([[0.5, 0.5, 0.5]])
    w, ids = route(noisy, 1)
    r = Routing(noisy, ids, w, clean, std)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    # top-2 noisy values: 1.2 (k-th = in-threshold for others), -0.1 ((k+1)-th, threshold for the chosen one)
    want = [phi((1.0 - (-0.1)) / 0.5), phi((0.0 - 1.2) / 0.5), phi((-1.0 - 1.2) / 0.5)]
    torch.testing.assert_close(smooth_load(r, 1), torch.tensor(want), rtol=1e-5, atol=1e-7)


def test_z_loss_and_router_losses_weights():
    r = routing(torch.zeros(4, 2), 1)
    assert math.isclose(z_loss([r]).item(), math.log(2) ** 2, rel_tol=1e-6)
    m = MoEConfig(num_experts=2, top_k=1, expert_width=4, aux_loss="switch", aux_loss_coef=0.5, z_loss_coef=0.1)
    out = router_losses([r], m)
    assert math.isclose(out["z_loss"].item(), 0.1 * math.log(2) ** 2, rel_tol=1e-6)
    assert math.isclose(out["aux_loss"].item(), 0.5 * switch_loss([r], 2).item(), rel_tol=1e-6)
    assert router_losses([r], MoEConfig(num_experts=2, top_k=1, expert_width=4, aux_loss="none")) == {}


def test_bias_update_moves_towards_balance():
    delta = bias_update(torch.tensor([10.0, 2.0, 0.0, 4.0]), 0.01)  # mean 4: over, under, under, equal
    torch.testing.assert_close(delta, torch.tensor([-0.01, 0.01, 0.01, 0.0]) - 0.0025)


def test_bias_shifts_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    w0, ids0 = route(logits, 1)
    w1, ids1 = route(logits, 1, bias_E=torch.tensor([0.0, 1.0, 0.0]), renormalize=False)
    assert ids0.item() == 0 and ids1.item() == 1
    assert math.isclose(w1.item(), logits.softmax(-1)[0, 1].item(), rel_tol=1e-6)


def test_capacity_drop_keeps_first_slots_per_expert():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2]])
    w = torch.ones(3, 2)
    kept, dropped = capacity_drop(ids, w, 3, capacity=2)
    # expert 0 gets three first choices: the third token's is dropped; expert 1 gets two second choices
    assert dropped == 1 and kept.tolist() == [[1, 1], [1, 1], [0, 1]]
