"""The prune settings: one definition per field, from which argparse, validation, the resume check
and the report's settings are derived; every bad setting fails in validate() with one line that
names the flag and the rule, before any model is loaded (no test here loads one)."""
import argparse
import dataclasses
import json
import math
from typing import Optional

import pytest
import torch
from safetensors.torch import save_file

from probprune.config import ConfigError, EvalConfig, PruneConfig, default_device
from probprune.flags import add_eval_arguments, add_prune_arguments, from_args
from probprune.preflight import check
from tests.tiny_models import CORPUS

NAN, INF = math.nan, math.inf

# The settings of a pruning run before the config module existed (its dataclass and the keys a
# resume had to match), written out here as the oracle the derived views must reproduce; the
# keys in the order of the stages (model and data, budget, search, compensation, evaluation,
# system).
SETTINGS_KEYS = [
    "model", "seqlen", "calib", "nsamples", "val_windows", "select_windows",
    "sparsity", "shape", "attn_units", "budget", "scope", "attn_sparsity", "mlp_sparsity", "prune_layers",
    "protect_layers",
    "steps", "k", "batch_size", "lr", "min_lr_ratio", "init", "init_temperature",
    "init_attn_sparsity", "init_windows", "channel_block", "select_candidates", "search_loss",
    "search_refit_windows", "optimizer", "antithetic", "control_variate", "cv_history",
    "cv_ridge", "baseline", "ma_window", "eval_every", "checkpoint_every",
    "compensate", "compensate_select", "compensate_target", "compensate_inputs",
    "compensate_bias", "compensate_damping", "compensate_windows",
    "eval", "eval_file", "max_eval_windows", "window_stride", "eval_batch_size", "eval_tasks",
    "tasks_path", "task_limit", "speed_tokens", "speed_rounds",
    "out", "device", "devices", "dtype", "backend", "seed", "dist_timeout", "dry_run", "resume",
    "progress", "stop_after"]
DEFAULTS = dict(
    steps=400, k=2, batch_size=4, seqlen=128, calib="wiki-summaries", nsamples=512,
    val_windows=64, select_windows=256, eval="wikitext2", eval_file=None, max_eval_windows=None, eval_batch_size=8,
    speed_tokens=32, speed_rounds=3,
    lr=0.01, min_lr_ratio=0.0, init="wanda-sp", init_temperature=0.1, init_attn_sparsity=0.0,
    init_windows=64, channel_block=64, attn_units="kv-group", budget="global", scope="global", shape="free", attn_sparsity=None,
    mlp_sparsity=None, prune_layers=False, protect_layers=[], baseline="leave-one-out",
    ma_window=5, eval_every=25, checkpoint_every=25, device="cpu", devices=[], dtype="auto", backend=None,
    seed=0, resume=False, progress=True, stop_after=None, window_stride=1,
    compensate="sequential", compensate_select="obs", compensate_target="local", compensate_inputs=False,
    compensate_bias=None,  # unset: on, except with a uniform shape (``fits_bias``)
    compensate_damping=0.01,
    compensate_windows=512, optimizer="sgd", antithetic=False, control_variate=False,
    cv_history=256, cv_ridge=1.0, select_candidates=1, search_loss="bare",
    search_refit_windows=128, dist_timeout=1800.0,
    dry_run=False, eval_tasks=[], tasks_path=None, task_limit=None)
RESUME_KEYS = {"model", "sparsity", "steps", "k", "batch_size", "seqlen", "calib", "nsamples",
               "lr", "init", "init_temperature", "init_attn_sparsity", "init_windows", "budget",
               "scope", "attn_sparsity", "mlp_sparsity", "prune_layers", "protect_layers",
               "baseline", "seed", "dtype", "val_windows", "channel_block", "optimizer",
               "antithetic", "control_variate", "cv_history", "cv_ridge",
               "select_candidates", "attn_units", "search_loss", "search_refit_windows",
               "shape"}


