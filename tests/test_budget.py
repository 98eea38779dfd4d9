"""Budget groups, projection onto the budget, and the final hard mask."""
import pytest
import torch

from probprune.budget import Budget, BudgetError
from probprune.units import ModelShape, UnitSpace

SHAPE = ModelShape(n_layers=3, n_kv_heads=2, q_per_kv=3, head_dim=4, hidden=12, intermediate=10,
                   attn_bias=True, o_bias=False)
LAYOUT = UnitSpace(SHAPE)
WITH_LAYERS = UnitSpace(SHAPE, include_layers=True)
# Channel blocks of 4, 4 and 2 channels: search units of unequal cost.
BLOCKS = UnitSpace(SHAPE, channel_block=4)
BLOCKS_WITH_LAYERS = UnitSpace(SHAPE, include_layers=True, channel_block=4)


def test_costs_by_hand():
    # A KV group: 3 query + 1 key + 1 value heads of 4 rows x 12, 3 heads of o_proj columns,
    # and q/k/v biases of 3*4 + 4 + 4; a channel: gate row + up row + down column.
    assert SHAPE.head_cost == (3 + 1 + 1 + 3) * 4 * 12 + (3 + 1 + 1) * 4
    assert SHAPE.channel_cost == 3 * 12
    assert LAYOUT.prunable_params == 3 * (2 * SHAPE.head_cost + 10 * SHAPE.channel_cost)


@pytest.mark.parametrize("layout,mode,scope", [
    (LAYOUT, "global", "global"), (LAYOUT, "per-type", "global"),
    (LAYOUT, "global", "layer"), (LAYOUT, "per-type", "layer"), (WITH_LAYERS, "global", "global"),
    (BLOCKS, "global", "global"), (BLOCKS, "per-type", "layer"),
    (BLOCKS_WITH_LAYERS, "global", "global")])
def test_projection_keeps_bounds_and_meets_budget(layout, mode, scope):
    budget = Budget.build(layout, 0.4, mode, scope, protect_layers=[2] if scope == "global" else [])
    torch.manual_seed(0)
    for _ in range(5):
        probs = torch.rand(layout.n_units, dtype=torch.float64) * 1.4 - 0.2
        p = budget.project(probs)
        assert torch.all(p >= budget.lo) and torch.all(p <= budget.hi)
        torch.testing.assert_close(budget.kept_by_group(p), budget.targets, rtol=1e-9, atol=1e-3)
        # the projection is a shift per group: ordering inside a group is preserved
        g0 = budget.group_of == 0
        inside = (p[g0] > budget.lo[g0]) & (p[g0] < budget.hi[g0])
        diffs = (probs[g0] - p[g0])[inside]
        if diffs.numel() > 1:
            assert diffs.max() - diffs.min() < 1e-9


@pytest.mark.parametrize("layout,mode,scope", [
    (LAYOUT, "global", "global"), (LAYOUT, "per-type", "layer"), (WITH_LAYERS, "global", "global"),
    (BLOCKS, "global", "global"), (BLOCKS, "per-type", "layer"),
    (BLOCKS_WITH_LAYERS, "global", "global")])
def test_hard_mask_meets_budget_within_one_unit(layout, mode, scope):
    budget = Budget.build(layout, 0.35, mode, scope)
    torch.manual_seed(1)
    probs = budget.project(torch.rand(layout.n_units, dtype=torch.float64))
    mask = budget.hard_mask(probs)
    kept = budget.kept_by_group(mask.double())
    # the costliest unit that competes for the budget (layer units are decided first)
    n_competing = layout.n_units - (layout.n_layers if layout.include_layers else 0)
    biggest = float(layout.costs()[:n_competing].max())
    assert torch.all(kept <= budget.targets + 1e-6)
    assert torch.all(budget.targets - kept < biggest)


def test_hard_mask_prefers_high_probabilities():
    budget = Budget.build(LAYOUT, 0.5, "per-type", "global")
    probs = torch.linspace(0, 1, LAYOUT.n_units, dtype=torch.float64)
    mask = budget.hard_mask(probs)
    heads = mask[: LAYOUT.n_heads]
    assert heads.tolist() == [False, False, False, True, True, True]


def test_errors():
    with pytest.raises(BudgetError, match="strictly between 0 and 1"):
        Budget.build(LAYOUT, 1.0)
    with pytest.raises(BudgetError, match="strictly between 0 and 1"):
        Budget.build(LAYOUT, 0.0)
    with pytest.raises(BudgetError, match="--budget global --scope global"):
        Budget.build(WITH_LAYERS, 0.3, "per-type")
    with pytest.raises(BudgetError, match="cannot be met"):
        Budget.build(LAYOUT, 0.5, protect_layers=[0, 1])
    with pytest.raises(BudgetError, match="layer 7 does not exist"):
        Budget.build(LAYOUT, 0.5, protect_layers=[7])
