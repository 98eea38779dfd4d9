"""The CUDA extension without a GPU: it builds and imports where the toolkit is, exposes every op
with the reference's signature, and the backend degrades quietly (or with one warning when the
build is broken). The kernels' arithmetic is tested on the CPU in test_cuda_emulation.py and on a
GPU in test_cuda_ops.py."""
import glob
import importlib.machinery
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from probprune_kernels import _cuda, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


@pytest.fixture(scope="module")
def C():
    if os.environ.get("PROBPRUNE_SKIP_CUDA_BUILD", "0") == "1":
        pytest.skip("PROBPRUNE_SKIP_CUDA_BUILD=1: the CUDA extension is not built")
    if importlib.util.find_spec("probprune_kernels._C") is None:
        pytest.skip("probprune_kernels._C is not built (no nvcc or a CPU-only torch when installed; "
                    "build it with `pip install -e . --no-build-isolation`)")
    import probprune_kernels._C as ext  # a broken build fails here, loudly
    return ext


def test_extension_imports_and_exposes_all_ops(C):
    assert set(C.OPS) == set(_cuda.KERNEL_OPS)
    assert _cuda.is_built() and _cuda.load_error() is None
    for op in _cuda.KERNEL_OPS:
        assert hasattr(torch.ops.probprune_cuda, op), op
    for op in _cuda.OPS:
        assert callable(getattr(_cuda, op))
    # the KV-group form of attention is a conversion in _cuda, not a kernel of the extension
    assert not hasattr(torch.ops.probprune_cuda, "masked_attention")
    assert "8.0" in C.CUDA_ARCHS and "9.0" in C.CUDA_ARCHS
    info = _cuda.info()
    assert info["built"] and sorted(info["ops"]) == sorted(_cuda.KERNEL_OPS)
    assert sorted(info["available"]) == sorted(_cuda.OPS)


