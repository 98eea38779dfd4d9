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

_SCRIPT = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from probprune_kernels.triton import attention, gather_cols, gather_rows, lm_head_ce, sample_compact

def compile_first_config(autotuner, ptrs, constexprs, arch=90):
    fn, cfg = autotuner.fn, autotuner.configs[0]
    sig = {n: ("constexpr" if p.is_constexpr else ptrs.get(n, "i32"))
           for n, p in zip(fn.arg_names, fn.params)}
    const = {**constexprs, **cfg.kwargs}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", arch, 32),
                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

done = []
for dt, prec in (("fp16", "tf32"), ("fp32", "ieee")):
    for bias, swiglu in ((False, False), (True, False), (False, True)):
        if dt == "fp32" and (bias or swiglu):
            continue
        compile_first_config(gather_rows._gather_rows_gemm_kernel,
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
compile_first_config(lm_head_ce._lm_head_ce_kernel,
    dict(h_ptr="*bf16", w_ptr="*bf16", lab_ptr="*i64", nll_ptr="*fp32", ignore_index="i64"),
    dict(DOT_PRECISION="tf32", DOT_UPCAST=False))
done.append("lm_head_ce bf16")
for sample in (True, False):
    compile_first_config(sample_compact._sample_compact_kernel,
        dict(probs_ptr="*fp32", u_ptr="*fp32" if sample else "*u8", m_ptr="*u8", idx_ptr="*i32",
             cnt_ptr="*i32"),
        dict(SAMPLE=sample, WRITE_MASK=sample, COMPACT=True))
    done.append(f"sample_compact sample={sample}")
print(json.dumps(done))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    done = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(done) == 10, done
