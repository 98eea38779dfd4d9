"""Shared test settings: a fixed seed, no TF32, and the tolerance policy used by every suite."""
import os
import random

import pytest
import torch

# Triton runs on the CPU only under its interpreter, and the flag must be set before anything
# (transformers included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel results must match the reference within these (imported after TRITON_INTERPRET is set).
from probprune_kernels.reference import TOLERANCES  # noqa: E402

# A test's tensors on the CPU, and on a GPU when there is one (marked gpu: ``pytest -m gpu``
# selects the CUDA runs of every backend's tests).
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])

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


@pytest.fixture(params=["cpu", CUDA])
def kernel_device(request):
    """Runs the test with ``request.param`` as torch's default device: every tensor it makes
    without naming a device lands there (``pytest.mark.usefixtures("kernel_device")``)."""
    with torch.device(request.param):
        yield request.param


def assert_close(actual, expected, dtype=None, msg="", **tol):
    """torch.testing.assert_close with the dtype's tolerance and a mismatch summary."""
    tol = tol or TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{msg}\n{m}", **tol)


ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3")  # names of tests/tiny_models.py


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
