"""GPU tests: every CUDA op (``probprune_kernels._cuda`` and ``ops`` with ``backend="cuda"``) and
every Triton op (``ops`` with ``backend="triton"``) against the reference on the same GPU tensors.

fp32 / fp16 / bf16, K in {1, 3}, ragged / zero / full counts, sizes that are not tile or vector
multiples (and some that are, for the 16-byte load paths), GQA 1 and 3. GEMM tolerances are the
project's per-dtype ones (tests/conftest.py); attention follows flash-attention's rule (error
against an fp32 oracle at most twice the same-dtype reference's). Marked ``gpu``: skipped without
one; run them with ``pytest -m gpu`` or bench/gpu_check.sh.
"""
import pytest
import torch

from probprune_kernels import _cuda, ops, reference
from tests.conftest import assert_close
from tests.kernel_cases import (HEAD_KINDS, check_attention, check_head_attention, compact_inputs,
                                counts_for, head_case, query_head_masks, routing_case)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["cuda", "triton"]


def _run(backend, op, *args):
    """op on `backend`: the CUDA functions directly (and through ops), Triton through ops."""
    if backend == "cuda":
        if not _cuda.available(op):
            pytest.skip(f"CUDA op {op} unavailable: {_cuda.load_error() or 'GPU older than sm_80?'}")
        out = getattr(_cuda, op)(*args)
        via_ops = getattr(ops, op)(*args, backend="cuda")
        for a, b in zip(out if isinstance(out, tuple) else (out,),
                        via_ops if isinstance(via_ops, tuple) else (via_ops,)):
            assert torch.equal(a, b), f"{op}: _cuda and ops(backend='cuda') disagree"
        return out
    return getattr(ops, op)(*args, backend=backend)


def _grid(cases):
    """Parametrizes a test over (backend, dtype, case). Triton autotunes every new shape key
    (several compiles each), so the Triton backend runs a subset that still covers every dtype,
    K 1 and 3, ragged / zero / full counts, odd and vector-aligned sizes: all dtypes on the first
    case, one dtype on each of the others."""
    skip = pytest.mark.skip(reason="triton: subset of the CUDA grid (autotuning cost), see _grid")
    params = []
    for i, case in enumerate(cases):
        for dtype in DTYPES:
            for backend in BACKENDS:
                full = backend != "triton" or i == 0 or dtype == DTYPES[1 + i % 2]
                params.append(pytest.param(backend, dtype, case, marks=() if full else skip))
    return pytest.mark.parametrize("backend,dtype,case", params)


def _with_and_without(operand, backend, case, cases):
    """An optional operand's values to run: (None, operand), or only (operand,) for Triton past
    the first case (the subset of _grid)."""
    return (None, operand) if backend != "triton" or case == cases[0] else (operand,)


def _compact(K, n, counts, cap=None):
    return compact_inputs(K, n, counts, cap, device=DEV)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------
