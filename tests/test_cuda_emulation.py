"""The CUDA kernels' block logic, run on the CPU against the reference ops.

``csrc/emulation/cpu_emulation.cpp`` replays every kernel of ``csrc/kernels/`` block by block with
the same ``__host__ __device__`` functions (``csrc/probprune/*_logic.h``): index expansion, tile
bounds and early exits, load coordinates, WMMA fragment offsets, epilogue lane mapping, online
softmax, compaction scan. It also checks coverage (each shared-memory element staged once per
stage, each output element written once). Built here with g++ through
``torch.utils.cpp_extension.load`` (light ATen headers only: seconds) and cached under
``build/`` (keyed by the sources' hash); its ops are ``torch.ops.probprune_emu.*``.

Shapes are chosen to span several tiles of the real configurations (the kernels' tile sizes come
from ``configs()``), with sizes that are not tile or vector multiples, ragged / zero / full counts,
K = 1 and 3, group 1 and 3 (and a head-sized group), GQA 1 and 3.
"""
import glob
import hashlib
import os

import pytest
import torch

from probprune_kernels import reference
from probprune_kernels._shapes import group_slots
from tests.conftest import assert_close
from tests.kernel_cases import (HEAD_KINDS, check_attention, check_head_attention, compact_inputs,
                                counts_for, head_case, query_head_masks,
                                routing_case)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sources_hash():
    files = sorted(glob.glob(os.path.join(CSRC, "probprune", "*.h"))
                   + glob.glob(os.path.join(CSRC, "emulation", "*.cpp")))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(os.path.basename(f).encode() + fh.read())
    return h.hexdigest()[:12]


CONFIG_NAMES = [f"{op}_{e}" for op in ("rows_tc", "swiglu_tc", "cols_tc", "rows_fma",
                                        "swiglu_fma", "cols_fma") for e in ("BM", "BN", "BK")]
CONFIG_NAMES += ["attn_tc_bq", "attn_fma_bq", "attn_fma_bkv", "mask_chunk"]


class _Emulation:
    """torch.ops.probprune_emu.* with the tile configuration as a dict."""

    def __getattr__(self, name):
        return getattr(torch.ops.probprune_emu, name)

    def configs(self):
        return dict(zip(CONFIG_NAMES, torch.ops.probprune_emu.configs().tolist()))

    def masked_attention(self, q, k, v, counts, scale, engine):
        """The KV-group form as the cuda backend runs it (``_cuda.masked_attention``): the
        general kernel on the index lists of ``group_slots``."""
        G = q.shape[3] // k.shape[3]
        return self.masked_attention_heads(q, k, v, *group_slots(counts, G, q.shape[3]), scale,
                                           engine)


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.probprune_emu, "configs"):  # once per process
        tag = _sources_hash()
        build_dir = os.path.join(ROOT, "build", f"cpu_emulation_{tag}")
        os.makedirs(build_dir, exist_ok=True)
        load(name=f"probprune_cpu_emulation_{tag}",
             sources=[os.path.join(CSRC, "emulation", "cpu_emulation.cpp")],
             extra_include_paths=[CSRC], extra_cflags=["-O2"], build_directory=build_dir,
             is_python_module=False, verbose=False)
    return _Emulation()


def _rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------------
# mask sampling and compaction

@pytest.mark.parametrize("K,n,cap", [(1, 7, None), (3, 2500, None), (3, 1030, 600), (2, 5, 0)])
def test_compact_emulation_matches_reference(emu, K, n, cap):
    masks = torch.rand(K, n) < torch.rand(1, n)
    if K >= 3:
        masks[1] = False          # a mask with no kept unit
        masks[2] = True           # a full one
    masks_out, idx, counts = emu.compact(masks, None, None, cap)
    ref_idx, ref_counts = reference.compact_masks(masks, cap)
    assert torch.equal(masks_out, masks)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_and_compact_emulation_matches_reference(emu, dtype):
    K, n = 3, 1500
    probs = torch.rand(n).to(dtype)
    probs[:10] = 0.0
    probs[10:20] = 1.0
    uniforms = torch.rand(K, n).to(dtype)
    masks, idx, counts = emu.compact(None, probs, uniforms, 1200)
    ref_masks = reference.sample_masks(probs, uniforms)
    ref_idx, ref_counts = reference.compact_masks(ref_masks, 1200)
    assert torch.equal(masks, ref_masks)
    assert torch.equal(emu.sample_masks(probs, uniforms), ref_masks)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(idx, ref_idx)


