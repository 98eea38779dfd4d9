"""The benchmark harness (bench/, run as ``python -m bench``): its providers compute what they
claim, its registry builds models the engine accepts, its ratios come from the timings it
measured, and a provider that raises is reported, not swallowed."""
import json
import os

import pytest
import torch

from bench.harness import cli, e2e, micro, run
from bench.harness.registry import (BASELINES, DENSE_MASK, LIMIT, MODEL_REGISTRY, Rounds,
                                    StepSetting, engine_case, llama_config, make_plan, refit_case)

ENGINE = engine_case("reference")
REFIT = refit_case("reference")


@pytest.fixture(scope="module")
def tiny_model():
    return e2e.build_model("tiny")


def test_step_providers_agree_on_losses(tiny_model, tmp_path):
    """Engine, dense-masked baseline and pruned model give the same K losses for the same mask;
    engine and baseline also agree on the K different sampled masks."""
    setting = StepSetting("tiny", 2, 16, 3, 0.5)
    units = e2e.model_units(tiny_model)
    ids, masks, hard = e2e.setting_inputs(units, setting, tiny_model.config.vocab_size)
    assert 0 < int(hard.sum()) < units.n_units and len({tuple(m.tolist()) for m in masks}) > 1
    pruned = e2e.load_pruned(e2e.export_limit(tiny_model, setting, str(tmp_path)))
    assert e2e.param_count(pruned) < e2e.param_count(tiny_model)

    same = e2e.providers(tiny_model, ids, hard.expand(setting.K, -1), pruned, ["reference"])
    losses = {name: fn() for name, fn in same.items()}
    assert set(losses) == {DENSE_MASK, ENGINE, REFIT, LIMIT}
    for name in (ENGINE, LIMIT):
        torch.testing.assert_close(losses[name], losses[DENSE_MASK], rtol=1e-5, atol=1e-5,
                                   msg=name)
    # The refit-scored engine: the same mask K times gives one loss, not the bare slice's.
    assert torch.allclose(losses[REFIT], losses[REFIT][0].expand(setting.K))
    assert (losses[REFIT] - losses[ENGINE]).abs().max() > 1e-4

    sampled = e2e.providers(tiny_model, ids, masks, pruned, ["reference"])
    a, b = sampled[DENSE_MASK](), sampled[ENGINE]()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, losses[DENSE_MASK])  # the sampled masks are other masks


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_registry_shapes_build_models_the_engine_accepts(name):
    """Every registry entry builds a config the engine takes, with the units and parameter
    counts a Llama of those sizes has (weights on the meta device: no memory)."""
    s = MODEL_REGISTRY[name]
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(llama_config(name))
    units = e2e.model_units(model)
    L, kv, F = s["num_hidden_layers"], s["num_key_value_heads"], s["intermediate_size"]
    d, hd, G = s["hidden_size"], s["head_dim"], s["num_attention_heads"] // kv
    assert units.n_units == L * (kv + F)
    # a KV group: q and o rows/columns of its G heads, k and v rows; a channel: gate, up, down
    assert units.prunable_params == L * (kv * (2 * G + 2) * hd * d + 3 * F * d)


# A fake timer: fixed samples per provider, so every ratio has a hand-computed value.
SAMPLES = {
    "probprune-reference": [3.0, 2.0, 4.0],   # median 3
    "k-launches-reference": [6.0, 9.0, 5.0],  # median 6
    "torch-dense": [4.0, 4.5, 3.5],           # median 4
    "torch-masked-dense": [5.0, 7.0, 1.0],    # median 5
    "torch-gather": [10.0, 11.0, 9.0],        # median 10
    "torch-sliced": [2.0, 2.5, 1.0],          # median 2
    DENSE_MASK: [10.0, 12.0, 30.0],           # median 12, fastest 10
    ENGINE: [4.0, 6.0, 5.0],                  # median 5, fastest 4
    REFIT: [9.0, 8.0, 7.0],                   # median 8
    LIMIT: [3.0, 2.0, 8.0],                   # median 3, fastest 2
}
RATIO_TO = {"torch-dense": ("vs_dense", 3 / 4), "torch-masked-dense": ("vs_masked_dense", 3 / 5),
            "torch-gather": ("vs_gather", 3 / 10), "torch-sliced": ("vs_sliced", 3 / 2)}
RATIO_KEYS = ("vs_k_launches", "sliced_vs_dense") + tuple(k for k, _ in RATIO_TO.values())


def micro_ratios(op):
    """The ratios a probprune row of ``op`` must carry, from SAMPLES' medians."""
    baselines = BASELINES[op]
    out = {"vs_k_launches": 3 / 6, **dict(RATIO_TO[b] for b in baselines)}
    if {"torch-sliced", "torch-dense"} <= set(baselines):
        out["sliced_vs_dense"] = 2 / 4
    return out


