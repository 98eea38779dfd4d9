"""Model units and search units: costs, channel blocks in the init metric's order, mapped back
to model units."""
import pytest
import torch

from probprune.budget import Budget
from probprune.families import units_of
from probprune.importance import initial_probs, unit_metric
from probprune.models import load_model
from probprune.units import ModelShape, UnitSpace

SHAPE = ModelShape(n_layers=2, n_kv_heads=2, q_per_kv=2, head_dim=4, hidden=8, intermediate=5,
                   attn_bias=False, o_bias=False)
LAYOUT = UnitSpace(SHAPE)
WITH_LAYERS = UnitSpace(SHAPE, include_layers=True)


def SearchSpace(units, channel_block=1, channel_order=None):
    return UnitSpace(units.shape, units.include_layers, channel_block, channel_order)
# Layer 0 ranks its channels 4, 0, 3, 1, 2; layer 1 keeps the identity order.
ORDER = torch.tensor([[4, 0, 3, 1, 2], [0, 1, 2, 3, 4]])


def test_blocks_by_hand():
    space = SearchSpace(LAYOUT, channel_block=2, channel_order=ORDER)
    assert space.blocks_per_layer == 3 and space.n_units == 4 + 6
    assert space.block_sizes().tolist() == [2, 2, 1]
    # Heads 0-3 map to themselves. Layer 0: ranks (4,0) -> block 4, (3,1) -> 5, (2) -> 6.
    assert space.of_model_unit.tolist() == [0, 1, 2, 3,  4, 5, 6, 5, 4,  7, 7, 8, 8, 9]
    assert space.costs().tolist() == [SHAPE.head_cost] * 4 + [2 * 24, 2 * 24, 24] * 2


def test_identity_space_is_the_layout():
    space = SearchSpace(WITH_LAYERS)
    assert space.n_units == WITH_LAYERS.n_units
    assert torch.equal(space.of_model_unit, torch.arange(WITH_LAYERS.n_units))
    assert torch.equal(space.costs(), WITH_LAYERS.costs())


@pytest.mark.parametrize("layout", [LAYOUT, WITH_LAYERS])
@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_accounting_matches_the_expanded_units(layout, block):
    space = SearchSpace(layout, block, ORDER)
    torch.manual_seed(block)
    probs = torch.rand(space.n_units, dtype=torch.float64)
    mask = probs > 0.5
    # Same kept parameters, whether counted per search unit or on the model units it expands to.
    torch.testing.assert_close(space.kept_params(probs), layout.kept_params(space.expand(probs)))
    assert float(space.kept_params(mask)) == float(layout.kept_params(space.expand(mask)))
    assert float(space.costs().sum()) == float(layout.costs().sum())
    # reduce undoes expand; the mean of a block is its members' mean.
    torch.testing.assert_close(space.reduce(space.expand(probs)), probs)
    unit = torch.rand(layout.n_units, dtype=torch.float64)
    idx = space.of_model_unit
    for u in range(space.n_units):
        torch.testing.assert_close(space.reduce(unit)[u], unit[idx == u].mean())
        torch.testing.assert_close(space.reduce(unit, mean=False)[u], unit[idx == u].sum())


def test_rank_channels_orders_each_layer_from_the_highest():
    values = torch.tensor([9.0, 8.0, 7.0, 6.0] + [0.1, 0.5, 0.3, 0.5, 0.9] + [3, 2, 1, 0, -1])
    assert LAYOUT.rank_channels(values).tolist() == [[4, 1, 3, 2, 0], [0, 1, 2, 3, 4]]


def test_bad_spaces():
    with pytest.raises(ValueError, match="between 1 and the intermediate size 5"):
        SearchSpace(LAYOUT, 6)
    with pytest.raises(ValueError, match="between 1 and the intermediate size 5"):
        SearchSpace(LAYOUT, 0)
    with pytest.raises(ValueError, match=r"shape \(1, 5\); the model needs \(2, 5\)"):
        SearchSpace(LAYOUT, 2, ORDER[:1])
    with pytest.raises(ValueError, match="permutation of each layer"):
        SearchSpace(LAYOUT, 2, torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="expected 10 unit values, got 14"):
        SearchSpace(LAYOUT, 2).expand(torch.ones(14))


def test_blocked_init_keeps_the_top_channels_of_each_layer(tiny_model_dirs):
    """With blocks, the init's hard mask keeps in every layer channels that are a prefix of the
    metric's ranking: the metric, not the block boundaries, decides which channels stay."""
    model, _ = load_model(tiny_model_dirs["llama"])
    layout = units_of(model.config)
    budget = Budget.build(SearchSpace(layout, channel_block=3), 0.3)
    windows = torch.randint(0, model.config.vocab_size, (4, 12))
    space, probs = initial_probs(model, budget, "magnitude", windows, progress=False)
    channels = layout.split(space.expand(budget.hard_mask(probs))).mlp
    metric = layout.split(unit_metric(model, layout, "magnitude")).mlp
    assert 0 < int(channels.sum()) < channels.numel()
    for kept, m in zip(channels, metric):
        n = int(kept.sum())
        top = torch.zeros_like(kept)
        top[torch.argsort(m, descending=True, stable=True)[:n]] = True
        assert torch.equal(kept, top)
