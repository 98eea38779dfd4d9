"""Query-head units: costs, expected kept parameters, the budget and the hard mask, against hand
counts and brute-force enumeration."""
import itertools

import pytest
import torch

from probprune.budget import Budget
from probprune.units import ModelShape, UnitSpace

SHAPE = ModelShape(n_layers=2, n_kv_heads=2, q_per_kv=3, head_dim=4, hidden=12, intermediate=5,
                   attn_bias=True, o_bias=False)
QH = UnitSpace(SHAPE, attn_units="query-head")
KV = UnitSpace(SHAPE)


def _mask(heads, mlp):
    return torch.tensor(heads + mlp, dtype=torch.bool)


def test_costs_by_hand():
    # A query head: 4 q rows + 4 o columns of 12, and 4 q-bias entries; K/V: 8 rows + 8 biases.
    assert SHAPE.query_head_cost == 2 * 4 * 12 + 4
    assert SHAPE.kv_cost == 2 * 4 * 12 + 8
    assert SHAPE.head_cost == 3 * SHAPE.query_head_cost + SHAPE.kv_cost
    assert QH.n_heads == 2 * 6 and QH.heads_per_layer == 6
    assert QH.prunable_params == KV.prunable_params  # the same parameters, finer units


def test_a_group_pays_its_keys_and_values_once():
    one = [1, 0, 0, 0, 0, 0]
    two_same = [1, 1, 0, 0, 0, 0]
    two_apart = [1, 0, 0, 1, 0, 0]
    none = [0] * 6
    mlp = [0] * 10
    q, kv = SHAPE.query_head_cost, SHAPE.kv_cost
    assert float(QH.kept_params(_mask(one + none, mlp))) == q + kv
    assert float(QH.kept_params(_mask(two_same + none, mlp))) == 2 * q + kv
    assert float(QH.kept_params(_mask(two_apart + none, mlp))) == 2 * q + 2 * kv
    # every query head of a group kept = that KV group kept
    assert float(QH.kept_params(_mask([1, 1, 1, 0, 0, 0] + none, mlp))) == \
        float(KV.kept_params(_mask([1, 0, 0, 0], mlp)))


def test_expected_kept_params_equal_the_enumerated_mean():
    """E[kept] under independent Bernoulli query heads, by enumerating one layer's 2^6 masks."""
    torch.manual_seed(0)
    p = torch.rand(6, dtype=torch.float64)
    expected = 0.0
    for bits in itertools.product([0, 1], repeat=6):
        b = torch.tensor(bits, dtype=torch.float64)
        weight = float(torch.prod(torch.where(b > 0, p, 1 - p)))
        mask = torch.cat([b, torch.zeros(6 + 10, dtype=torch.float64)])
        expected += weight * float(QH.kept_params(mask))
    probs = torch.cat([p, torch.zeros(6 + 10, dtype=torch.float64)])
    assert float(QH.kept_params(probs)) == pytest.approx(expected, rel=1e-12)


def test_views_of_either_unit_kind():
    heads = torch.tensor([[1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert QH.kv_kept(heads).tolist() == [[True, True], [False, False]]
    assert torch.equal(QH.query_kept(heads), heads)
    groups = torch.tensor([[True, False]])
    assert KV.query_kept(groups).tolist() == [[True, True, True, False, False, False]]
    assert torch.equal(KV.kv_kept(groups), groups)


@pytest.mark.parametrize("mode,scope", [("global", "global"), ("per-type", "global"),
                                        ("global", "layer")])
def test_projection_meets_the_budget_in_expectation(mode, scope):
    budget = Budget.build(QH, 0.4, mode, scope)
    torch.testing.assert_close(budget.kept_by_group(torch.ones(QH.n_units)).sum(),
                               torch.tensor(float(QH.prunable_params), dtype=torch.float64))
    torch.manual_seed(1)
    for _ in range(3):
        p = budget.project(torch.rand(QH.n_units, dtype=torch.float64))
        torch.testing.assert_close(budget.kept_by_group(p), budget.targets, rtol=1e-9, atol=1e-3)
        assert abs(float(QH.kept_params(p)) - budget.total_target) < 1e-3


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_hard_mask_fits_and_leaves_no_unit_that_would_still_fit(sparsity):
    budget = Budget.build(QH, sparsity)
    torch.manual_seed(2)
    for _ in range(5):
        probs = torch.rand(QH.n_units, dtype=torch.float64)
        keep = budget.hard_mask(probs)
        kept = float(QH.kept_params(keep.double()))
        assert kept <= budget.total_target + 1e-6
        # no dropped unit would still fit at its true marginal cost (K/V paid if its group is shut)
        for u in (~keep).nonzero().flatten().tolist():
            trial = keep.clone()
            trial[u] = True
            assert float(QH.kept_params(trial.double())) > budget.total_target + 1e-6, u


def test_hard_mask_follows_the_probabilities():
    """Prefers the likeliest units: with heads of one group far likelier, it keeps them together
    and pays the group's K/V once."""
    budget = Budget.build(QH, 0.5, "per-type")
    probs = torch.zeros(QH.n_units, dtype=torch.float64)
    probs[:3] = 0.9   # layer 0, group 0
    probs[6:9] = 0.8  # layer 1, group 0
    probs[12:] = 0.5  # channels
    keep = budget.hard_mask(probs)
    assert keep[:3].all() and keep[6:9].all()
    assert not keep[3:6].any() and not keep[9:12].any()