def test_ratios_come_from_the_timings_measured(tmp_path):
    """The quick plan's micro-benchmarks (and the tiny step, the quick plan's timing rounds) with
    an injected timer: every ratio is the one of the timer's samples."""
    seen = []

    def fake_timer(fns, rounds, device):
        seen.append((set(fns), rounds))
        return {name: list(SAMPLES[name]) for name in fns}, {}

    quick = make_plan("quick")
    plan = quick.with_(settings=make_plan("tiny").settings, memory=False)
    result = run.run_bench(str(tmp_path), plan, timer=fake_timer, plots=False, progress=False)
    assert result["errors"] == []

    cases = micro.micro_cases(quick)
    assert {r["group"] for r in result["micro"]} == {c.group for c in cases}
    ours = [r for r in result["micro"] if r["provider"] == "probprune-reference"]
    assert len(ours) == len(cases)
    for r in ours:
        got = {k: r[k] for k in RATIO_KEYS if k in r}
        assert got == pytest.approx(micro_ratios(r["op"])), r["group"]
        assert r["median_s"] == 3.0
    micro_rounds = Rounds(1, 3, 0.01, 25.0, 100.0)  # quick: 1 warm-up, 3 samples of >= 10 ms
    assert all(rounds == micro_rounds for _, rounds in seen[:len(cases)])

    (row,) = result["end_to_end"]
    assert row["time_s"] == {"dense_mask": 12.0, "engine": 5.0, "limit": 3.0,
                             "engine_refit": 8.0}
    assert row["refit_vs_engine"] == pytest.approx(8 / 5)
    assert row["vs_dense_mask"] == pytest.approx(5 / 12)
    assert row["vs_limit"] == pytest.approx(5 / 3)
    assert row["vs_dense_mask_min"] == pytest.approx(4 / 10)
    assert row["vs_limit_min"] == pytest.approx(4 / 2)
    assert row["limit_vs_dense_mask"] == pytest.approx(3 / 12)
    step_names, step_rounds = seen[-1]
    assert step_names == {DENSE_MASK, ENGINE, REFIT, LIMIT}
    # quick: the losses call + 0 more warm-up rounds, then 2 timed repeats of one call each
    assert (step_rounds.warmup, step_rounds.repeats, step_rounds.min_time) == (0, 2, 0.0)


def test_a_raising_provider_is_an_error_record_and_exit_1(tmp_path, monkeypatch):
    """The tiny plan through the command line, with one micro and one step provider raising when
    called: error records, the others' rows, exit status 1, the files written."""
    make_provider, providers = micro.make_provider, e2e.providers

    def boom():
        raise RuntimeError("injected")

    def failing_micro(case, provider, data):
        fn = make_provider(case, provider, data)
        return boom if (case.op, provider) == ("gather_rows_gemm", "torch-dense") else fn

    def failing_step(*args, **kw):
        return dict(providers(*args, **kw), **{LIMIT: boom})

    monkeypatch.setattr(micro, "make_provider", failing_micro)
    monkeypatch.setattr(e2e, "providers", failing_step)
    out = str(tmp_path / "out")
    assert cli.main(["--plan", "tiny", "--device", "cpu", "--no-memory", "--out", out]) == 1

    with open(os.path.join(out, "bench.json")) as f:
        result = json.load(f)
    tiny = make_plan("tiny")
    gemm_groups = {c.group for c in micro.micro_cases(tiny) if c.op == "gather_rows_gemm"}
    expected = {("micro", g, "torch-dense") for g in gemm_groups} | \
        {("end_to_end", tiny.settings[0].label, LIMIT)}
    assert {(e["part"], e["case"], e["provider"]) for e in result["errors"]} == expected
    assert all(e["error"] == "RuntimeError: injected" for e in result["errors"])

    rows = [r for r in result["micro"] if r["group"] in gemm_groups]
    assert {r["provider"] for r in rows} == set(micro.providers_for("gather_rows_gemm", "cpu")) \
        - {"torch-dense"}
    assert all(r.get("vs_dense") is None for r in rows if r["provider"] == "probprune-reference")
    (row,) = result["end_to_end"]
    assert row["vs_limit"] is None and row["vs_dense_mask"] > 0 and row["loss_gap"] < 1e-4
    with open(os.path.join(out, "bench.md")) as f:
        assert "## Errors" in f.read()
    assert result["plots"] and all(os.path.getsize(p) > 0 for p in result["plots"])