# masks

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,n,cap", [(1, 7, None), (3, 2500, None), (3, 11008, 6000), (2, 5, 0)])
def test_sample_compact(backend, dtype, K, n, cap):
    probs = torch.rand(n, device=DEV).to(dtype)
    probs[: n // 10] = 0.0
    probs[n // 10: n // 5] = 1.0
    uniforms = torch.rand(K, n, device=DEV).to(dtype)
    ref_masks = reference.sample_masks(probs, uniforms)
    if K >= 3:
        ref_masks[1] = False
        ref_masks[2] = True
    ref_idx, ref_counts = reference.compact_masks(ref_masks, cap)
    assert torch.equal(_run(backend, "sample_masks", probs, uniforms),
                       reference.sample_masks(probs, uniforms))
    idx, counts = _run(backend, "compact_masks", ref_masks, cap)
    assert torch.equal(idx, ref_idx) and torch.equal(counts, ref_counts)
    masks, idx, counts = _run(backend, "sample_and_compact", probs, uniforms, cap)
    r_masks = reference.sample_masks(probs, uniforms)
    r_idx, r_counts = reference.compact_masks(r_masks, cap)
    assert torch.equal(masks, r_masks) and torch.equal(idx, r_idx) and torch.equal(counts, r_counts)


# ----------------------------------------------------------------------------------------------
# GEMMs

GEMM_CASES = [  # K, M, Din, units, group, counts, capacity
    (3, 150, 70, 50, 3, "ragged", None),
    (1, 37, 45, 19, 1, "ragged", None),
    (3, 300, 256, 8, 64, "full", None),       # 16-byte vector loads, head-sized groups
    (3, 20, 33, 30, 1, "zero", None),
    (3, 140, 128, 300, 1, "ragged", 170),
]


@_grid(GEMM_CASES)
def test_gather_rows_gemm(backend, dtype, case):
    K, M, din, n, group, kind, cap = case
    x = _rand(K, M, din, dtype=dtype)
    w = _rand(n * group, din, dtype=dtype, scale=din ** -0.5)
    bias = _rand(n * group, dtype=dtype)
    idx, counts = _compact(K, n, counts_for(kind, K, n if cap is None else cap), cap)
    for b in _with_and_without(bias, backend, case, GEMM_CASES):
        got = _run(backend, "gather_rows_gemm", x, w, idx, counts, group, b)
        ref = reference.gather_rows_gemm(x, w, idx, counts, group, b)
        assert_close(got, ref, dtype, msg=f"{backend} gather_rows {case} bias={b is not None}")


SWIGLU_CASES = [(3, 150, 70, 90, "ragged", None), (1, 29, 24, 70, "full", None),
                (3, 33, 20, 64, "zero", None), (3, 260, 256, 600, "ragged", 400)]


@_grid(SWIGLU_CASES)
def test_gather_rows_swiglu(backend, dtype, case):
    K, M, din, F, kind, cap = case
    x = _rand(K, M, din, dtype=dtype)
    wg = _rand(F, din, dtype=dtype, scale=din ** -0.5)
    wu = _rand(F, din, dtype=dtype, scale=din ** -0.5)
    idx, counts = _compact(K, F, counts_for(kind, K, F if cap is None else cap), cap)
    got = _run(backend, "gather_rows_swiglu", x, wg, wu, idx, counts)
    ref = reference.gather_rows_swiglu(x, wg, wu, idx, counts)
    assert_close(got, ref, dtype, msg=f"{backend} swiglu {case}")


COLS_CASES = [
    (3, 150, 140, 50, 3, "ragged", None),
    (1, 37, 45, 19, 1, "ragged", None),
    (3, 300, 256, 8, 64, "full", None),       # vector path on the gathered columns
    (3, 20, 33, 30, 1, "zero", None),
    (3, 66, 130, 300, 1, "ragged", 170),
]


@_grid(COLS_CASES)
def test_gather_cols_gemm(backend, dtype, case):
    K, M, dout, n, group, kind, cap = case
    cap_ = n if cap is None else cap
    w = _rand(dout, n * group, dtype=dtype, scale=(n * group) ** -0.5)
    idx, counts = _compact(K, n, counts_for(kind, K, cap_), cap)
    h = _rand(K, M, cap_ * group, dtype=dtype)
    for k, c in enumerate(counts.tolist()):
        h[k, :, c * group:] = float("nan")   # never read
    residual = _rand(K, M, dout, dtype=dtype)
    for r in _with_and_without(residual, backend, case, COLS_CASES):
        got = _run(backend, "gather_cols_gemm", h, w, idx, counts, group, r)
        ref = reference.gather_cols_gemm(h.nan_to_num(0.0), w, idx, counts, group, r)
        assert_close(got, ref, dtype, msg=f"{backend} gather_cols {case} residual={r is not None}")


# ----------------------------------------------------------------------------------------------
# attention

ATTN_SHAPES = [(70, 24), (203, 64), (129, 128)]


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("K,kind", [(1, "ragged"), (3, "ragged"), (3, "full"), (2, "zero")])
@_grid(ATTN_SHAPES)
def test_masked_attention(backend, dtype, case, K, kind, G):
    T, D = case
    B, hkv = 2, 3
    q = _rand(K, B, T, hkv * G, D, dtype=dtype)
    k = _rand(K, B, T, hkv, D, dtype=dtype)
    v = _rand(K, B, T, hkv, D, dtype=dtype)
    counts = torch.tensor(counts_for(kind, K, hkv), dtype=torch.int32, device=DEV)
    got = _run(backend, "masked_attention", q, k, v, counts, None)
    check_attention(got, q, k, v, counts, None, dtype, f"{backend} attention T={T} D={D}",
                    fp32_tol=dict(atol=1e-4, rtol=1e-4))
    for i, c in enumerate(counts.tolist()):
        assert (got[i, :, :, c * G:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_attention_wide_heads_cuda(dtype):
    """head_dim above 128: the FMA path for every dtype (up to 256), explicit scale."""
    K, B, T, hkv, G, D = 2, 1, 45, 2, 2, 160
    q = _rand(K, B, T, hkv * G, D, dtype=dtype)
    k = _rand(K, B, T, hkv, D, dtype=dtype)
    v = _rand(K, B, T, hkv, D, dtype=dtype)
    counts = torch.tensor([2, 1], dtype=torch.int32, device=DEV)
    got = _run("cuda", "masked_attention", q, k, v, counts, 0.3)
    check_attention(got, q, k, v, counts, 0.3, dtype, "cuda attention D=160",
                    fp32_tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("tight", [False, True], ids=["full-cap", "tight-cap"])
@pytest.mark.parametrize("kind", HEAD_KINDS)
@_grid(ATTN_SHAPES)
def test_masked_attention_heads(backend, dtype, case, kind, tight):
    """The query-head form against the sliced oracle (computed on the CPU)."""
    T, D = case
    G = 3
    hc = head_case(query_head_masks(kind, 3, G), G, 2, T, D, dtype, tight)
    got = _run(backend, "masked_attention_heads", *hc.args(DEV), None)
    check_head_attention(got.cpu(), hc, G, None, dtype, f"{backend} heads {kind} T={T} D={D}",
                         fp32_tol=dict(atol=1e-4, rtol=1e-4))


def test_masked_attention_heads_hand_built_cuda():
    if not _cuda.available("masked_attention_heads"):
        pytest.skip("CUDA op masked_attention_heads unavailable")
    args, expected = routing_case()
    for dtype in DTYPES:  # fp32: the FMA path, fp16 / bf16: tensor cores
        q, k, v, qc, slot = (t.to(DEV) for t in args)
        got = _cuda.masked_attention_heads(q.to(dtype), k.to(dtype), v.to(dtype), qc, slot, None)
        assert_close(got.float().cpu(), expected, dtype, msg=str(dtype))


# ----------------------------------------------------------------------------------------------
# lm_head + cross-entropy

LM_HEAD_CASES = [  # K, M, d, V
    (2, 508, 256, 32000),     # the engine's shape: dozens of vocabulary slices
    (1, 37, 45, 300),         # rows and hidden size off the tiles and the 16-byte loads
    (3, 150, 128, 1000),
]


@pytest.mark.parametrize("per_mask_labels", [False, True])
@_grid(LM_HEAD_CASES)
def test_lm_head_ce(backend, dtype, case, per_mask_labels):
    """Against the reference on the inputs in fp32 (the kernels never round the logits); a mask
    whose rows are all ignored gives NaN."""
    K, M, d, V = case
    h = _rand(K, M, d, dtype=dtype)
    w = _rand(V, d, dtype=dtype, scale=d ** -0.5)
    labels = torch.randint(0, V, (K, M) if per_mask_labels else (M,), device=DEV)
    labels[..., :2] = torch.tensor([0, V - 1], device=DEV)
    labels[..., 3] = -100
    if per_mask_labels and K > 1:
        labels[-1] = -100
    got = _run(backend, "lm_head_ce", h, w, labels)
    ref = reference.lm_head_ce(h.float(), w.float(), labels)
    assert got.dtype == torch.float32 and got.shape == (K,)
    assert_close(got, ref, torch.float32, atol=1e-4, rtol=1e-4, equal_nan=True,
                 msg=f"{backend} lm_head_ce {case}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_ce_on_a_second_gpu(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on the tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    h = torch.randn(2, 508, 128, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4000, 128, device=dev, dtype=torch.bfloat16) / 11
    labels = torch.randint(0, 4000, (508,), device=dev)
    with torch.cuda.device(0):
        got = _run(backend, "lm_head_ce", h, w, labels)
    assert got.device == dev
    assert_close(got, reference.lm_head_ce(h.float(), w.float(), labels), torch.float32,
                 atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# launch properties

def _small_inputs(dtype, K, M, din, n, group, T, D):
    """Inputs of every CUDA op for one small problem with ragged counts: {op: its arguments}."""
    x = _rand(K, M, din, dtype=dtype)
    w = _rand(n * group, din, dtype=dtype)
    idx, counts = _compact(K, n, counts_for("ragged", K, n))
    h = _rand(K, M, n * group, dtype=dtype)
    q = _rand(K, 1, T, 4, D, dtype=dtype)
    kv = _rand(K, 1, T, 2, D, dtype=dtype)
    heads = torch.tensor(counts_for("ragged", K, 2), dtype=torch.int32, device=DEV)
    u = torch.rand(K, 50, device=DEV)
    p = torch.rand(50, device=DEV)
    return {
        "gather_rows_gemm": (x, w, idx, counts, group, None),
        "gather_rows_swiglu": (x, w, w, idx, counts),
        "gather_cols_gemm": (h, w.t().contiguous(), idx, counts, group, None),
        "masked_attention": (q, kv, kv, heads, None),
        "masked_attention_heads": (q[:, :, :, :3].contiguous(), kv, kv, heads + 1,
                                   torch.tensor([[1, 0, 1]], dtype=torch.int32,
                                                device=DEV).expand(K, 3).contiguous(), None),
        "compact_masks": (u < 0.5, None),
        "sample_masks": (p, u),
        "sample_and_compact": (p, u, 30),   # a capacity below the number of units
        "lm_head_ce": (x, w, torch.randint(0, n * group, (M,), device=DEV), -100, 4096),
    }


def test_cuda_ops_do_not_sync():
    """counts stay on the device: no host synchronisation inside the CUDA ops."""
    if not _cuda.available("gather_rows_gemm"):
        pytest.skip("CUDA ops unavailable")
    args = _small_inputs(torch.float16, K=3, M=64, din=128, n=16, group=8, T=33, D=64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for op in ("gather_rows_gemm", "gather_rows_swiglu", "gather_cols_gemm",
                   "masked_attention", "masked_attention_heads", "compact_masks",
                   "lm_head_ce"):
            getattr(_cuda, op)(*args[op])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_ops_pass_opcheck():
    """The public ops on the cuda backend: schema, fake tensors, AOT dispatch; the raw
    torch.ops.probprune_cuda ops (no fakes: fake tensors stop at the public op): schema."""
    if not _cuda.available("gather_rows_gemm"):
        pytest.skip("CUDA ops unavailable")
    args = _small_inputs(torch.bfloat16, K=2, M=19, din=40, n=6, group=4, T=21, D=32)
    assert sorted(args) == sorted(_cuda.OPS)
    for name, op_args in args.items():
        torch.library.opcheck(getattr(torch.ops.probprune, name).default, (*op_args, "cuda"),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
        if name in _cuda.KERNEL_OPS:
            torch.library.opcheck(getattr(torch.ops.probprune_cuda, name).default, op_args,
                                  test_utils=("test_schema",))


def test_k_masks_in_one_launch_match_k_single_launches():
    if not _cuda.available("gather_rows_gemm"):
        pytest.skip("CUDA ops unavailable")
    K, M, din, n, group = 4, 96, 128, 24, 8
    x = _rand(K, M, din, dtype=torch.float16)
    w = _rand(n * group, din, dtype=torch.float16)
    idx, counts = _compact(K, n, [24, 0, 7, 13])
    y = _cuda.gather_rows_gemm(x, w, idx, counts, group, None)
    for k in range(K):
        yk = _cuda.gather_rows_gemm(x[k:k + 1].contiguous(), w, idx[k:k + 1].contiguous(),
                                    counts[k:k + 1].contiguous(), group, None)
        assert torch.equal(y[k:k + 1], yk)
