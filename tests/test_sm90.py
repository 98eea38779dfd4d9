"""Static sm_90 checks (marker ``sm90``), without a GPU: every CUDA kernel instance compiled by nvcc
for sm_90 and every autotune config of every Triton kernel compiled for sm_90, each through
``ptxas -v``. A spill in a hot-path kernel (tests/sm90_static.py: HOT_KERNELS) or shared memory
beyond sm_90's 227 KiB per block fails. The compile and parse code is tests/sm90_static.py, which
also writes the table of docs/gpu-static-checks.md.

Triton is checked for PROBPRUNE_SM90_DTYPES (default bf16,fp16: the tensor-core inputs; fp32
compiles several minutes longer and is in the table); the whole module takes about 2-3 minutes of
2 CPU cores with a cold Triton cache.
"""
import importlib.util
import os
import shutil

import pytest

from tests import sm90_static as s90

pytestmark = [pytest.mark.sm90, pytest.mark.slow]

TRITON_DTYPES = tuple(d for d in os.environ.get("PROBPRUNE_SM90_DTYPES", "bf16,fp16").split(",")
                      if d)


def _rows(records):
    return "\n".join(
        f"  {r['source']}: {r['kernel']} [{r['variant']}] regs={r['registers']} "
        f"spill st/ld={r['spill_stores']}/{r['spill_loads']} smem={r['smem']}" for r in records)


@pytest.fixture(scope="module")
def cuda():
    nvcc = s90.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin)")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no host C++ compiler for the dynamic shared memory sizes")
    return s90.cuda_records(jobs=2, nvcc=nvcc)


@pytest.fixture(scope="module")
def triton():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    return s90.triton_records_in_subprocesses(shards=2, dtypes=TRITON_DTYPES)


# ---- the parsers, on fixed text (no compiler needed) ----------------------------------------------

_PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4fastPf' for 'sm_90'
ptxas info    : Function properties for _Z4fastPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 41216 bytes smem
ptxas info    : Compile time = 154.719 ms
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_90'
ptxas info    : Function properties for _Z5spillPf
    64 bytes stack frame, 88 bytes spill stores, 144 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 64 bytes cumulative stack size, 41472 bytes smem
