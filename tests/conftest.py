"""Shared test settings: a fixed seed, no TF32, and the tolerance policy used by every suite."""
import os
import random

import pytest
import torch

# Triton runs on the CPU only under its interpreter, and the flag must be set before anything
# (transformers included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fp32 tight; low precision by dtype. Kernel results must match the reference within these.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
WIKITEXT_TEST = os.environ.get(
    "PROBPRUNE_WIKITEXT2_TEST", os.path.join(SHARED_DATA, "wikitext-2-raw", "wiki.test.raw"))


@pytest.fixture(autouse=True)
def _seed_and_no_tf32():
    random.seed(0)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


def assert_close(actual, expected, dtype=None, msg="", **tol):
    """torch.testing.assert_close with the dtype's tolerance and a mismatch summary."""
    tol = tol or TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{msg}\n{m}", **tol)


ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")  # names of tests/tiny_models.py


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{arch: directory} of tiny random-weight checkpoints, written once per session."""
    from tests.tiny_models import make_model_dir

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_model_dir(str(root / arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """A calibration text file for whole runs on the tiny models."""
    from tests.tiny_models import CORPUS
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(CORPUS * 60) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A private conversion cache for the embedded SmolLM2 (so tests never touch the user's)."""
    return str(tmp_path_factory.mktemp("probprune_cache"))
