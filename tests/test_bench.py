"""The ``probprune-fast bench`` pipeline on the tiny registry model: files, keys, and ratios that
follow from the run's own timings (no wall-clock assertion)."""
import json
import os
import statistics

import pytest
import torch

from probprune.bench import e2e, micro
from probprune.bench.registry import MODEL_REGISTRY, make_plan
from probprune.cli import main

E2E_KEYS = {"model", "batch", "seqlen", "K", "sparsity", "backend", "device", "dtype",
            "vs_dense_mask", "vs_limit", "time_s", "samples_s", "memory", "params", "loss_gap"}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    assert main(["bench", "--out", out, "--plan", "tiny", "--device", "cpu", "--no-memory"]) == 0
    with open(os.path.join(out, "bench.json")) as f:
        return out, json.load(f)


def test_files_and_machine_info(bench_out):
    out, result = bench_out
    for name in ("bench.json", "bench.md", *map(os.path.basename, result["plots"])):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert result["plots"] and all(p.endswith(".png") for p in result["plots"])
    m = result["machine"]
    assert {"cpu_count", "torch", "triton", "gpu", "torch_threads", "backends_benchmarked"} <= m.keys()
    assert m["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    assert m["cpu_count"] >= 1 and m["backends_benchmarked"] == ["reference"]  # --device cpu
    md = open(os.path.join(out, "bench.md")).read()
    assert "| model | params | B×T | K | sparsity | backend |" in md and "b/a" in md


def test_end_to_end_rows_carry_settings_and_their_own_ratios(bench_out):
    _, result = bench_out
    rows = result["end_to_end"]
    plan = make_plan("tiny")
    assert len(rows) == len(plan.settings)
    for row in rows:
        assert E2E_KEYS <= row.keys()
        assert (row["device"], row["dtype"], row["backend"]) == ("cpu", "float32", "reference")
        med = {k: statistics.median(v) for k, v in row["samples_s"].items()}
        assert row["time_s"] == pytest.approx(med)
        assert row["vs_dense_mask"] == pytest.approx(med["engine"] / med["dense_mask"])
        assert row["vs_limit"] == pytest.approx(med["engine"] / med["limit"])
        assert row["loss_gap"] < 1e-4  # dense-mask and engine compute the same losses
        assert row["memory"]["engine"]["work_mib"] is None  # --no-memory
        assert 0.3 < row["hard_mask_kept"] <= 1 - row["sparsity"] + 1e-6
        assert row["params"] > row["pruned_params"]


def test_micro_rows_and_group_ratios(bench_out):
    _, result = bench_out
    rows = result["micro"]
    plan = make_plan("tiny")
    cases = micro.micro_cases(plan)
    assert {r["group"] for r in rows} == {c.group for c in cases}
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], {})[r["provider"]] = r
    for group, provs in by_group.items():
        op = next(iter(provs.values()))["op"]
        assert set(provs) == set(micro.providers_for(op, "cpu"))
        ours = provs["probprune-reference"]
        assert ours["median_s"] == pytest.approx(statistics.median(ours["samples_s"]))
        assert ours["vs_k_launches"] == pytest.approx(
            ours["median_s"] / provs["k-launches-reference"]["median_s"])
        if "torch-sliced" in provs:
            assert ours["vs_sliced"] == pytest.approx(
                ours["median_s"] / provs["torch-sliced"]["median_s"])
            assert ours["vs_masked_dense"] == pytest.approx(
                ours["median_s"] / provs["torch-masked-dense"]["median_s"])


def _active(op, name, out, data):
    """A provider's output in the op's compact layout, active part only."""
    K, c, unit = data.case.K, data.c, data.unit
    if name.startswith("k-launches"):
        out = torch.cat(out) if isinstance(out[0], torch.Tensor) \
            else tuple(torch.cat(parts) for parts in zip(*out))
    elif isinstance(out, list):
        out = torch.stack(out)
        if op == "masked_attention":  # [K, B, H, T, D] -> [K, B, T, H, D]
            out = out.transpose(2, 3)
    if op in ("gather_rows_gemm", "gather_rows_swiglu"):
        if name in ("torch-dense", "torch-masked-dense"):  # full width: pick the kept rows
            return torch.stack([out[k][:, data.rows[k]] for k in range(K)])
        return out[:, :, : c * unit]
    if op == "masked_attention":
        return out[:, :, :, : c * unit]
    return out


@pytest.mark.parametrize("op", micro.OPS)
def test_every_provider_computes_the_same_thing(op):
    """The baselines are honest: every provider computes the op's result."""
    case = micro.MicroCase(op, "tiny", 3, 0.5, 2, 8)
    data = micro.CaseData(case, "cpu", torch.float32)
    fns = {p: micro.make_provider(case, p, data) for p in micro.providers_for(op, "cpu")}
    expected = _active(op, "probprune-reference", fns["probprune-reference"](), data)
    for name, fn in fns.items():
        got = _active(op, name, fn(), data)
        if isinstance(expected, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), name
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_memory_child_measures_every_case(tmp_path):
    from probprune.bench.registry import StepSetting

    s = StepSetting("tiny", 2, 16, 2, 0.5)
    model = e2e.build_model("tiny")
    dirs = {0.5: e2e.export_limit(model, s, str(tmp_path))}
    mem = e2e.memory_in_child([("tiny", ([s], dirs))], ["reference"], "float32", 1)
    assert set(mem[s]) == {e2e.DENSE_MASK, "engine-reference", e2e.LIMIT}
    if os.access("/proc/self/clear_refs", os.W_OK):
        assert all(v is not None and v >= 0 for v in mem[s].values())


def test_registry_shapes_are_consistent():
    for name, shape in MODEL_REGISTRY.items():
        assert shape["num_attention_heads"] % shape["num_key_value_heads"] == 0, name
        assert shape["source"] in ("shape", "embedded", "synthetic"), name
    quick = make_plan("quick")
    assert any(s.model == "smollm2-135m" and (s.batch, s.seqlen, s.K) == (4, 128, 2)
               for s in quick.settings)
    full = make_plan("full")
    assert {s.sparsity for s in full.settings if s.model == "smollm2-135m" and s.K == 2} == {0.3, 0.5}
