"""pytest-benchmark suite of probprune (not part of the test suite: run ``pytest bench/``).

    pytest bench/ --benchmark-json=micro.json                      # every op, K, keep ratio
    pytest bench/ --bench-plan quick --benchmark-json=quick.json    # the reduced set
    pytest bench/test_bench_ops.py --benchmark-group-by=group       # side-by-side tables

Cases, shapes and providers come from ``bench.harness`` (the same definitions ``python -m bench``
times); each record carries its settings in ``extra_info`` and the json gets a ``probprune``
section with the ratios of every group.
"""
import pytest
import torch

from bench.harness import micro
from bench.harness.registry import DENSE_MASK, ENGINE, LIMIT, PLANS, make_plan, step_case_names
from bench.harness.run import default_dtype
from bench.harness.timing import ratio


def pytest_addoption(parser):
    group = parser.getgroup("probprune bench")
    group.addoption("--bench-plan", default="full", choices=PLANS,
                    help="which registry plan to run (default: full)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--bench-dtype", default=None, help="float32, float16, bfloat16")


def bench_device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def bench_plan(config):
    return make_plan(config.getoption("--bench-plan"), bench_device(config))


def bench_dtype(config) -> str:
    return config.getoption("--bench-dtype") or bench_plan(config).dtype \
        or default_dtype(bench_device(config))


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "micro_case" in metafunc.fixturenames:
        params = micro.micro_params(bench_plan(config), bench_device(config))
        metafunc.parametrize("micro_case", params,
                             ids=[f"{c.group}-{p}" for c, p in params])
    if "step_case" in metafunc.fixturenames:
        device = bench_device(config)
        names = step_case_names(micro.bench_backends(device))
        params = [(s, n) for s in bench_plan(config).settings for n in names]
        metafunc.parametrize("step_case", params,
                             ids=[f"{s.label.replace(' ', '-')}-{n}" for s, n in params])


@pytest.fixture(scope="session")
def device(request):
    return bench_device(request.config)


@pytest.fixture(scope="session")
def dtype(request):
    return bench_dtype(request.config)


@pytest.fixture(scope="session")
def plan(request):
    return bench_plan(request.config)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Adds the ratios of each group (same definitions as bench.json) to the json."""
    groups = {}
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "group" in info:
            groups.setdefault(("micro", info["group"]), {})[info["provider"]] = \
                bench["stats"]["median"]
        elif "step" in info:
            groups.setdefault(("step", info["step"]), {})[info["case"]] = bench["stats"]["median"]
    micro_ratios, steps = {}, {}
    for (kind, name), medians in groups.items():
        if kind == "micro":
            micro_ratios[name] = micro.group_ratios(medians)
            continue
        a, c = medians.get(DENSE_MASK), medians.get(LIMIT)
        steps[name] = {case[len(ENGINE):]: {"vs_dense_mask": ratio(t, a), "vs_limit": ratio(t, c)}
                       for case, t in medians.items() if case.startswith(ENGINE)}
    output_json["probprune"] = {"micro_ratios": micro_ratios, "end_to_end_ratios": steps,
                                "plan": config.getoption("--bench-plan"),
                                "device": bench_device(config), "dtype": bench_dtype(config)}
