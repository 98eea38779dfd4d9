"""Layer sharding: the balance of contiguous layer runs against brute force, and a model spread
over ``cpu,cpu`` giving the unsplit model's losses, perplexity, compensation and export."""
import itertools

import pytest
import torch

from probprune.compensate import compensate
from probprune.settings import CompensationSettings
from probprune.config import ConfigError, PruneConfig
from probprune.preflight import check
from probprune.data import tokenize_joined
from probprune.evaluate import perplexity
from probprune.forward import MaskedCausalLM
from probprune.memory import largest_shard, param_count, plan
from probprune.models import load_model
from probprune.placement import balance, layer_devices, place
from tests.conftest import ARCHS
from tests.test_memory import LLAMA
from tests.tiny_models import CORPUS


def _loads(costs, owner, n, first, last):
    loads = [sum(c for c, o in zip(costs, owner) if o == j) for j in range(n)]
    loads[0] += first
    loads[-1] += last
    return loads


@pytest.mark.parametrize("seed", range(6))
def test_balance_is_the_best_contiguous_split(seed):
    g = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 50, (7,), generator=g).tolist()
    n, first, last = 2 + seed % 3, seed * 7, 40 - seed * 3
    owner = balance(costs, n, first, last)
    assert owner == sorted(owner) and len(owner) == len(costs)  # contiguous, in layer order
    best = min(max(_loads(costs, o, n, first, last))  # brute force over every monotone split
               for o in itertools.product(range(n), repeat=len(costs)) if list(o) == sorted(o))
    assert max(_loads(costs, owner, n, first, last)) == best


def test_balance_by_hand():
    assert balance([1, 1, 1, 1], 2) == [0, 0, 1, 1]
    assert balance([1, 1, 1, 1], 2, last=2) == [0, 0, 0, 1]  # lm_head weighs on the last device


def _random_masks(units, k, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(k, units.n_units, generator=g) < 0.6
    return masks


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_over_two_devices_gives_the_unsplit_losses(tiny_model_dirs, arch):
    whole, tok = load_model(tiny_model_dirs[arch])
    split, _ = load_model(tiny_model_dirs[arch], devices=["cpu", "cpu"])
    assert len(set(split.model.layers[0]._forward_pre_hooks)) == 1  # the input-moving hook
    ids = tokenize_joined(tok, CORPUS * 2)[: 3 * 16].view(3, 16)
    a, b = MaskedCausalLM(whole), MaskedCausalLM(split)
    assert b.layer_devices == layer_devices(split)
    masks = _random_masks(a.units, 4, 0)
    torch.testing.assert_close(b.losses(ids, masks), a.losses(ids, masks), rtol=0, atol=0)
    stream = tokenize_joined(tok, CORPUS * 4)
    assert perplexity(split, stream, seqlen=16, progress=False).nll == pytest.approx(
        perplexity(whole, stream, seqlen=16, progress=False).nll, rel=1e-6)
    mask = masks[0]
    ca = compensate(a, mask, ids,
                    CompensationSettings(compensate_bias=False, compensate_select="mask"),
                    progress=False)
    cb = compensate(b, mask, ids,
                    CompensationSettings(compensate_bias=False, compensate_select="mask"),
                    progress=False)
    assert ca.weights.keys() == cb.weights.keys()
    for key in ca.weights:
        torch.testing.assert_close(cb.weights[key], ca.weights[key], rtol=0, atol=0)


def test_place_balances_by_parameters(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    p = place(model, ["cpu", "cpu", "cpu"])
    assert list(p.layers) == sorted(p.layers) and len(p.layers) == len(model.model.layers)
    assert p.lines()[0].startswith("cpu: layers 0-")


def test_the_plan_counts_the_fullest_device():
    c = LLAMA["13b"]
    whole = param_count(c)
    two = largest_shard(c, 2)
    assert whole / 2 <= two < whole / 2 + whole / c.num_hidden_layers  # within one layer of half
    assert largest_shard(c, 1) == whole
    p = plan(c, dtype="bfloat16", k=2, batch_size=8, seqlen=128, devices=2)
    assert p.terms["weights"] == two * 2 and p.devices == 2
    assert "the fullest of one rank's 2 devices" in p.lines()[0]


def test_devices_are_checked(calib_file, tmp_path, monkeypatch):
    base = dict(model="smollm2-135m", sparsity=0.3, out=str(tmp_path / "o"), calib=calib_file,
                eval=calib_file)
    with pytest.raises(ConfigError, match="--devices.*lists one device: use --device"):
        check(PruneConfig(devices=["cpu"], **base))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--devices.*needs a CUDA GPU"):
            check(PruneConfig(devices=["cuda:0", "cuda:1"], **base))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="lists 3 devices.*multiple of 2"):
        check(PruneConfig(devices=["cpu", "cpu", "cpu"], **base))


def test_each_rank_takes_its_group_of_this_machines_devices(monkeypatch):
    from probprune.distributed import local_devices

    devices = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert local_devices(devices) == devices  # no torchrun: all of them
    # Two machines of two ranks: the list names this machine's devices.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_devices(devices) == ["cuda:2", "cuda:3"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert local_devices(devices) == ["cuda:0", "cuda:1"]
