"""Every Triton kernel compiles for a GPU (sm_90, the first autotune config) on a machine without
one: the interpreter runs the kernels as numpy, so it does not catch compiled-mode errors (types,
loop-carried scalars, early returns, tl.dot shapes). Runs in a subprocess without
TRITON_INTERPRET, using the ptxas bundled with Triton."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Never import triton in this process here: the other test modules set TRITON_INTERPRET=1 before
# triton is first imported, and an earlier import would defeat that.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

_PRELUDE = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from probprune_kernels.triton import attention, gather_cols, gather_rows, lm_head_ce, sample_compact

# an autotuned kernel with its first config, a plain one with `constexprs` alone
def compile_first_config(kernel, ptrs, constexprs, arch=90):
    fn, cfg = (kernel.fn, kernel.configs[0]) if isinstance(kernel, Autotuner) else (kernel, None)
    sig = {n: ("constexpr" if p.is_constexpr else ptrs.get(n, "i32"))
           for n, p in zip(fn.arg_names, fn.params)}
    const = {**constexprs, **(cfg.kwargs if cfg else {})}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if cfg else {}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

LM_HEAD_PTRS = dict(h_ptr="*bf16", w_ptr="*bf16", lab_ptr="*i64", part_ptr="*fp32",
                    loss_ptr="*fp32", ignore_index="i64")
LM_HEAD_CONST = dict(DOT_PRECISION="tf32", DOT_UPCAST=False)
LM_MERGE_CONST = dict(BLOCK_M=lm_head_ce._MERGE_BLOCK_M, BLOCK_S=lm_head_ce._MERGE_BLOCK_S)
"""

_SCRIPT = _PRELUDE + r"""

done = []
for dt, prec in (("fp16", "tf32"), ("fp32", "ieee")):
    for bias, swiglu in ((False, False), (True, False), (False, True)):
        if dt == "fp32" and (bias or swiglu):
            continue
        kernel = (gather_rows._gather_rows_swiglu_kernel if swiglu
                  else gather_rows._gather_rows_gemm_kernel)
        compile_first_config(kernel,
            dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", w2_ptr=f"*{dt}", b_ptr=f"*{dt}", idx_ptr="*i32",
                 cnt_ptr="*i32", y_ptr=f"*{dt}"),
            dict(HAS_BIAS=bias, SWIGLU=swiglu, DOT_PRECISION=prec, DOT_UPCAST=False))
        done.append(f"gather_rows {dt} bias={bias} swiglu={swiglu}")
compile_first_config(gather_cols._gather_cols_gemm_kernel,
    dict(h_ptr="*bf16", w_ptr="*bf16", r_ptr="*bf16", idx_ptr="*i32", cnt_ptr="*i32",
         y_ptr="*bf16"),
    dict(HAS_RESIDUAL=True, W_COL_MAJOR=True, DOT_PRECISION="tf32", DOT_UPCAST=False))
done.append("gather_cols bf16 residual")
for d in (64, 128):
    compile_first_config(attention._masked_attention_kernel,
        dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", cnt_ptr="*i32", slot_ptr="*i32",
             o_ptr="*fp16", qk_scale="fp32"),
        dict(BLOCK_D=d, DOT_PRECISION="tf32", DOT_UPCAST=False))
    done.append(f"attention fp16 D={d}")
compile_first_config(lm_head_ce._lm_head_ce_kernel, LM_HEAD_PTRS, LM_HEAD_CONST)
done.append("lm_head_ce bf16")
compile_first_config(lm_head_ce._lm_head_ce_merge_kernel, LM_HEAD_PTRS, LM_MERGE_CONST)
done.append("lm_head_ce merge")
for sample in (True, False):
    compile_first_config(sample_compact._sample_compact_kernel,
        dict(probs_ptr="*fp32", u_ptr="*fp32" if sample else "*u8", m_ptr="*u8", idx_ptr="*i32",
             cnt_ptr="*i32"),
        dict(SAMPLE=sample, WRITE_MASK=sample, COMPACT=True))
    done.append(f"sample_compact sample={sample}")
print(json.dumps(done))
"""


def _run_script(script):
    """The JSON the script prints last, run without TRITON_INTERPRET from the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    done = _run_script(_SCRIPT)
    assert len(done) == 11, done


_LM_HEAD_IR = _PRELUDE + r"""
part = compile_first_config(lm_head_ce._lm_head_ce_kernel, LM_HEAD_PTRS, LM_HEAD_CONST)
merge = compile_first_config(lm_head_ce._lm_head_ce_merge_kernel, LM_HEAD_PTRS, LM_MERGE_CONST)
print(json.dumps({"partial": part.asm["ttir"], "merge": merge.asm["ttir"],
                  "block_m": lm_head_ce._lm_head_ce_kernel.configs[0].kwargs["BLOCK_M"],
                  "merge_block_m": lm_head_ce._MERGE_BLOCK_M,
                  "merge_block_s": lm_head_ce._MERGE_BLOCK_S}))
"""


@pytest.mark.slow
def test_lm_head_ce_row_offsets_are_64_bit():
    """The row offsets of lm_head_ce (rows of h and labels, the partials' rows) are products in
    64 bits: offs_m * stride_hm in int32 wraps past 2^31 elements of a mask (M = 2^19 rows at
    d = 4096). Read from the kernels compiled for sm_90 (TTIR): every integer product shaped like
    the rows ([BLOCK_M], [BLOCK_M, 1]; the merge's [BLOCK_S, 1] and [BLOCK_S, BLOCK_M] slices of
    rows) is i64, and h's row pointers take i64 offsets."""
    import re

    ir = _run_script(_LM_HEAD_IR)
    bm, mbm, mbs = ir["block_m"], ir["merge_block_m"], ir["merge_block_s"]
    for name, shapes in (("partial", {f"{bm}", f"{bm}x1"}),
                         ("merge", {f"{mbm}", f"{mbs}x1", f"{mbs}x{mbm}"})):
        products = {m.group(2) for m in re.finditer(r"arith\.muli [^\n]*: tensor<([\dx]+)x(i\d+)>",
                                                     ir[name]) if m.group(1) in shapes}
        assert products == {"i64"}, (name, products)
    assert re.search(rf"tt\.addptr [^\n]*: tensor<{bm}x1x!tt\.ptr<bf16>>, tensor<{bm}x1xi64>",
                     ir["partial"])
