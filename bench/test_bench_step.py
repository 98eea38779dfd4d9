"""End-to-end step: (a) dense-mask, (b) the engine per backend, (c) K forwards of the pruned
model, for every setting of the plan. Ratios per setting land in the json's ``probprune``
section (``vs_dense_mask`` = b/a, ``vs_limit`` = b/c)."""
import gc
import tempfile

import pytest

from bench.harness import e2e, micro
from bench.harness.timing import synchronize


class _Models:
    """Keeps one model (and its exports) at a time: settings are grouped by model."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.name, self.model, self.cases = None, None, {}
        self.workdir = tempfile.TemporaryDirectory(prefix="probprune-bench-")

    def cases_of(self, setting):
        if setting.model != self.name:
            self.model, self.cases = None, {}
            gc.collect()
            self.model = e2e.build_model(setting.model, self.dtype, self.device)
            self.name = setting.model
        if setting not in self.cases:
            self.cases.clear()
            pruned_dir = e2e.export_limit(self.model, setting, self.workdir.name)
            self.cases[setting] = e2e.setting_cases(self.model, setting,
                                                    micro.bench_backends(self.device), pruned_dir,
                                                    self.dtype)
        return self.cases[setting]


@pytest.fixture(scope="session")
def models(device, dtype):
    m = _Models(device, dtype)
    yield m
    m.workdir.cleanup()


def test_step(benchmark, step_case, models, plan, device, dtype):
    setting, case = step_case
    try:
        cases, facts = models.cases_of(setting)
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"{setting.model} unavailable: {exc}")
    fn = cases[case]

    def run():
        fn()
        synchronize(device)

    benchmark.group = setting.label
    benchmark.extra_info.update(dict(vars(setting), step=setting.label, case=case, device=device,
                                     dtype=dtype, params=facts["params"],
                                     hard_mask_kept=facts["hard_mask_kept"]))
    benchmark.pedantic(run, rounds=plan.repeats, warmup_rounds=plan.warmup, iterations=1)
