"""Sampling knobs against hand-computed cases (transformers / OpenAI semantics)."""

import math

import pytest
import torch

from moekit.engine.sampling import (SamplingParams, apply_penalties, argmax_rows, draw_key, gumbel, sample, warp,
                                   warp_rows)


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], seen, torch.zeros(1, 4))
    # seen positive logits are divided, seen negative ones multiplied (transformers' RepetitionPenaltyLogitsProcessor)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_presence_and_frequency_penalties_hand_computed():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_penalties(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)],
                          torch.zeros(1, 4, dtype=torch.bool), counts)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 4.0, 2.0, 3.0, 0.0])
    kept = torch.isfinite(warp(logits, SamplingParams(top_k=2)))
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda p: torch.isfinite(warp(logits, SamplingParams(top_p=p))).tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]


def test_min_p_scales_with_the_top_probability():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    kept = torch.isfinite(warp(probs.log(), SamplingParams(min_p=0.2))).tolist()
    assert kept == [True, True, False, False]  # threshold 0.2 * 0.6 = 0.12


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0])
    assert warp(logits, SamplingParams(temperature=0.5)).tolist() == [2.0, 4.0]


def test_sampled_frequencies_follow_the_warped_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), -10.0]])
    params = [SamplingParams(top_k=2)]
    draws = [int(sample(logits, params, torch.tensor([draw_key(0, i)]))) for i in range(4000)]
    assert 2 not in draws  # removed by top-k
    assert abs(draws.count(1) / 4000 - 0.75) < 0.03


def test_greedy_and_suppression():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = [SamplingParams(temperature=0)]
    assert sample(logits, params, None).item() == 1
    assert sample(logits, params, None, suppress_BV=torch.tensor([[False, True, False]])).item() == 2


def test_rows_warp_with_their_own_parameters():
    """One vectorised pass equals the single-row warp of each row, whatever its neighbours ask for."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    logits[0, :3] = 4.0  # ties at the top-k boundary are kept, as transformers keeps them
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(min_p=0.1, temperature=0.5),
              SamplingParams(top_k=10, top_p=0.9, min_p=0.05), SamplingParams(temperature=0), SamplingParams()]
    rows = warp_rows(logits, params)
    for b, p in enumerate(params):
        assert torch.equal(rows[b], warp(logits[b], p)), p
    assert torch.isfinite(rows[0]).sum() == 3


def test_draws_depend_on_the_key_only():
    """A row's draw is a function of its key: the same in any batch, different for another draw index."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1000, generator=g)
    keys = torch.tensor([draw_key(7, 0), draw_key(7, 1), draw_key(8, 0)])
    together = sample(logits, [SamplingParams()] * 3, keys)
    alone = [int(sample(logits[b:b + 1], [SamplingParams()], keys[b:b + 1])) for b in range(3)]
    assert together.tolist() == alone
    noise = gumbel(keys, 1000)
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise, gumbel(keys, 1000))


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.0),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("max_new_tokens", 0), ("stop", [""]),
])
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"sampling parameter {field}="):
        SamplingParams(**{field: value})


def test_argmax_rows_is_torch_argmax():
    # the greedy pick goes through NumPy on the CPU: the same first maximum as torch.argmax, ties, NaN
    # (counted as the maximum), infinities and an all -inf row included
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (32, 300), generator=g).float()
    x[3, 7] = x[3, 100] = math.nan
    x[5] = -math.inf
    x[9, 4] = x[9, 8] = math.inf
    x[11, 0] = -0.0
    got = argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(-1))
    assert got[[3, 5, 9]].tolist() == [7, 0, 4]
    assert torch.equal(argmax_rows(x[:, ::2]), x[:, ::2].argmax(-1))  # a strided view
