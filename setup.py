"""Builds ``probprune_kernels._C`` from ``csrc/`` with torch's cpp_extension and ninja.

Switches (flash-attention style):
  PROBPRUNE_SKIP_CUDA_BUILD=1  build nothing; every op still works through Triton or the reference.
  TORCH_CUDA_ARCH_LIST         CUDA architectures, default "8.0;9.0".
  MAX_JOBS                     parallel compile jobs; by default chosen from free memory.
  NVCC_THREADS                 nvcc --threads, default 2.
The CUDA part is built only where nvcc and a CUDA build of torch exist.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[probprune setup] {msg}", file=sys.stderr)


def _free_gib():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 8.0


def _extensions():
    if os.environ.get("PROBPRUNE_SKIP_CUDA_BUILD", "0") == "1":
        _log("PROBPRUNE_SKIP_CUDA_BUILD=1: skipping the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable in the build environment: install with "
             "`pip install -e . --no-build-isolation`; skipping the CUDA extension")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None and not (
            CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        _log("no nvcc or a CPU-only torch: skipping the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        _log("csrc/ has no sources: skipping the CUDA extension")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if "MAX_JOBS" not in os.environ:
        # nvcc peaks near 4 GiB a job on these templates; never more jobs than cores.
        jobs = max(1, min(os.cpu_count() or 1, int(_free_gib() // 4)))
        os.environ["MAX_JOBS"] = str(jobs)
        _log(f"MAX_JOBS={jobs} (from free memory and cores)")
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    _log(f"building probprune_kernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        name="probprune_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     f"--threads={nvcc_threads}",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
