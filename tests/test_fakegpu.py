"""The engine's stages with the model on a CUDA device, without a GPU (:mod:`tests.fakegpu`):
loading and placement, the init's statistics, a search step, compensation, the export's slicing,
the reload, in bfloat16, float16 and float32, on ``cuda`` and spread over ``cuda:0`` +
``cuda:1``. Each stage runs for real on the CPU first; its data-dependent values (a mask's kept
lists, the step's losses read on the host) are that run's, replayed in the fake run.

Defects a device or dtype mismatch shows, each caught here before its fix:
* the export's index tensors made on the CPU for CUDA weights (``index_select`` across devices)
  -> ``test_export_slices_on_the_weights_device``;
* ``--dtype`` float32 on a GPU -> ``test_auto_dtype_is_bfloat16_on_cuda``;
* the pruned copy built in full on the model's device beside the dense model ->
  ``test_pruned_model_holds_one_layer_on_the_device``.
"""
import os

import pytest
import torch

from tests.fakegpu import assert_all_on, build_model, shadow
from tests.tiny_models import tiny_config

pytestmark = pytest.mark.fakegpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SHARDED = ["cuda:0", "cuda:1"]


def _ids(device, n=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, T), generator=g).to(device)


def _params(model):
    return dict(model.named_parameters())


def _layer_device(model, l):
    return next(model.model.layers[l].parameters()).device


# ---------------------------------------------------------------------------------------------
# loading and placement

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_load_model_puts_every_weight_on_the_device_in_its_dtype(tiny_model_dirs, dtype):
    from probprune.models import load_model

    def stage(device, dtype):
        model, _ = load_model(tiny_model_dirs["llama"], dtype=DTYPE_NAMES[dtype], device=device)
        return model, model(_ids(device)).logits

    _, (model, logits) = shadow(stage, cache="load", dtype=dtype)
    assert_all_on(_params(model), "cuda", dtype)
    assert_all_on({"logits": logits}, "cuda", dtype)