# ----------------------------------------------------------------------------------------------
# gather GEMMs

# "auto" is the launchers' choice (fp32 -> FMA, fp16/bf16 -> WMMA tiling); "other" runs the other
# engine's tiling on the same values (fp32 through the tensor-core index logic, and so on).
ENGINES = ["auto", "other"]


def _engine(engine, dtype):
    if engine == "auto":
        return "auto"
    return "tc" if dtype == torch.float32 else "fma"


def _gemm_cases():
    # (K, M, Din, n_units, group, counts kind, capacity)
    return [
        (3, 150, 70, 50, 3, "ragged", None),    # 2 x 2 tiles (TC), 3 x 3 (FMA); Din not a multiple of 8
        (1, 37, 45, 19, 1, "ragged", None),
        (3, 130, 64, 40, 4, "full", None),
        (3, 20, 33, 30, 1, "zero", None),
        (3, 140, 40, 300, 1, "ragged", 170),    # capacity below n, 2 column tiles of 128
    ]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _gemm_cases())
def test_gather_rows_emulation(emu, case, dtype, engine):
    # engine "tc" with fp32 values runs the tensor-core tiling at fp32 precision (index logic)
    K, M, din, n, group, kind, cap = case
    x = _rand(K, M, din, dtype=dtype)
    w = _rand(n * group, din, dtype=dtype)
    bias = _rand(n * group, dtype=dtype)
    idx, counts = compact_inputs(K, n, counts_for(kind, K, n if cap is None else cap), cap)
    for b in (None, bias):
        got = emu.gather_rows_gemm(x, w, idx, counts, group, b, _engine(engine, dtype))
        ref = reference.gather_rows_gemm(x, w, idx, counts, group, b)
        assert got.dtype == dtype and got.shape == ref.shape
        assert_close(got, ref, dtype, msg=f"gather_rows {case} bias={b is not None} {engine}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(3, 150, 70, 90, "ragged", None), (1, 29, 24, 70, "full", None),
                                  (3, 33, 20, 64, "zero", None), (3, 70, 36, 150, "ragged", 100)])
def test_gather_rows_swiglu_emulation(emu, case, dtype, engine):
    K, M, din, F, kind, cap = case
    x = _rand(K, M, din, dtype=dtype)
    wg, wu = _rand(F, din, dtype=dtype), _rand(F, din, dtype=dtype)
    idx, counts = compact_inputs(K, F, counts_for(kind, K, F if cap is None else cap), cap)
    got = emu.gather_rows_swiglu(x, wg, wu, idx, counts, _engine(engine, dtype))
    ref = reference.gather_rows_swiglu(x, wg, wu, idx, counts)
    # fp32: a product of two length-Din sums (|y| up to ~100) summed in another order
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}
    assert_close(got, ref, dtype, msg=f"swiglu {case} {engine}", **tol)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    (3, 150, 140, 50, 3, "ragged", None),   # Dout 140: 2 column tiles (TC), 3 (FMA); live 150 -> 5 k-tiles
    (1, 37, 45, 19, 1, "ragged", None),
    (3, 70, 64, 12, 8, "full", None),       # group a multiple of 8: the vector path on a GPU
    (3, 20, 33, 30, 1, "zero", None),
    (3, 66, 30, 90, 1, "ragged", 40),
])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_gather_cols_emulation(emu, case, dtype, engine, layout):
    # column-major: w = wt.t() of a contiguous wt, staged k-major (gemm::chunk_coord_kmajor)
    K, M, dout, n, group, kind, cap = case
    cap_ = n if cap is None else cap
    w = _rand(dout, n * group, dtype=dtype)
    if layout == "column-major":
        w = w.t().contiguous().t()
    idx, counts = compact_inputs(K, n, counts_for(kind, K, n if cap is None else cap), cap)
    h = _rand(K, M, cap_ * group, dtype=dtype)
    # entries beyond counts*group are never read: poison them
    for k, c in enumerate(counts.tolist()):
        h[k, :, c * group:] = float("nan")
    residual = _rand(K, M, dout, dtype=dtype)
    for r in (None, residual):
        got = emu.gather_cols_gemm(h, w, idx, counts, group, r, _engine(engine, dtype))
        ref = reference.gather_cols_gemm(h.nan_to_num(0.0), w, idx, counts, group, r)
        assert_close(got, ref, dtype,
                     msg=f"gather_cols {case} residual={r is not None} {engine} {layout}")


