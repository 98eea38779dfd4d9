"""``PROBPRUNE_TRITON_AUTOTUNE=first``: every Triton autotuner holds one config, so a test run on a
fresh GPU compiles each kernel once per shape instead of compiling and timing every config.

Runs in a subprocess without TRITON_INTERPRET (under the interpreter every kernel has one config
anyway); no GPU is needed to build the autotuners."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

_SCRIPT = r"""
import importlib, json, os, pkgutil
from triton.runtime.autotuner import Autotuner
import probprune_kernels.triton as kernels
from probprune_kernels.triton import _common

tuners = {}
for info in pkgutil.iter_modules(kernels.__path__):
    module = importlib.import_module(f"{kernels.__name__}.{info.name}")
    for name, obj in vars(module).items():
        if isinstance(obj, Autotuner):
            tuners[f"{info.name}.{name}"] = len(obj.configs)
gpu = [(dict(BLOCK=64), 4, 3), (dict(BLOCK=32), 4, 4)]
counts = {}
for mode in ("full", "first", "bogus"):
    os.environ["PROBPRUNE_TRITON_AUTOTUNE"] = mode
    try:
        counts[mode] = len(_common.configs(gpu, dict(BLOCK=16)))
    except ValueError as e:
        counts[mode] = str(e)
print(json.dumps({"tuners": tuners, "counts": counts}))
"""


def test_first_keeps_one_config_per_autotuner():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PROBPRUNE_TRITON_AUTOTUNE"] = "first"
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    tuners = got["tuners"]
    assert {"gather_rows", "gather_cols", "attention", "lm_head_ce", "sample_compact"} <= \
        {name.split(".")[0] for name in tuners}, tuners
    assert all(n == 1 for n in tuners.values()), tuners
    assert got["counts"]["full"] == 2 and got["counts"]["first"] == 1
    assert "must be full or first" in got["counts"]["bogus"]
