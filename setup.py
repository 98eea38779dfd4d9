"""Builds ``probprune_kernels._C`` from ``csrc/`` with torch's cpp_extension and ninja.

Switches (flash-attention style):
  PROBPRUNE_SKIP_CUDA_BUILD=1  build nothing; every op still works through Triton or the reference.
  TORCH_CUDA_ARCH_LIST         CUDA architectures, default "8.0;9.0+PTX" (A100, H100/H200; PTX for
                               newer GPUs). PROBPRUNE_CUDA_ARCHS="80;90" is accepted too.
  MAX_JOBS                     parallel compile jobs; by default chosen from free memory and cores.
  NVCC_THREADS                 nvcc --threads, default 2.
  CUDA_HOME                    the toolkit; /usr/local/cuda when unset and present.
The CUDA part is built only where nvcc and a CUDA build of torch exist.
Sources: csrc/**/*.cu and csrc/**/*.cpp, except csrc/emulation/ (the CPU build of the kernels'
block logic, compiled by the tests on their own).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _log(msg):
    print(f"[probprune setup] {msg}", file=sys.stderr)


def _free_gib():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 8.0


def _default_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes that
    /usr/local. Prefer an explicit toolkit directory."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            _log(f"CUDA_HOME={cand}")
            return


def _arch_list():
    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = os.environ.get("PROBPRUNE_CUDA_ARCHS")
    if archs:  # "80;90" -> "8.0;9.0"
        out = []
        for a in archs.replace(",", ";").split(";"):
            a = a.strip()
            if a and "." not in a:
                a = f"{a[:-1]}.{a[-1]}"
            if a:
                out.append(a)
        return ";".join(out)
    return DEFAULT_ARCHS


def _sources():
    found = glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
    found += glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    skip = os.path.join("csrc", "emulation") + os.sep
    return sorted(s for s in found if not s.startswith(skip))


def _extensions():
    if os.environ.get("PROBPRUNE_SKIP_CUDA_BUILD", "0") == "1":
        _log("PROBPRUNE_SKIP_CUDA_BUILD=1: skipping the CUDA extension")
        return [], {}
    _default_cuda_home()
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
    sources = _sources()
    if not sources:
        _log("csrc/ has no sources: skipping the CUDA extension")
        return [], {}
    archs = _arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    if not any(a.strip().startswith("9.0") or a.strip().upper().endswith("+PTX")
               for a in archs.replace(" ", ";").split(";")):
        _log(f"TORCH_CUDA_ARCH_LIST={archs} holds no sm_90 code and no PTX: on an H100 / H200 "
             f"the cuda backend stays off and Triton runs the ops")
    if "MAX_JOBS" not in os.environ:
        # nvcc peaks near 4 GiB a job on these templates; never more jobs than cores.
        jobs = max(1, min(os.cpu_count() or 1, int(_free_gib() // 4)))
        os.environ["MAX_JOBS"] = str(jobs)
        _log(f"MAX_JOBS={jobs} (from free memory and cores)")
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    _log(f"building probprune_kernels._C for TORCH_CUDA_ARCH_LIST={archs} "
         f"({len(sources)} sources, CUDA_HOME={CUDA_HOME})")
    # Some toolkits (pip/conda layouts) keep libcudart in lib/ while an empty lib64/ exists.
    library_dirs = []
    for sub in ("lib64", "lib"):
        d = os.path.join(CUDA_HOME, sub)
        if glob.glob(os.path.join(d, "libcudart.so*")):
            library_dirs.append(d)
            break
    # Let `import probprune_kernels._C` find libtorch / libc10 without importing torch first.
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    archs_macro = '-DPROBPRUNE_CUDA_ARCHS="' + archs + '"'
    ext = CUDAExtension(
        name="probprune_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        library_dirs=library_dirs,
        extra_link_args=[f"-Wl,-rpath,{torch_lib}"],
        extra_compile_args={
            "cxx": ["-O3", archs_macro],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                     f"--threads={nvcc_threads}",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