def test_extension_imports_in_a_fresh_interpreter(C, tmp_path):
    """`python -c "import probprune_kernels._C"` works from anywhere, without a GPU."""
    out = subprocess.run([sys.executable, "-c", "import probprune_kernels._C as C; print(C.OPS)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gather_rows_gemm" in out.stdout


def test_cuda_signatures_follow_the_reference(C):
    """_cuda.<op> and the registered schema take the reference's positional arguments."""
    for op in _cuda.OPS:
        if op == "sample_and_compact":
            ref_params = ["probs", "uniforms", "capacity"]
        else:
            ref_params = list(inspect.signature(getattr(reference, op)).parameters)
        assert list(inspect.signature(getattr(_cuda, op)).parameters) == ref_params, op
        if op in _cuda.KERNEL_OPS:
            schema = getattr(torch.ops.probprune_cuda, op).default._schema
            assert [a.name for a in schema.arguments] == ref_params, (op, str(schema))


def test_fake_implementations_give_reference_shapes(C):
    """The probprune_cuda ops have no fake (meta) kernels: fake tensors stop at the opaque public
    op torch.ops.probprune.<op>, whose fake gives the reference's shapes with backend="cuda"."""
    meta = torch.device("meta")
    x = torch.empty(3, 37, 45, device=meta, dtype=torch.float16)
    w = torch.empty(20 * 3, 45, device=meta, dtype=torch.float16)
    idx = torch.empty(3, 11, device=meta, dtype=torch.int32)
    counts = torch.empty(3, device=meta, dtype=torch.int32)
    ops = torch.ops.probprune
    assert ops.gather_rows_gemm(x, w, idx, counts, 3, None, "cuda").shape == (3, 37, 33)
    h = torch.empty(3, 37, 33, device=meta, dtype=torch.float16)
    assert ops.gather_cols_gemm(h, w.t().contiguous(), idx, counts, 3, None,
                                "cuda").shape == (3, 37, 45)
    assert ops.gather_rows_swiglu(x, w, w, idx, counts, "cuda").shape == (3, 37, 11)
    q = torch.empty(2, 1, 9, 6, 16, device=meta)
    kv = torch.empty(2, 1, 9, 2, 16, device=meta)
    assert ops.masked_attention(q, kv, kv, counts[:2], None, "cuda").shape == q.shape
    q5 = torch.empty(2, 1, 9, 5, 16, device=meta)  # 5 query slots over 2 KV heads
    slot = torch.empty(2, 5, device=meta, dtype=torch.int32)
    assert ops.masked_attention_heads(q5, kv, kv, counts[:2], slot, None, "cuda").shape == q5.shape
    labels = torch.empty(37, device=meta, dtype=torch.int64)
    assert ops.lm_head_ce(x, w, labels, -100, 4096, "cuda").shape == (3,)
    masks = torch.empty(3, 50, device=meta, dtype=torch.bool)
    i, c = ops.compact_masks(masks, 20, "cuda")
    assert i.shape == (3, 20) and i.dtype == torch.int32 and c.shape == (3,)
    u = torch.empty(3, 50, device=meta)
    m, i, c = ops.sample_and_compact(u[0], u, None, "cuda")
    assert m.dtype == torch.bool and i.shape == (3, 50)
    with pytest.raises(NotImplementedError):
        torch.ops.probprune_cuda.gather_rows_gemm(x, w, idx, counts, 3, None)


def test_available_needs_a_gpu():
    """No GPU (or no extension): nothing is available; an unknown op never is."""
    assert not _cuda.available("no_such_op")
    if not torch.cuda.is_available():
        assert not any(_cuda.available(op) for op in _cuda.OPS)


def test_cuda_ops_raise_clearly_without_the_extension(monkeypatch):
    monkeypatch.setitem(_cuda._state, "tried", True)
    monkeypatch.setitem(_cuda._state, "module", None)
    monkeypatch.setitem(_cuda._state, "error", "not built (test)")
    assert not _cuda.available("gather_rows_gemm")
    with pytest.raises(RuntimeError, match="not built"):
        _cuda.compact_masks(torch.zeros(1, 3, dtype=torch.bool))


def _package_copy(tmp_path, so_bytes=None):
    """A copy of probprune_kernels without (or with a broken) _C, importable from tmp_path."""
    dst = tmp_path / "probprune_kernels"
    shutil.copytree(os.path.join(ROOT, "probprune_kernels"), dst,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if so_bytes is not None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        (dst / f"_C{suffix}").write_bytes(so_bytes)
    return dst


_PROBE = r"""
import json, sys, warnings
# an editable install's finder would resolve probprune_kernels._C inside the checkout: drop it
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                    and "editable" not in getattr(f, "__module__", "").lower()]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import probprune_kernels
    from probprune_kernels import _cuda
    avail = [_cuda.available(op) for op in _cuda.OPS for _ in range(3)]
    info = _cuda.info()
    be = probprune_kernels.backends()
print(json.dumps({"file": probprune_kernels.__file__, "any": any(avail), "error": info["error"],
                  "backends": be,
                  "warnings": [str(w.message) for w in caught
                               if "probprune_kernels._C" in str(w.message)]}))
"""


def _probe(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(tmp_path)), res["file"]
    return res


def test_missing_extension_is_quiet(tmp_path):
    _package_copy(tmp_path)
    res = _probe(tmp_path)
    assert not res["any"] and "not built" in res["error"]
    assert res["warnings"] == []
    assert "reference" in res["backends"] and "cuda" not in res["backends"]


def test_broken_extension_warns_once(tmp_path):
    _package_copy(tmp_path, so_bytes=b"not an ELF file")
    res = _probe(tmp_path)
    assert not res["any"] and "failed to load" in res["error"]
    assert len(res["warnings"]) == 1, res["warnings"]


def test_kernel_sources_stay_free_of_torch():
    """.cu/.cuh files and the shared logic headers are plain C++/CUDA (raw pointers, sizes,
    streams); only csrc/bindings.cpp (and the CPU emulation) include torch."""
    torch_inc = re.compile(r'#\s*include\s*[<"](torch/|ATen/|c10/|pybind11)')
    kernel_files = (glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True)
                    + glob.glob(os.path.join(CSRC, "**", "*.cuh"), recursive=True)
                    + glob.glob(os.path.join(CSRC, "kernels", "*.h"))
                    + glob.glob(os.path.join(CSRC, "probprune", "*.h")))
    assert len(kernel_files) >= 10
    for f in kernel_files:
        with open(f) as fh:
            assert not torch_inc.search(fh.read()), f"{f} includes torch headers"
    cuda_inc = re.compile(r'#\s*include\s*[<"](cuda|mma|cuda_fp16|cuda_bf16)')
    for f in glob.glob(os.path.join(CSRC, "probprune", "*_logic.h")) + \
            [os.path.join(CSRC, "probprune", "common.h")]:
        with open(f) as fh:
            assert not cuda_inc.search(fh.read()), f"{f} must compile with a plain C++ compiler"


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh without a GPU: records that, runs its plumbing, exits 0."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the dry mode is for machines without one")
    out_dir = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_TESTS="tests/test_cuda_ops.py")
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no GPU" in res.stdout
    data = json.loads((out_dir / "gpu_check.json").read_text())
    assert data["gpu"] is False and data["dry_run"] is True and data["ok"] is True
    names = {s["name"]: s for s in data["steps"]}
    assert names["build"]["status"] == "skipped"
    assert names["gpu_tests"]["status"] in ("ok", "skipped")
    assert (out_dir / "gpu_check.md").read_text().startswith("# gpu_check")