def test_gpu_plan_dry_run_and_usage_errors(tmp_path, capsys):
    """Without a GPU the gpu-check plan lists its cases (bench/gpu_check.sh's dry mode) or
    refuses in one line; bad settings are refused before anything runs."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = str(tmp_path / "dry")
    assert cli.main(["--plan", "gpu-check", "--device", "cuda", "--dry-run", "--out", out]) == 0
    with open(os.path.join(out, "bench.json")) as f:
        result = json.load(f)
    assert result["dry_run"] and result["micro"] == [] and result["end_to_end"] == []
    assert len(result["planned"]["micro"]) == len(micro.micro_params(make_plan("gpu-check", "cuda"),
                                                                     "cuda"))
    (tmp_path / "file").write_text("")
    for argv, message in ((["--plan", "gpu-check"], "needs a CUDA device"),
                          (["--device", "cuda"], "no CUDA device"),
                          (["--models", "nope"], "nope not in the registry"),
                          (["--repeats", "0"], "--repeats must be at least 1")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv + ["--out", str(tmp_path / "x")])
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "file")])
    assert "is a file" in capsys.readouterr().err


def _as_compact(op, name, out, data):
    """A provider's output in the op's compact layout (what the probprune op returns)."""
    K = data.case.K
    if name.startswith("k-launches"):
        out = torch.cat(out) if isinstance(out[0], torch.Tensor) \
            else tuple(torch.cat(parts) for parts in zip(*out))
    elif isinstance(out, list):
        out = torch.stack(out)
        if op in ("masked_attention", "masked_attention_heads"):  # [K, B, H, T, D] -> [K, B, T, H, D]
            out = out.transpose(2, 3)
    if op in ("gather_rows_gemm", "gather_rows_swiglu") and name in ("torch-dense",
                                                                    "torch-masked-dense"):
        return torch.stack([out[k][:, data.rows[k]] for k in range(K)])  # full width: kept rows
    return out


@pytest.mark.parametrize("op", micro.OPS)
def test_every_micro_provider_computes_the_same_thing(op):
    """The baselines are honest: every provider computes the op's result."""
    case = micro.MicroCase(op, "tiny", 3, 0.5, 2, 8)
    data = micro.CaseData(case, "cpu", torch.float32)
    ref = micro.make_provider(case, "probprune-reference", data)()
    for name in micro.providers_for(op, "cpu"):
        got = _as_compact(op, name, micro.make_provider(case, name, data)(), data)
        if isinstance(ref, tuple):
            assert micro.compare_outputs(op, got, ref, data) == {"matches_reference": True}, name
        else:
            torch.testing.assert_close(micro.active_part(op, got, data),
                                       micro.active_part(op, ref, data), rtol=1e-5, atol=1e-5,
                                       msg=name)


@pytest.mark.slow
def test_memory_child_measures_every_case(tiny_model, tmp_path):
    s = StepSetting("tiny", 2, 16, 2, 0.5)
    dirs = {0.5: e2e.export_limit(tiny_model, s, str(tmp_path))}
    mem = e2e.memory_in_child([("tiny", ([s], dirs))], ["reference"], "float32", 1)
    assert set(mem[s]) == {DENSE_MASK, ENGINE, REFIT, LIMIT}
    if os.access("/proc/self/clear_refs", os.W_OK):
        assert all(v is not None and v >= 0 for v in mem[s].values())


def test_an_output_beyond_the_reference_tolerance_is_an_error_record():
    """The GPU plan's output check fails a run (an error record: exit 1) when a backend's result
    leaves the reference's tolerance for the dtype, holds a NaN, or has other index lists."""
    case = micro.MicroCase("gather_rows_gemm", "tiny", 2, 0.5, 2, 8)
    data = micro.CaseData(case, "cpu", torch.bfloat16)
    ref = micro.make_provider(case, "probprune-reference", data)
    out = ref()
    width = data.c * data.unit
    nudged, wrong, nan = out.clone(), out.clone(), out.clone()
    nudged[0, 0, 0] += 0.01 * (1 + nudged[0, 0, 0].abs())   # inside atol + rtol * |ref|
    wrong[1, 2, width - 1] += 0.1
    nan[0, 1, 0] = float("nan")
    fns = {"probprune-reference": ref, "probprune-nudged": lambda: nudged,
           "probprune-wrong": lambda: wrong, "probprune-nan": lambda: nan}
    errors = []
    checks = run._check_outputs(case, data, fns, errors)
    assert [p for p, c in checks.items() if c["within_tolerance"]] == ["probprune-reference",
                                                                       "probprune-nudged"]
    assert {e["provider"] for e in errors} == {"probprune-wrong", "probprune-nan"}
    assert all("beyond the bfloat16 tolerance (atol 0.016" in e["error"] for e in errors)

    case = micro.MicroCase("compact_masks", "tiny", 2, 0.5, 2, 8)
    data = micro.CaseData(case, "cpu", torch.float32)
    ref = micro.make_provider(case, "probprune-reference", data)
    idx, counts = ref()
    errors = []
    run._check_outputs(case, data, {"probprune-reference": ref,
                                    "probprune-off": lambda: (idx, counts - 1)}, errors)
    assert [e["provider"] for e in errors] == ["probprune-off"]
    assert "index lists and counts must be equal" in errors[0]["error"]