# ----------------------------------------------------------------------------------------------
# masked attention

@pytest.mark.parametrize("engine", ["auto", "fma"])  # fp32 is FMA either way; "fma" for 16-bit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("K,kind", [(1, "ragged"), (3, "ragged"), (3, "full"), (2, "zero")])
def test_masked_attention_emulation(emu, K, kind, G, dtype, engine):
    if engine == "fma" and dtype == torch.float32:
        pytest.skip("fp32 already takes the FMA path")
    B, T, hkv, D = 2, 70, 2, 24    # T: two query tiles of 64 (TC), five of 16 (FMA)
    hq = hkv * G
    q = _rand(K, B, T, hq, D, dtype=dtype)
    k = _rand(K, B, T, hkv, D, dtype=dtype)
    v = _rand(K, B, T, hkv, D, dtype=dtype)
    counts = torch.tensor(counts_for(kind, K, hkv), dtype=torch.int32)
    got = emu.masked_attention(q, k, v, counts, None, engine)
    assert got.shape == q.shape and got.dtype == dtype
    check_attention(got, q, k, v, counts, None, dtype, f"attention K={K} {kind} G={G} {engine}")
    for i, c in enumerate(counts.tolist()):
        assert (got[i, :, :, c * G:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,T", [(64, 65), (128, 40), (160, 33), (59, 17)])
def test_masked_attention_emulation_head_dims(emu, D, T, dtype):
    """DMAX 64 / 128 tensor-core tiles (fp16/bf16), head_dim above 128 (FMA path for every dtype),
    a head_dim that is not a multiple of 8, an explicit scale."""
    K, B, hkv, G = 2, 1, 2, 2
    q = _rand(K, B, T, hkv * G, D, dtype=dtype)
    k = _rand(K, B, T, hkv, D, dtype=dtype)
    v = _rand(K, B, T, hkv, D, dtype=dtype)
    counts = torch.tensor([2, 1], dtype=torch.int32)
    got = emu.masked_attention(q, k, v, counts, 0.3, "auto")
    check_attention(got, q, k, v, counts, 0.3, dtype, f"attention D={D} T={T}")


@pytest.mark.parametrize("engine", ["auto", "fma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tight", [False, True], ids=["full-cap", "tight-cap"])
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_masked_attention_heads_emulation(emu, kind, tight, dtype, engine):
    """The general form (single query heads pruned inside KV groups) against the sliced oracle;
    NaN in every head no active slot may read, -1 in the kv_slot entries of inactive slots."""
    if engine == "fma" and dtype == torch.float32:
        pytest.skip("fp32 already takes the FMA path")
    B, T, hkv, G, D = 2, 70, 3, 3, 24
    case = head_case(query_head_masks(kind, hkv, G), G, B, T, D, dtype, tight)
    got = emu.masked_attention_heads(*case.args(), None, engine)
    check_head_attention(got, case, G, None, dtype, f"heads {kind} tight={tight} {engine}")


def test_masked_attention_heads_emulation_hand_built(emu):
    args, expected = routing_case()
    for engine in ("auto", "tc"):
        got = emu.masked_attention_heads(*args, None, engine)
        assert_close(got, expected, torch.float32, msg=engine)


def test_emulation_rejects_an_out_of_range_kv_slot(emu):
    """An active slot reading past the KV heads is an out-of-bounds read on the GPU: the
    emulation stops there (so the tests above would catch a kernel using an inactive entry)."""
    q, kv = torch.randn(1, 1, 5, 2, 8), torch.randn(1, 1, 5, 2, 8)
    with pytest.raises(RuntimeError, match="reads KV head 2, outside"):
        emu.masked_attention_heads(q, kv, kv, torch.tensor([2], dtype=torch.int32),
                                   torch.tensor([[0, 2]], dtype=torch.int32), None, "auto")


def test_emulation_configs_match_the_shapes_used_here(emu):
    """The tests above span several tiles of the kernels' real configurations."""
    cfg = emu.configs()
    assert cfg["rows_tc_BM"] < 150 and cfg["rows_tc_BN"] < 150 and cfg["rows_tc_BK"] < 70
    assert cfg["swiglu_tc_BN"] < 90 and cfg["cols_tc_BN"] < 140
    assert cfg["rows_fma_BK"] * 2 < 70 and cfg["attn_tc_bq"] < 70
    assert cfg["attn_fma_bkv"] < 70 and cfg["mask_chunk"] < 2500


# ----------------------------------------------------------------------------------------------
# fused lm_head + cross-entropy

# (K, M, d, V, SMs planned for, vocabulary slices): 64 x 128 tiles; several row tiles, a short
# last vocabulary tile, one slice (V below a tile, or few SMs) and several.
LM_HEAD_CASES = [(2, 70, 40, 300, 132, 2), (3, 130, 24, 700, 132, 3), (1, 37, 45, 45, 132, 1),
                 (2, 70, 40, 300, 1, 1)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_mask_labels", [False, True])
@pytest.mark.parametrize("case", LM_HEAD_CASES)
def test_lm_head_ce_emulation(emu, case, per_mask_labels, dtype, engine):
    """Against the reference on the inputs in fp32 (the kernels never round the logits), with
    labels at the first and last vocabulary entry and at slice and tile edges."""
    K, M, d, V, sm_count, splits = case
    assert emu.lm_head_ce_grid(K, M, V, sm_count)[2] == splits
    h, w = _rand(K, M, d, dtype=dtype), (_rand(V, d, dtype=torch.float32) / 3).to(dtype)
    labels = torch.randint(0, V, (K, M) if per_mask_labels else (M,))
    edges = torch.tensor([0, V - 1, min(127, V - 1), min(128, V - 1), min(256, V - 1)])
    labels[..., :5] = edges
    labels[..., 6] = -100
    got = emu.lm_head_ce(h, w, labels, -100, sm_count, _engine(engine, dtype))
    ref = reference.lm_head_ce(h.float(), w.float(), labels)
    assert got.dtype == torch.float32 and got.shape == (K,)
    assert_close(got, ref, torch.float32, atol=2e-5, rtol=2e-5, msg=f"lm_head_ce {case} {engine}")


def test_lm_head_ce_emulation_ignore_index_and_empty(emu):
    h, w = torch.randn(2, 70, 16), torch.randn(300, 16) / 3
    labels = torch.randint(0, 300, (2, 70))
    labels[1] = 7           # custom ignore_index: mask 1 has no counted row -> NaN
    labels[0, :9] = 7
    got = emu.lm_head_ce(h, w, labels, 7, 132, "auto")
    ref = reference.lm_head_ce(h, w, labels, ignore_index=7)
    assert torch.isnan(got[1]) and torch.isnan(ref[1])
    assert_close(got[:1], ref[:1], torch.float32, atol=2e-5, rtol=2e-5)
    empty = emu.lm_head_ce(h[:, :0], w, labels[:, :0], -100, 132, "auto")
    assert empty.shape == (2,) and torch.isnan(empty).all()


@pytest.mark.parametrize("V", [32000, 49152, 128256])
def test_lm_head_ce_grid_fills_132_sms(emu, V):
    """M = 508 rows of K = 2 masks on 132 SMs: at least 4 blocks per SM (without the vocabulary
    split: 8 row tiles x 2 masks = 16), slices of at least 2 vocabulary tiles, none empty."""
    row_tiles, K, S, span = emu.lm_head_ce_grid(2, 508, V, 132)
    assert (row_tiles, K) == (8, 2)
    assert row_tiles * K * S >= 4 * 132
    assert span % 128 == 0 and span >= 2 * 128 and (S - 1) * span < V <= S * span