ptxas info    : Compiling entry function 'tri' for 'sm_90a'
ptxas info    : Function properties for tri
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]
"""

_PTX = """\
.extern .shared .align 16 .b8 dyn_smem[];
.visible .entry _Z4fastPf(
    .param .u64 p
)
.maxntid 256, 1, 1
.minnctapersm 2
{
    ret;
}
.visible .entry _Z3dynPf(
    .param .u64 p
)
.maxntid 128
{
    mov.u64 %rd1, dyn_smem;
    ret;
}
"""


def test_parse_ptxas_log():
    figs = s90.parse_ptxas(_PTXAS_LOG)
    assert set(figs) == {"_Z4fastPf", "_Z5spillPf", "tri"}
    assert figs["_Z4fastPf"] == dict(arch="sm_90", registers=128, stack=0, spill_stores=0,
                                     spill_loads=0, smem_static=41216)
    assert figs["_Z5spillPf"]["spill_stores"] == 88 and figs["_Z5spillPf"]["spill_loads"] == 144
    assert figs["tri"]["registers"] == 40 and figs["tri"]["smem_static"] == 0
    assert figs["tri"]["arch"] == "sm_90a"


def test_parse_ptx_entries():
    ents = s90.parse_ptx_entries(_PTX)
    assert ents["_Z4fastPf"] == dict(maxntid=256, minblocks=2, uses_dynamic_smem=False)
    assert ents["_Z3dynPf"] == dict(maxntid=128, minblocks=None, uses_dynamic_smem=True)


def test_short_cuda_names():
    name = ("void probprune::(anonymous namespace)::gather_rows_kernel<probprune::dev::TcEngine<"
            "__nv_bfloat16, probprune::gemm::TcConfig<128, 64, 32, 4, 2>, 2>, 2, __nv_bfloat16, "
            "probprune::gemm::TcConfig<128, 64, 32, 4, 2>>(const T3 *, int)")
    assert s90.short_cuda_name(name) == ("gather_rows_kernel",
                                         "TcEngine<bf16, TcConfig<128, 64, 32, 4, 2>, 2>")
    assert s90.short_cuda_name(
        "void probprune::(anonymous namespace)::masked_attention_tc_kernel<__half, 64>(const T1 *)"
    ) == ("masked_attention_tc_kernel", "fp16, 64")
    assert s90.short_cuda_name("void k(float *)") == ("k", "")


def test_hot_kernels_and_occupancy():
    assert s90.is_hot("gather_rows_kernel") and s90.is_hot("_lm_head_ce_merge_kernel")
    assert not s90.is_hot("compact_kernel") and not s90.is_hot("_sample_compact_kernel")
    assert s90.blocks_per_sm(128, 41472, 256) == 2
    assert s90.blocks_per_sm(184, 41472, 256) == 1
    assert s90.blocks_per_sm(32, 0, 128) == 16


# ---- CUDA: nvcc for sm_90 -------------------------------------------------------------------------

def test_every_cuda_source_compiles_for_sm90(cuda):
    records, failures = cuda
    assert not failures, "\n".join(f"{src}:\n{log}" for src, log in failures.items())
    compiled = {r["source"] for r in records}
    assert compiled, "no kernel entries parsed"
    hot = {r["kernel"] for r in records if r["hot"]}
    for needed in ("gather_rows", "gather_cols", "attention", "lm_head"):
        assert any(needed in k for k in hot), (needed, sorted(hot))


def test_cuda_hot_kernels_do_not_spill(cuda):
    records, _ = cuda
    bad = [r for r in records if r["hot"] and (r["spill_stores"] or r["spill_loads"])]
    assert not bad, "spills in hot-path CUDA kernels on sm_90:\n" + _rows(bad)


def test_cuda_shared_memory_and_registers_fit_sm90(cuda):
    records, _ = cuda
    unknown = [r for r in records if r["smem"] is None]
    assert not unknown, ("kernels with dynamic shared memory of unknown size: add them to "
                         "tests/sm90_static.py CUDA_DYNAMIC_SMEM\n" + _rows(unknown))
    over = [r for r in records if r["smem"] > s90.SMEM_LIMIT or r["registers"] > s90.MAX_REGISTERS]
    assert not over, f"beyond sm_90's {s90.SMEM_LIMIT} bytes of shared memory:\n" + _rows(over)


# ---- Triton: every autotune config for sm_90 ------------------------------------------------------

def test_every_triton_config_compiles_for_sm90(triton):
    records, meta = triton
    errors = [r for r in records if r.get("error")]
    assert not errors, "\n".join(f"{r['kernel']} [{r['variant']}]: {r['error']}" for r in errors)
    assert len(records) == meta["jobs"]
    for kernel, n_configs in meta["configs"].items():
        cases = meta["cases"][kernel]
        assert cases, f"{kernel} is launched by no case of tests/sm90_static.py triton_cases"
        got = [r for r in records if r["kernel"] == kernel.split(".", 1)[1]]
        assert len(got) == n_configs * len(cases), (kernel, n_configs, cases, len(got))
    for needed in ("gather_rows", "gather_cols", "attention", "lm_head"):
        assert any(needed in k for k in meta["configs"]), (needed, sorted(meta["configs"]))


def test_triton_hot_configs_do_not_spill(triton):
    records, _ = triton
    bad = [r for r in records if not r.get("error") and r["hot"]
           and (r["spill_stores"] or r["spill_loads"])]
    assert not bad, "spills in hot-path Triton configs on sm_90:\n" + _rows(bad)


def test_triton_shared_memory_fits_sm90(triton):
    records, _ = triton
    over = [r for r in records if not r.get("error")
            and (r["smem"] > s90.SMEM_LIMIT or r["registers"] > s90.MAX_REGISTERS)]
    assert not over, f"beyond sm_90's {s90.SMEM_LIMIT} bytes of shared memory:\n" + _rows(over)