def test_load_model_spreads_layers_over_two_devices(tiny_model_dirs):
    from probprune.models import load_model

    def stage(device, dtype):
        devices = SHARDED if device != "cpu" else None
        model, _ = load_model(tiny_model_dirs["llama"], dtype=DTYPE_NAMES[dtype], device=device,
                              devices=devices)
        return model, model(_ids(device)).logits

    _, (model, logits) = shadow(stage)
    layers = [_layer_device(model, l) for l in range(len(model.model.layers))]
    assert set(map(str, layers)) == set(SHARDED), layers
    assert model.lm_head.weight.device == torch.device("cuda:1")
    assert logits.device == torch.device("cuda:1") and logits.dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_auto_dtype_is_bfloat16_on_cuda(tiny_model_dirs, device):
    """Defect: ``--dtype`` defaulted to float32 on a GPU (no tensor cores). ``auto`` loads the
    float32 checkpoint in bfloat16 there, and stays float32 on the CPU."""
    from probprune.config import PruneConfig
    from probprune.models import load_model

    assert PruneConfig.__dataclass_fields__["dtype"].default == "auto"

    def stage(device, dtype):
        model, _ = load_model(tiny_model_dirs["llama"], dtype="auto", device=device)
        return model

    real, fake = shadow(stage, cache="auto_dtype", device=device)
    assert real.lm_head.weight.dtype == torch.float32  # the CPU run
    assert_all_on(_params(fake), device, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# the init, the search step, compensation: the engine's stages on one model

def _engine(model_dir, device, dtype, devices=None):
    """The tiny Llama loaded onto ``device`` (or spread over ``devices`` when the stage runs on
    the fake GPU), and its K-mask forward."""
    from probprune.forward import MaskedCausalLM
    from probprune.models import load_model

    sharded = devices if device != "cpu" else None
    model, _ = load_model(model_dir, dtype=DTYPE_NAMES[dtype], device=device, devices=sharded)
    return model, MaskedCausalLM(model, include_layers=True)


def _budget(engine, sparsity=0.4):
    from probprune.budget import Budget
    from probprune.units import UnitSpace

    shape = engine.units.shape
    return Budget.build(UnitSpace(shape, True, 8), sparsity)


def _init(model, engine, device):
    from probprune.importance import initial_probs

    budget = _budget(engine)
    space, probs = initial_probs(model, budget, "wanda-sp", _ids(device, 6), progress=False)
    return budget, space, probs


@pytest.mark.parametrize("devices", [None, SHARDED], ids=["cuda", "cuda0+cuda1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_init_statistics_on_the_device(tiny_model_dirs, dtype, devices):
    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["llama"], device, dtype, devices)
        _, space, probs = _init(model, engine, device)
        return probs

    real, probs = shadow(stage, cache="init", dtype=dtype)
    assert probs.shape == real.shape and probs.dtype == torch.float32
    assert probs.device.type in ("cpu", "cuda")


@pytest.mark.parametrize("devices", [None, SHARDED], ids=["cuda", "cuda0+cuda1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_search_step_on_the_device(tiny_model_dirs, dtype, devices):
    """One step: K masks sampled on the device, their K losses through the ops' fake kernels,
    the REINFORCE update and the budget projection; then the held-out score of the hard mask."""
    from probprune.policy import Policy, PolicyConfig, PolicyState
    from probprune.search import Search, SearchForward, SearchState

    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["llama"], device, dtype, devices)
        budget, space, probs = _init(model, engine, device)
        forward = SearchForward(engine, space)
        probs = probs.to(engine.device)
        hard = budget.hard_mask(probs)
        state = SearchState.start(probs, hard, 5.0)
        policy = Policy(PolicyConfig(steps=1), PolicyState(probs))
        search = Search(forward, budget, policy, state, _ids("cpu", 8), _ids("cpu", 2, seed=1),
                        steps=1, k=4, batch_size=2, eval_every=1, seed=0)
        record = search.run_step()
        return policy.probs, engine.losses(_ids(device, 2), engine.all_ones(3)), record

    real, (probs, losses, record) = shadow(stage, cache="search_step", dtype=dtype)
    head = torch.device("cuda:1" if devices else "cuda:0")
    assert probs.device == head and probs.dtype == torch.float32
    assert losses.device == head and losses.dtype == torch.float32 and losses.shape == (3,)
    assert record["step"] == 1 and "val_loss" in record


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_search_loss_after_each_masks_refit_on_the_device(tiny_model_dirs, dtype):
    """``--search-loss refit``: the dense model's input statistics, then K losses each after its
    own least-squares refit."""
    from probprune.compensate import input_grams

    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["llama"], device, dtype)
        grams = input_grams(engine, _ids(device, 4), progress=False)
        engine.use_refits(grams)
        masks = torch.rand(3, engine.units.n_units) > 0.3
        return grams, engine.losses(_ids(device, 2), masks.to(engine.device))

    real, (grams, losses) = shadow(stage, cache="search_refit", dtype=dtype)
    assert grams.keys() == real[0].keys()
    for name, g in grams.items():
        assert g.device.type == "cuda" and g.shape == real[0][name].shape, name
    assert losses.device.type == "cuda" and losses.dtype == torch.float32


@pytest.mark.parametrize("devices", [None, SHARDED], ids=["cuda", "cuda0+cuda1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_compensation_statistics_and_solve_on_the_device(tiny_model_dirs, dtype, devices):
    """The sequential refit with the bias and the OBS channel selection (the CLI's defaults):
    the refit weights come back on the host in the model's dtype, the mask with them."""
    from probprune.compensate import compensate
    from probprune.settings import CompensationSettings

    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["llama"], device, dtype, devices)
        budget, space, probs = _init(model, engine, device)
        mask = space.expand(budget.hard_mask(probs).float().cpu()[None])[0].bool()
        comp = compensate(engine, mask, _ids(device, 6),
                          CompensationSettings(compensate="sequential", compensate_bias=True,
                                               compensate_select="obs"),
                          progress=False)
        return comp

    real, comp = shadow(stage, cache="compensation", dtype=dtype)
    assert comp.weights.keys() == real.weights.keys() and comp.weights
    assert_all_on(comp.weights, "cpu", dtype, "refit ")
    for key, t in comp.weights.items():
        assert t.shape == real.weights[key].shape, key


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_gemma_init_forward_and_compensation_on_the_device(tiny_model_dirs, dtype):
    """Gemma 3's own paths: two rotary tables, the sandwich norms, the GeGLU MLP, and the
    refit through the out norms, from the init's mask."""
    from probprune.compensate import compensate
    from probprune.settings import CompensationSettings

    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["gemma3"], device, dtype)
        budget, space, probs = _init(model, engine, device)
        mask = space.expand(budget.hard_mask(probs).float().cpu()[None])[0].bool()
        losses = engine.losses(_ids(device, 2), torch.stack([mask, engine.all_ones()[0].cpu()]))
        return losses, compensate(engine, mask, _ids(device, 6), CompensationSettings(),
                                  progress=False)

    real, (losses, comp) = shadow(stage, cache="gemma", dtype=dtype)
    assert losses.device == torch.device("cuda:0") and losses.dtype == torch.float32
    assert comp.weights.keys() == real[1].weights.keys() and comp.weights
    assert_all_on(comp.weights, "cpu", dtype, "refit ")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_the_lost_searchs_mask_is_measured_on_the_device(tiny_model_dirs, dtype):
    """When the compensated init wins the selection, the search's own best mask is measured
    beside it (report.json ``search_bare``, ``search_compensated``): a perplexity through the
    K-mask forward and one of the in-memory pruned model with that mask's refit."""
    from probprune.compensate import compensate
    from probprune.config import PruneConfig
    from probprune.pipeline import Loaded, measure_beside_dense_model
    from probprune.selection import Selection
    from probprune.settings import CompensationSettings

    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["llama"], device, dtype)
        init_mask, searched = _mask(engine.units, seed=1), _mask(engine.units, seed=2)
        settings = CompensationSettings(compensate="parallel")
        init_comp, search_comp = (compensate(engine, m, _ids(device, 6), settings,
                                             progress=False) for m in (init_mask, searched))
        selection = Selection(init_mask, init_comp, 0, init_compensation=init_comp,
                              lost_search=(searched, search_comp))
        run = Loaded(model, None, engine, None, None, "ids", _ids("cpu", 1, T=80)[0], 0.0)
        cfg = PruneConfig(model="tiny", sparsity=0.4, out="unused", seqlen=16, eval_batch_size=2,
                          progress=False, compensate="parallel")
        return measure_beside_dense_model(cfg, run, selection, init_mask).perplexity

    real, fake = shadow(stage, cache="lost_search", dtype=dtype)
    assert set(fake) == set(real) == {"pruned_bare", "init_compensated", "search_bare",
                                      "search_compensated"}
    assert fake["search_bare"]["windows"] == real["search_bare"]["windows"] == 5


# ---------------------------------------------------------------------------------------------
# the export and the reload

def _mask(units, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(units.n_units, generator=g) > 0.4


@pytest.mark.parametrize("devices", [None, SHARDED], ids=["cuda", "cuda0+cuda1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_export_slices_on_the_weights_device(tiny_model_dirs, dtype, devices):
    """Defect: the kept lists became index tensors on the CPU and ``index_select``-ed CUDA
    weights ("Expected all tensors to be on the same device") after the whole search. The export
    slices onto the host tensor by tensor; the in-memory pruned model runs on the device."""
    from probprune.export import pruned_config, pruned_model, pruned_state_dict

    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["llama"], device, dtype, devices)
        config, units = model.config, engine.units
        mask = _mask(units)
        sd, sizes, kept = pruned_state_dict(model, units, mask, device="cpu")
        in_memory = pruned_model(model, units, mask)
        logits = in_memory(_ids(device)).logits
        return sd, pruned_config(config, sizes, kept["layers"]), logits

    (real_sd, real_cfg, _), (sd, cfg, logits) = shadow(stage, cache="export", dtype=dtype)
    assert_all_on(sd, "cpu", dtype)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        k: tuple(v.shape) for k, v in real_sd.items()}
    assert cfg.probprune_layout == real_cfg.probprune_layout
    assert logits.device == torch.device("cuda:1" if devices else "cuda:0")
    assert logits.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_export_with_refit_weights_on_the_device(tiny_model_dirs, dtype):
    """Compensation's weights live on the host; the pruned model moves them to the layer's
    device as it slices."""
    from probprune.compensate import compensate
    from probprune.settings import CompensationSettings
    from probprune.export import pruned_model

    def stage(device, dtype):
        model, engine = _engine(tiny_model_dirs["llama"], device, dtype)
        mask = _mask(engine.units, seed=1)
        comp = compensate(engine, mask, _ids(device, 6),
                          CompensationSettings(compensate="parallel", compensate_bias=True),
                          progress=False)
        return pruned_model(model, engine.units, comp.mask, comp.weights)(_ids(device)).logits

    _, logits = shadow(stage, cache="export_refit", dtype=dtype)
    assert logits.device.type == "cuda" and logits.dtype == dtype


def test_pruned_model_holds_one_layer_on_the_device():
    """Defect: the physically pruned copy was built in full on the model's device beside the
    dense model. It is sliced layer by layer as the forward reaches each layer, and only that
    layer holds real weights; the result equals the fully sliced model's."""
    from probprune.export import pruned_model, pruned_state_dict
    from probprune.families import units_of

    config = tiny_config("llama", num_hidden_layers=4)
    model = build_model(config, "cpu", torch.float32)
    units = units_of(config, True)
    mask = _mask(units, seed=3)
    mask[units.n_units - units.n_layers:] = True  # every layer kept: four to watch
    lazy = pruned_model(model, units, mask)
    live = []

    def count(module, args, kwargs=None):  # which layers hold real weights, inside a forward
        live.append([i for i, layer in enumerate(lazy.model.layers)
                     if any(not p.is_meta for p in layer.parameters())])

    for layer in lazy.model.layers:
        layer.register_forward_hook(count, prepend=True)
    assert all(p.is_meta for layer in lazy.model.layers for p in layer.parameters())
    ids = _ids("cpu")
    logits = lazy(ids).logits
    assert live == [[0], [1], [2], [3]]  # each layer alone, while it runs
    assert all(p.is_meta for layer in lazy.model.layers for p in layer.parameters())

    sd, sizes, kept = pruned_state_dict(model, units, mask)
    from probprune.export import pruned_config
    from probprune.families import family_of
    pruned = pruned_config(config, sizes, kept["layers"])
    eager = family_of(config).pruned_class(pruned)(pruned)
    eager.load_state_dict(sd)
    torch.testing.assert_close(logits, eager.eval()(ids).logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_reload_of_an_export_onto_the_device(tmp_path, dtype):
    from probprune.export import export_pruned
    from probprune.models import load_pruned
    from probprune.families import units_of
    from tests.tiny_models import make_tokenizer

    config = tiny_config("llama")
    model = build_model(config, "cpu", torch.float32)
    units = units_of(config, True)
    out = export_pruned(model, make_tokenizer(), units, _mask(units), str(tmp_path / "export"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))

    def stage(device, dtype):
        pruned = load_pruned(out, dtype=DTYPE_NAMES[dtype], device=device)
        return pruned, pruned(_ids(device)).logits

    _, (pruned, logits) = shadow(stage, cache="reload", dtype=dtype)
    assert_all_on(_params(pruned), "cuda", dtype)
    assert logits.device.type == "cuda" and logits.dtype == dtype