def _model_dir(path, model_type="llama", weights=None, tokenizer=True):
    """A directory that looks like a model to validate(): a config.json, a weights file (one
    small tensor, or the bytes ``weights``) and a tokenizer file (never parsed there)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                  "architectures": ["SomeForCausalLM"]}))
    if weights is None:
        save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    elif weights:
        (path / "model.safetensors").write_bytes(weights)
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Every file the table below names: model directories, text files, scores files."""
    r = tmp_path_factory.mktemp("config")
    _model_dir(r / "model")
    _model_dir(r / "gpt2", "gpt2")
    _model_dir(r / "corrupt", weights=b"not a safetensors file")
    _model_dir(r / "noweights", weights=b"")
    _model_dir(r / "notokenizer", tokenizer=False)
    (r / "nocfg").mkdir()
    (r / "badcfg").mkdir()
    (r / "badcfg" / "config.json").write_text("{oops")
    (r / "afile").write_text("a file")
    text = "\n".join(CORPUS * 4) + "\n"
    (r / "calib.txt").write_text(text)
    (r / "eval.txt").write_text(text)
    (r / "texts").mkdir()
    (r / "texts" / "a.txt").write_text(text)
    (r / "notexts").mkdir()
    (r / "empty.txt").write_text("")
    (r / "blank.txt").write_text("  \n\n")
    (r / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (r / "notext.json").write_text(json.dumps([{"body": "no text field"}]))
    (r / "ints.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    (r / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    probs = torch.tensor([0.2, 0.9, 1.0])
    save_file({"probs": probs, "init_probs": probs.clone()}, str(r / "scores.safetensors"))
    save_file({"mask": probs}, str(r / "noprobs.safetensors"))
    save_file({"probs": probs.view(1, 3)}, str(r / "probs2d.safetensors"))
    save_file({"probs": torch.tensor([0.5, 1.5])}, str(r / "outside.safetensors"))
    (r / "garbage.safetensors").write_bytes(b"\x00" * 16)
    torch.save(probs, str(r / "tensor.pt"))
    torch.save({"probs": probs}, str(r / "dict.pt"))
    torch.save({"mask": probs}, str(r / "nodict.pt"))
    torch.save(torch.tensor([0.5, NAN]), str(r / "nan.pt"))
    (r / "garbage.pt").write_text("not a pickle")
    return r


def config(root, cls=PruneConfig, **kw):
    """A config that validates, with ``kw`` changed; "{root}" in a string is the fixture dir."""
    base = dict(model=str(root / "model"), sparsity=0.3, out=str(root / "run"),
                calib=str(root / "calib.txt"), eval=str(root / "eval.txt"), device="cpu")
    if cls is EvalConfig:
        base = {k: v for k, v in base.items() if k in ("model", "eval", "device")}
    base.update({k: v.format(root=root) if isinstance(v, str) else v for k, v in kw.items()})
    return cls(**base)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

BAD = [
    # numbers: type, finiteness, range
    (dict(sparsity=1.2), "--sparsity must lie strictly between 0 and 1, got 1.2"),
    (dict(sparsity=0.0), "--sparsity must lie strictly between 0 and 1, got 0.0"),
    (dict(sparsity=NAN), "--sparsity must be a finite number, got nan"),
    (dict(sparsity="0.3"), "--sparsity must be a number, got '0.3'"),
    (dict(lr=-1.0), "--lr must be > 0, got -1.0"),
    (dict(lr=0), "--lr must be > 0, got 0"),
    (dict(lr=NAN), "--lr must be a finite number, got nan"),
    (dict(lr=INF), "--lr must be a finite number, got inf"),
    (dict(steps=0), "--steps must be at least 1, got 0"),
    (dict(steps=2.5), "--steps must be an integer, got 2.5"),
    (dict(steps=True), "--steps must be an integer, got True"),
    (dict(k=0), "--k must be at least 1, got 0"),
    (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
    (dict(seqlen=1), "--seqlen must be at least 2, got 1"),
    (dict(nsamples=0), "--nsamples must be at least 1, got 0"),
    (dict(val_windows=0), "--val-windows must be at least 1, got 0"),
    (dict(select_windows=0), "--select-windows must be at least 1, got 0"),
    (dict(max_eval_windows=0), "--max-windows must be at least 1, got 0"),
    (dict(max_eval_windows=2.0), "--max-windows must be an integer or unset (None), got 2.0"),
    (dict(eval_batch_size=0), "--eval-batch-size must be at least 1, got 0"),
    (dict(min_lr_ratio=1.5), "--min-lr-ratio must lie in [0, 1], got 1.5"),
    (dict(min_lr_ratio=-0.1), "--min-lr-ratio must lie in [0, 1], got -0.1"),
    (dict(init_temperature=0.0), "--init-temperature must be > 0, got 0.0"),
    (dict(init_temperature=-INF), "--init-temperature must be a finite number, got -inf"),
    (dict(init_attn_sparsity=1.0), "--init-attn-sparsity must lie in [0, 1), got 1.0"),
    (dict(init_windows=0), "--init-windows must be at least 1, got 0"),
    (dict(channel_block=0), "--channel-block must be at least 1, got 0"),
    (dict(ma_window=0), "--ma-window must be at least 1, got 0"),
    (dict(eval_every=0), "--eval-every must be at least 1, got 0"),
    (dict(checkpoint_every=0), "--checkpoint-every must be at least 1, got 0"),
    (dict(seed=-1), "--seed must lie in [0, 2**63), got -1"),
    (dict(seed=2**63), "--seed must lie in [0, 2**63)"),
    (dict(stop_after=0), "stop_after must be at least 1, got 0"),
    (dict(protect_layers=[0, -1]), "--protect-layers must list layer numbers >= 0, got [0, -1]"),
    (dict(protect_layers=(0,)), "--protect-layers must be a list of integers, got (0,)"),
    (dict(prune_layers="yes"), "--prune-layers must be true or false, got 'yes'"),
    (dict(budget="per-type", attn_sparsity=NAN), "--attn-sparsity must be a finite number"),
    (dict(budget="per-type", mlp_sparsity=1.0), "--mlp-sparsity must lie strictly between 0 and 1"),
    # choices
    (dict(budget="foo"), "--budget must be one of global, per-type, got 'foo'"),
    (dict(scope="model"), "--scope must be one of global, layer, got 'model'"),
    (dict(baseline="mean"), "--baseline must be one of leave-one-out, moving-average, got 'mean'"),
    (dict(dtype="fp16"), "--dtype must be one of auto, float32, float16, bfloat16, got 'fp16'"),
    (dict(backend="tpu"), "--backend must be one of reference, triton, cuda, got 'tpu'"),
    # combinations
    (dict(k=1),
     "the leave-one-out baseline needs --k 2 or more (or use --baseline moving-average)"),
    (dict(antithetic=True, k=3), "--antithetic samples masks in pairs: --k must be even, got --k 3"),
    (dict(control_variate=True, cv_history=2, k=4),
     "--cv-history must hold at least one step's --k samples, got --cv-history 2 with --k 4"),
    (dict(cv_ridge=0.0), "--cv-ridge must be > 0"),
    (dict(cv_history=1), "--cv-history must be at least 2"),
    (dict(attn_sparsity=0.4), "--attn-sparsity applies only with --budget per-type"),
    (dict(mlp_sparsity=0.4), "--mlp-sparsity applies only with --budget per-type"),
    (dict(budget="per-type", init_attn_sparsity=0.2),
     "--init-attn-sparsity applies only with --budget global"),
    (dict(prune_layers=True, budget="per-type"),
     "--prune-layers needs --budget global --scope global"),
    (dict(prune_layers=True, scope="layer"), "--prune-layers needs --budget global --scope global"),
    (dict(eval_file="{root}/eval.txt"), "--data-file is the local copy of --eval wikitext2"),
    (dict(out="{root}/model"), "--out must not be the --model directory"),
    # devices and backends
    (dict(device="foo"), "--device 'foo' is not a device: use cpu, cuda or cuda:N"),
    (dict(device="meta"), "--device 'meta' is not supported: use cpu, cuda or cuda:N"),
    pytest.param(dict(device="cuda"), "--device 'cuda' needs a CUDA GPU", marks=NO_GPU),
    pytest.param(dict(device="cuda:1"), "--device 'cuda:1' needs a CUDA GPU", marks=NO_GPU),
    (dict(backend="cuda"), "--backend cuda runs on CUDA tensors only; it needs --device cuda"),
    # output directory
    (dict(out=""), "--out must name a directory, got ''"),
    (dict(out="{root}/afile"), "is an existing file; it must be a directory"),
    (dict(out="{root}/afile/run"), "cannot be created: "),
    # init: a method or a scores file
    (dict(init="wanda"), "--init must be one of wanda-sp, magnitude, constant or the scores file"),
    (dict(init="{root}/missing.safetensors"),
     "'{root}/missing.safetensors' is neither (no such file)"),
    (dict(init="{root}/noprobs.safetensors"), "holds no 'probs' tensor (it holds ['mask'])"),
    (dict(init="{root}/probs2d.safetensors"),
     "'probs' must be a 1-D tensor of keep-probabilities, got shape (1, 3)"),
    (dict(init="{root}/outside.safetensors"), "'probs' holds values outside [0, 1]"),
    (dict(init="{root}/garbage.safetensors"), "is not a readable safetensors file"),
    (dict(init="{root}/garbage.pt"), "is neither a safetensors nor a torch file"),
    (dict(init="{root}/nodict.pt"), "holds neither a tensor nor a dict with a 'probs' tensor"),
    (dict(init="{root}/nan.pt"), "'probs' holds values outside [0, 1] (or NaN)"),
    # model
    (dict(model="nosuch"), "--model 'nosuch' is neither a model directory, a hub name "
                           "(org/name) nor an embedded model (smollm2-135m, gemma3-270m)"),
    (dict(model="{root}/missing"), "--model '{root}/missing' does not exist"),
    (dict(model="{root}/nocfg"), "is a directory without a config.json, not a model directory"),
    (dict(model="{root}/badcfg"), "config.json cannot be read"),
    (dict(model="{root}/gpt2"), "model type 'gpt2' (SomeForCausalLM) is not supported; "
                                "supported architectures: Llama, Mistral, Qwen2"),
    (dict(model="{root}/afile"), "--model '{root}/afile' is a file, not a model directory"),
    (dict(model="{root}/corrupt"), "model.safetensors' is not a readable safetensors file"),
    (dict(model="{root}/noweights"), "holds no weights (model.safetensors or pytorch_model.bin)"),
    (dict(model="{root}/notokenizer"), "holds no tokenizer (none of tokenizer.json, "),
    # calibration and evaluation text
    (dict(calib="nonsense"), "--calib: unknown calibration source 'nonsense'"),
    (dict(calib="{root}/missing.txt"), "--calib: data file '{root}/missing.txt' does not exist"),
    (dict(calib="{root}/empty.txt"), "--calib: data file '{root}/empty.txt' is empty"),
    (dict(calib="{root}/blank.txt"), "--calib: '{root}/blank.txt' contains no text"),
    (dict(calib="{root}/broken.jsonl"),
     "--calib: data file '{root}/broken.jsonl' is not valid JSON"),
    (dict(calib="{root}/notext.json"),
     "--calib: data file '{root}/notext.json' has no 'text' field"),
    (dict(calib="{root}/ints.jsonl"), "the 'text' field must hold strings"),
    (dict(calib="{root}/latin1.txt"),
     "--calib: data file '{root}/latin1.txt' is not valid UTF-8 text"),
    (dict(calib="{root}/notexts"),
     "--calib: folder '{root}/notexts' has no .txt/.raw/.jsonl/.json files"),
    (dict(calib="{root}/data.csv"), "--calib: data file '{root}/data.csv' does not exist"),
    (dict(eval="{root}/missing.txt"), "--eval: data file '{root}/missing.txt' does not exist"),
    (dict(eval="{root}/empty.txt"), "--eval: data file '{root}/empty.txt' is empty"),
    (dict(eval="{root}/broken.jsonl"), "--eval: data file '{root}/broken.jsonl' is not valid JSON"),
    (dict(eval="wikitext2", eval_file="{root}/missing.raw"),
     "--data-file: data file '{root}/missing.raw' does not exist"),
]


@pytest.mark.parametrize("kw,message", BAD)
def test_bad_setting_is_one_line_naming_flag_and_rule(root, kw, message):
    cfg = config(root, **kw)
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert message.format(root=root) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [
    {},
    dict(init="{root}/scores.safetensors"), dict(init="{root}/tensor.pt"),
    dict(init="{root}/dict.pt"), dict(init="magnitude"),
    dict(budget="per-type", attn_sparsity=0.4, mlp_sparsity=0.2),
    dict(baseline="moving-average", k=1), dict(protect_layers=[0, 2]), dict(prune_layers=True),
    dict(model="HuggingFaceTB/SmolLM2-135M"), dict(model="smollm2-135m"),
    dict(calib="{root}/texts"), dict(eval="wikitext2", eval_file="{root}/eval.txt"),
    dict(backend="reference"), dict(sparsity=1e-3, lr=5), dict(out="{root}/new/nested/run"),
    dict(device="cpu:0"),
])
def test_good_settings_pass(root, kw):
    check(config(root, **kw))


def test_environment_copy_of_wikitext2_is_checked(root, monkeypatch):
    monkeypatch.setenv("PROBPRUNE_WIKITEXT2", str(root / "missing.raw"))
    with pytest.raises(ConfigError, match=r"^\$PROBPRUNE_WIKITEXT2: data file .* does not exist"):
        check(config(root, eval="wikitext2"))
    monkeypatch.setenv("PROBPRUNE_WIKITEXT2", str(root / "eval.txt"))
    check(config(root, eval="wikitext2"))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_flags_defaults_and_help_come_from_the_fields():
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    # every field has a flag but the two that only the library sets
    assert set(actions) == set(fields) - {"progress", "stop_after"}
    for name, action in actions.items():
        meta = fields[name].metadata
        assert action.help.startswith(meta["help"]), name
        flag = PruneConfig.flag(name)
        negated = ["--no-" + flag[2:]] if fields[name].type in (bool, Optional[bool]) else []
        assert action.option_strings == [flag] + negated, name
        assert action.choices == meta["choices"]
    spelled = {"eval": "--eval", "max_eval_windows": "--max-windows", "eval_file": "--data-file",
               "batch_size": "--batch-size", "protect_layers": "--protect-layers", "k": "--k"}
    for name, flag in spelled.items():
        assert actions[name].option_strings == [flag]
    assert {n for n, a in actions.items() if a.required} == {"model", "sparsity", "out"}
    assert actions["lr"].help.endswith("(default: 0.01)")
    assert actions["device"].default is None  # resolved to cuda-if-available by from_args


def test_defaults_match_the_settings_before():
    cfg = PruneConfig(model="m", sparsity=0.5, out="o")
    assert cfg.as_dict() == dict(model="m", sparsity=0.5, out="o", **DEFAULTS)
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    parsed = from_args(PruneConfig, parser.parse_args(["--model", "m", "--sparsity", "0.5",
                                                      "--out", "o"]))
    assert parsed == dataclasses.replace(cfg, device=default_device())


def test_a_switch_is_turned_either_way():
    """Boolean settings take --flag and --no-flag, whichever way their default goes."""
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    base = ["--model", "m", "--sparsity", "0.5", "--out", "o"]
    parsed = lambda *extra: from_args(PruneConfig, parser.parse_args(base + list(extra)))  # noqa: E731
    assert parsed().compensate_bias is None and parsed().antithetic is False
    assert parsed().fits_bias is True
    assert parsed("--shape", "uniform").fits_bias is False
    assert parsed("--no-compensate-bias").compensate_bias is False
    assert parsed("--compensate-bias").compensate_bias is True
    assert parsed("--antithetic").antithetic is True
    assert parsed("--antithetic", "--no-antithetic").antithetic is False


def test_readme_quick_start_parses_to_the_config():
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    argv = ("--model smollm2-135m --sparsity 0.3 --steps 400 --k 2 --batch-size 4 --seqlen 128 "
            "--calib wiki-summaries --eval wikitext2 --out runs/smollm2-30 --protect-layers 0,29 "
            "--max-windows 64 --data-file w.raw --prune-layers --device cpu").split()
    cfg = from_args(PruneConfig, parser.parse_args(argv), progress=False)
    assert cfg == PruneConfig(model="smollm2-135m", sparsity=0.3, out="runs/smollm2-30",
                              steps=400, k=2, batch_size=4, seqlen=128, calib="wiki-summaries",
                              eval="wikitext2", protect_layers=[0, 29], max_eval_windows=64,
                              eval_file="w.raw", prune_layers=True, device="cpu", progress=False)


def test_eval_config_shares_the_definitions():
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    prune_fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    assert set(actions) == {"model", "eval", "eval_file", "seqlen", "max_eval_windows", "window_stride",
                            "eval_batch_size", "eval_tasks", "tasks_path", "task_limit", "device",
                            "devices", "dtype"}
    assert actions["eval"].option_strings == ["--data"]
    assert actions["eval_tasks"].option_strings == ["--tasks"]
    for f in dataclasses.fields(EvalConfig):
        assert f.default == prune_fields[f.name].default
        assert actions[f.name].help.startswith(prune_fields[f.name].metadata["help"])
    cfg = from_args(EvalConfig, parser.parse_args(["--model", "m", "--data", "x.txt"]))
    assert (cfg.model, cfg.eval, cfg.seqlen, cfg.device) == ("m", "x.txt", 128, default_device())


def test_eval_config_messages_name_its_own_flags(root):
    with pytest.raises(ConfigError, match=r"^--data: data file .*missing.txt' does not exist"):
        check(config(root, EvalConfig, eval="{root}/missing.txt"))
    with pytest.raises(ConfigError, match="--data-file is the local copy of --data wikitext2"):
        check(config(root, EvalConfig, eval_file="{root}/eval.txt"))
    with pytest.raises(ConfigError, match="--seqlen must be at least 2, got 0"):
        check(config(root, EvalConfig, seqlen=0))
    check(config(root, EvalConfig))


def test_resume_mismatch_lists_each_differing_resume_key():
    saved = PruneConfig(model="m", sparsity=0.3, out="o").as_dict()
    assert PruneConfig(model="m", sparsity=0.3, out="o").resume_mismatch(saved) == []
    now = PruneConfig(model="m", sparsity=0.3, out="elsewhere", lr=0.02, seed=4,
                      protect_layers=[1], eval_every=5, device="cuda", resume=True)
    # out, eval_every, device and resume may change between a run and its resume
    assert now.resume_mismatch(saved) == ["protect_layers ([] there, [1] now)",
                                          "lr (0.01 there, 0.02 now)",
                                          "seed (0 there, 4 now)"]
    del saved["init_windows"]  # a checkpoint written before that setting existed
    assert now.resume_mismatch(saved)[2] == "init_windows (None there, 64 now)"
    assert set(PruneConfig.resume_keys()) == RESUME_KEYS


def test_as_dict_is_the_json_settings():
    cfg = PruneConfig(model="m", sparsity=0.3, out="o", protect_layers=[0, 3])
    d = cfg.as_dict()
    assert list(d) == SETTINGS_KEYS
    assert json.loads(json.dumps(d)) == d
    d["protect_layers"].append(9)  # a copy: the config is not changed through it
    assert cfg.protect_layers == [0, 3]
