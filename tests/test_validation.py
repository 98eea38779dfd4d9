"""Bad input gets a clear error before any launch, for every op (DESIGN: kernel contract)."""
import pytest
import torch

from probprune_kernels import dispatch, ops
from tests.triton_support import DEVICE, requires_triton

I32 = torch.int32


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Any launch during these tests is a failure: validation must come first."""
    def boom(backend, op):
        raise AssertionError(f"{op} launched on {backend} despite invalid input")
    monkeypatch.setattr(dispatch, "implementation", boom)


def _idx(K=2, cap=4, n=4):
    idx = torch.arange(cap, dtype=I32).repeat(K, 1) % n
    return idx, torch.full((K,), cap, dtype=I32)


# --------------------------------------------------------------------------- gather_rows_gemm

def _rows(**over):
    a = dict(x=torch.randn(2, 5, 7), w=torch.randn(8, 7), group=2, bias=None)
    a["idx"], a["counts"] = _idx(2, 4, 4)
    a.update(over)
    return a


def _call_rows(a, **kw):
    return ops.gather_rows_gemm(a["x"], a["w"], a["idx"], a["counts"], a["group"], a["bias"], **kw)


@pytest.mark.parametrize("over,err,match", [
    (dict(x=torch.randn(5, 7)), ValueError, r"x must have rank 3 \[K, M, in_features\]"),
    (dict(w=torch.randn(8, 7, 1)), ValueError, r"w must have rank 2"),
    (dict(w=torch.randn(8, 6)), ValueError, r"x has in_features 7 but w has shape \(8, 6\)"),
    (dict(group=3), ValueError, r"w.shape\[0\] \(8\) is not a multiple of group \(3\)"),
    (dict(group=0), ValueError, r"group must be >= 1"),
    (dict(w=torch.randn(8, 7, dtype=torch.float16)), ValueError, r"w has dtype torch.float16"),
    (dict(x=torch.randn(2, 5, 7).long(), w=torch.randn(8, 7).long()), TypeError,
     r"x must be float32, float16 or bfloat16"),
    (dict(bias=torch.randn(7)), ValueError, r"bias must have shape \(8,\)"),
    (dict(bias=torch.randn(8).half()), ValueError, r"bias has dtype"),
    (dict(w=torch.randn(8, 7, device="meta")), ValueError, r"w has device meta"),
    (dict(idx=_idx(2, 4, 4)[0].to("meta")), ValueError, r"idx has device meta"),
    (dict(idx=_idx(2, 4, 4)[0].long()), TypeError, r"idx and counts must be int32"),
    (dict(counts=torch.full((2,), 4)), TypeError, r"idx and counts must be int32"),
    (dict(idx=_idx(3, 4, 4)[0]), ValueError, r"must have K=2 rows"),
    (dict(idx=_idx(2, 5, 4)[0], counts=torch.full((2,), 5, dtype=I32)), ValueError,
     r"idx capacity 5 exceeds the number of units 4"),
    (dict(counts=torch.tensor([4, 5], dtype=I32)), ValueError,
     r"counts must lie in \[0, capacity=4\], got min 4 max 5"),
    (dict(counts=torch.tensor([-1, 2], dtype=I32)), ValueError, r"counts must lie in \[0,"),
    (dict(idx=torch.tensor([[0, 1, 2, 4], [0, 1, 2, 3]], dtype=I32)), ValueError,
     r"idx out of range: values must lie in \[0, 4\), got \[0, 4\]"),
    (dict(idx=torch.tensor([[0, 1, 2, -1], [0, 1, 2, 3]], dtype=I32)), ValueError,
     r"idx out of range"),
])
def test_gather_rows_gemm_invalid(over, err, match):
    with pytest.raises(err, match=match):
        _call_rows(_rows(**over))


def test_validate_false_skips_only_value_checks():
    bad_values = _rows(counts=torch.tensor([4, 5], dtype=I32))
    with pytest.raises(AssertionError, match="launched"):  # value check skipped: reaches launch
        _call_rows(bad_values, validate=False)
    with pytest.raises(ValueError, match="in_features"):   # shape checks stay
        _call_rows(_rows(w=torch.randn(8, 6)), validate=False)


# ------------------------------------------------------------------------- gather_rows_swiglu

@pytest.mark.parametrize("over,match", [
    (dict(w_up=torch.randn(4, 6)), r"w_gate \(4, 7\) and w_up \(4, 6\) must have one shape"),
    (dict(w_up=torch.randn(4, 7).half()), r"w_up has dtype torch.float16"),
    (dict(w_gate=torch.randn(4, 6), w_up=torch.randn(4, 6)), r"x has in_features 7"),
    (dict(counts=torch.tensor([4, 9], dtype=I32)), r"counts must lie in \[0, capacity=4\]"),
])
def test_gather_rows_swiglu_invalid(over, match):
    a = dict(x=torch.randn(2, 5, 7), w_gate=torch.randn(4, 7), w_up=torch.randn(4, 7))
    a["idx"], a["counts"] = _idx(2, 4, 4)
    a.update(over)
    with pytest.raises(ValueError, match=match):
        ops.gather_rows_swiglu(a["x"], a["w_gate"], a["w_up"], a["idx"], a["counts"])


# --------------------------------------------------------------------------- gather_cols_gemm

@pytest.mark.parametrize("over,err,match", [
    (dict(h=torch.randn(2, 5)), ValueError, r"h must have rank 3"),
    (dict(h=torch.randn(2, 5, 7)), ValueError,
     r"h has 7 columns but idx capacity 4 x group 2 = 8"),
    (dict(w=torch.randn(6, 7)), ValueError, r"w.shape\[1\] \(7\) is not a multiple of group"),
    (dict(w=torch.randn(6, 6)), ValueError, r"idx capacity 4 exceeds the number of units 3"),
    (dict(residual=torch.randn(2, 5, 5)), ValueError, r"residual must have shape \(2, 5, 6\)"),
    (dict(residual=torch.randn(2, 5, 6).half()), ValueError, r"residual has dtype"),
    (dict(residual=torch.randn(2, 5, 6, device="meta")), ValueError, r"residual has device"),
    (dict(h=torch.randn(2, 5, 8).bfloat16()), ValueError, r"w has dtype torch.float32"),
    (dict(counts=torch.tensor([0, 5], dtype=I32)), ValueError, r"counts must lie in"),
    (dict(idx=torch.tensor([[0, 1, 2, 3], [0, 0, 0, 7]], dtype=I32)), ValueError,
     r"idx out of range"),
])
def test_gather_cols_gemm_invalid(over, err, match):
    a = dict(h=torch.randn(2, 5, 8), w=torch.randn(6, 8), residual=None)
    a["idx"], a["counts"] = _idx(2, 4, 4)
    a.update(over)
    with pytest.raises(err, match=match):
        ops.gather_cols_gemm(a["h"], a["w"], a["idx"], a["counts"], 2, a["residual"])


# --------------------------------------------------------------------------- masked_attention

@pytest.mark.parametrize("over,err,match", [
    (dict(q=torch.randn(2, 1, 5, 6)), ValueError, r"q must have rank 5 \[K, B, T, heads"),
    (dict(v=torch.randn(2, 1, 5, 3, 4)), ValueError,
     r"k \(2, 1, 5, 2, 4\) and v \(2, 1, 5, 3, 4\)"),
    (dict(k=torch.randn(2, 1, 4, 2, 4), v=torch.randn(2, 1, 4, 2, 4)), ValueError,
     r"do not match q .* in K, B, T or head_dim"),
    (dict(k=torch.randn(2, 1, 5, 4, 4), v=torch.randn(2, 1, 5, 4, 4)), ValueError,
     r"q heads \(6\) must be a positive multiple of k/v heads \(4\)"),
    (dict(k=torch.randn(2, 1, 5, 2, 4).half()), ValueError, r"k has dtype torch.float16"),
    (dict(v=torch.randn(2, 1, 5, 2, 4, device="meta")), ValueError, r"v has device meta"),
    (dict(counts=torch.tensor([1, 2])), ValueError, r"counts must be int32 \[K=2\]"),
    (dict(counts=torch.tensor([1, 2, 0], dtype=I32)), ValueError, r"counts must be int32 \[K=2\]"),
    (dict(counts=torch.tensor([1, 3], dtype=I32)), ValueError,
     r"counts must lie in \[0, 2\] KV heads, got min 1 max 3"),
    (dict(q=torch.randn(2, 1, 5, 6, 4).long()), TypeError, r"q must be float32"),
])
def test_masked_attention_invalid(over, err, match):
    a = dict(q=torch.randn(2, 1, 5, 6, 4), k=torch.randn(2, 1, 5, 2, 4),
             v=torch.randn(2, 1, 5, 2, 4), counts=torch.tensor([1, 2], dtype=I32))
    a.update(over)
    with pytest.raises(err, match=match):
        ops.masked_attention(a["q"], a["k"], a["v"], a["counts"])


# --------------------------------------------------------------------- masked_attention_heads

def _heads(**over):
    """5 query slots over 2 KV heads (not a multiple); the kv_slot entries of inactive slots (9)
    are garbage, which the checks ignore."""
    a = dict(q=torch.randn(2, 1, 5, 5, 4), k=torch.randn(2, 1, 5, 2, 4),
             v=torch.randn(2, 1, 5, 2, 4), q_counts=torch.tensor([3, 5], dtype=I32),
             kv_slot=torch.tensor([[0, 1, 1, 9, 9], [0, 0, 1, 1, 1]], dtype=I32))
    a.update(over)
    return a


def _call_heads(a, **kw):
    return ops.masked_attention_heads(a["q"], a["k"], a["v"], a["q_counts"], a["kv_slot"], **kw)


HEADS_INVALID = [
    (dict(q=torch.randn(2, 1, 5, 5)), ValueError, r"q must have rank 5 \[K, B, T, heads"),
    (dict(k=torch.randn(2, 1, 5, 3, 4)), ValueError, r"k \(2, 1, 5, 3, 4\) and v"),
    (dict(v=torch.randn(2, 1, 5, 2, 4).half()), ValueError, r"v has dtype torch.float16"),
    (dict(kv_slot=torch.zeros(2, 5, dtype=I32, device="meta")), ValueError,
     r"kv_slot has device meta"),
    (dict(kv_slot=torch.zeros(2, 5, dtype=torch.int64)), TypeError,
     r"q_counts and kv_slot must be int32, got torch.int32 and torch.int64"),
    (dict(q_counts=torch.tensor([3, 5])), TypeError, r"q_counts and kv_slot must be int32"),
    (dict(kv_slot=torch.zeros(5, dtype=I32)), ValueError, r"kv_slot must have rank 2"),
    (dict(kv_slot=torch.zeros(2, 4, dtype=I32)), ValueError,
     r"kv_slot must have shape \(2, 5\) \[K, Hq_cap\], got \(2, 4\)"),
    (dict(q_counts=torch.tensor([3, 5, 1], dtype=I32)), ValueError,
     r"q_counts must have shape \(2,\) \(K masks\), got \(3,\)"),
    (dict(q_counts=torch.tensor([3, 6], dtype=I32)), ValueError,
     r"q_counts must lie in \[0, Hq_cap=5\] query slots, got min 3 max 6"),
    (dict(q_counts=torch.tensor([-1, 2], dtype=I32)), ValueError, r"q_counts must lie in"),
    (dict(kv_slot=torch.tensor([[0, 1, 2, 9, 9], [0, 0, 1, 1, 1]], dtype=I32)), ValueError,
     r"kv_slot\[0, 2\] = 2: the KV slot of an active query slot \(h < q_counts\[0\] = 3\) "
     r"must lie in \[0, Hkv_cap=2\); 1 active entries are outside"),
    (dict(kv_slot=torch.tensor([[0, 1, 1, 9, 9], [0, -1, 1, 1, 7]], dtype=I32)), ValueError,
     r"kv_slot\[1, 1\] = -1: .*; 2 active entries are outside"),
]


@pytest.mark.parametrize("backend", [None, "reference", "triton", "cuda"])
@pytest.mark.parametrize("over,err,match", HEADS_INVALID)
def test_masked_attention_heads_invalid(over, err, match, backend):
    """Rejected before the backend is even resolved, whichever is asked for."""
    with pytest.raises(err, match=match):
        _call_heads(_heads(**over), backend=backend)


def test_masked_attention_heads_valid_input_reaches_the_launch():
    """Garbage in the kv_slot entries of inactive slots passes; so does a zero KV capacity when
    no slot is active."""
    with pytest.raises(AssertionError, match="launched"):
        _call_heads(_heads())
    with pytest.raises(AssertionError, match="launched"):
        _call_heads(_heads(k=torch.randn(2, 1, 5, 0, 4), v=torch.randn(2, 1, 5, 0, 4),
                           q_counts=torch.zeros(2, dtype=I32)))


def test_masked_attention_heads_validate_false_skips_only_value_checks():
    bad_slot = _heads(kv_slot=torch.full((2, 5), 7, dtype=I32))
    with pytest.raises(AssertionError, match="launched"):
        _call_heads(bad_slot, validate=False)
    with pytest.raises(ValueError, match=r"kv_slot must have shape"):
        _call_heads(_heads(kv_slot=torch.zeros(2, 4, dtype=I32)), validate=False)


@pytest.mark.parametrize("call,err,match", [
    (lambda: ops.head_lists(torch.ones(2, 6), 3), TypeError, r"q_masks must be bool"),
    (lambda: ops.head_lists(torch.ones(6, dtype=torch.bool), 3), ValueError,
     r"q_masks must have rank 2"),
    (lambda: ops.head_lists(torch.ones(2, 7, dtype=torch.bool), 3), ValueError,
     r"7 query heads do not split into KV groups of q_per_kv=3"),
    (lambda: ops.head_lists(torch.ones(2, 6, dtype=torch.bool), 0), ValueError,
     r"q_per_kv must be >= 1, got 0"),
    (lambda: ops.head_lists(torch.ones(2, 6, dtype=torch.bool), 3, 7), ValueError,
     r"capacity must lie in \[0, 6\], got 7"),
    (lambda: ops.head_lists_from_groups(torch.zeros(2, 3, dtype=torch.int64),
                                        torch.zeros(2, dtype=I32), 2), TypeError,
     r"kv_idx and kv_counts must be int32"),
    (lambda: ops.head_lists_from_groups(torch.zeros(2, 3, dtype=I32), torch.zeros(3, dtype=I32),
                                        2), ValueError, r"kv_counts \(3,\) must have K=2 rows"),
    (lambda: ops.head_lists_from_groups(torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32), 2),
     ValueError, r"kv_idx must have rank 2"),
    (lambda: ops.head_lists_from_groups(torch.zeros(2, 3, dtype=I32), torch.zeros(2, dtype=I32),
                                        0), ValueError, r"q_per_kv must be >= 1"),
])
def test_head_lists_invalid(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ----------------------------------------------------------------------------------- lm_head_ce

@pytest.mark.parametrize("over,err,match", [
    (dict(h=torch.randn(5, 8)), ValueError, r"h must have rank 3 \[K, M, hidden\]"),
    (dict(w=torch.randn(11, 7)), ValueError, r"h has hidden size 8 but w has shape \(11, 7\)"),
    (dict(w=torch.randn(11, 8).half()), ValueError, r"w has dtype torch.float16"),
    (dict(labels=torch.randint(0, 11, (5,), dtype=I32)), TypeError, r"labels must be int64"),
    (dict(labels=torch.randint(0, 11, (4,))), ValueError,
     r"labels must have shape \(5,\) or \(2, 5\), got \(4,\)"),
    (dict(labels=torch.tensor([0, 1, 11, 2, -100])), ValueError,
     r"labels must lie in \[0, vocab=11\) or equal ignore_index=-100; got values in \[-100, 11\]"),
    (dict(labels=torch.tensor([0, 1, -5, 2, 3])), ValueError, r"labels must lie in"),
    (dict(labels=torch.zeros(5, dtype=torch.long, device="meta")), ValueError,
     r"labels has device meta"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be >= 1"),
])
def test_lm_head_ce_invalid(over, err, match):
    a = dict(h=torch.randn(2, 5, 8), w=torch.randn(11, 8), labels=torch.randint(0, 11, (5,)),
             chunk_size=4096)
    a.update(over)
    with pytest.raises(err, match=match):
        ops.lm_head_ce(a["h"], a["w"], a["labels"], chunk_size=a["chunk_size"])


# ------------------------------------------------------------------------- sampling/compaction

@pytest.mark.parametrize("call,err,match", [
    (lambda: ops.compact_masks(torch.ones(3, dtype=torch.bool)), ValueError,
     r"masks must have rank 2 \[K, n\]"),
    (lambda: ops.compact_masks(torch.ones(2, 3)), TypeError, r"masks must be bool"),
    (lambda: ops.compact_masks(torch.ones(2, 3, dtype=torch.bool), 4), ValueError,
     r"capacity must lie in \[0, 3\], got 4"),
    (lambda: ops.sample_masks(torch.rand(4), torch.rand(2, 3)), ValueError,
     r"probs must have shape \(3,\)"),
    (lambda: ops.sample_masks(torch.rand(3), torch.rand(3)), ValueError,
     r"uniforms must have rank 2"),
    (lambda: ops.sample_masks(torch.rand(3), torch.rand(2, 3, device="meta")), ValueError,
     r"uniforms has device meta"),
    (lambda: ops.sample_masks(torch.rand(3), torch.randint(0, 2, (2, 3))), TypeError,
     r"uniforms must be float32"),
    (lambda: ops.sample_and_compact(torch.rand(3), torch.rand(2, 3), 5), ValueError,
     r"capacity must lie in \[0, 3\], got 5"),
])
def test_sample_compact_invalid(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (-0.5, "-0.5"), (1.25, "1.25")])
@pytest.mark.parametrize("opname", ["sample_masks", "sample_and_compact"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_probabilities_outside_unit_interval(opname, value, shown, backend):
    """A NaN probability would prune its unit on every sample, a negative one too, one above 1
    keep it: all are rejected, naming the first bad entry."""
    probs = torch.rand(6)
    probs[2] = probs[5] = value
    with pytest.raises(ValueError, match=rf"probs must lie in \[0, 1\] \(no NaN\): "
                                         rf"probs\[2\] = {shown}, 2 of 6 values outside"):
        getattr(ops, opname)(probs.to(DEVICE), torch.rand(3, 6, device=DEVICE), backend=backend)


@pytest.mark.parametrize("opname", ["sample_masks", "sample_and_compact"])
def test_validate_false_skips_the_probability_check(opname):
    probs = torch.full((6,), float("nan"))
    with pytest.raises(AssertionError, match="launched"):
        getattr(ops, opname)(probs, torch.rand(3, 6), validate=False)


# ------------------------------------------------------------------- contiguity (kernel backends)

def _noncontig_cases():
    idx, counts = _idx(2, 4, 4)
    x, w = torch.randn(2, 5, 7), torch.randn(8, 7)
    h = torch.randn(2, 5, 8)
    k = torch.randn(2, 1, 5, 2, 4)
    return [
        ("x", lambda be: ops.gather_rows_gemm(torch.randn(2, 7, 5).transpose(1, 2), w, idx,
                                              counts, 2, backend=be)),
        ("w", lambda be: ops.gather_rows_gemm(x, torch.randn(7, 8).t(), idx, counts, 2,
                                              backend=be)),
        ("bias", lambda be: ops.gather_rows_gemm(x, w, idx, counts, 2, torch.randn(16)[::2],
                                                 backend=be)),
        ("idx", lambda be: ops.gather_rows_gemm(x, w, torch.zeros(4, 2, dtype=I32).t(), counts,
                                                2, backend=be)),
        ("w_up", lambda be: ops.gather_rows_swiglu(x, torch.randn(4, 7), torch.randn(7, 4).t(),
                                                   idx, counts, backend=be)),
        ("h", lambda be: ops.gather_cols_gemm(torch.randn(2, 8, 5).transpose(1, 2),
                                              torch.randn(6, 8), idx, counts, 2, backend=be)),
        ("residual", lambda be: ops.gather_cols_gemm(h, torch.randn(6, 8), idx, counts, 2,
                                                     torch.randn(2, 6, 5).transpose(1, 2),
                                                     backend=be)),
        ("q", lambda be: ops.masked_attention(torch.randn(2, 1, 6, 5, 4).transpose(2, 3), k, k,
                                              torch.tensor([1, 2], dtype=I32), backend=be)),
        ("kv_slot", lambda be: ops.masked_attention_heads(
            torch.randn(2, 1, 5, 4, 4), k, k, torch.tensor([1, 2], dtype=I32),
            torch.zeros(4, 2, dtype=I32).t(), backend=be)),
        ("h", lambda be: ops.lm_head_ce(torch.randn(5, 2, 8).transpose(0, 1), w.T.contiguous(),
                                        torch.randint(0, 7, (5,)), backend=be)),
        ("labels", lambda be: ops.lm_head_ce(torch.randn(2, 5, 8), torch.randn(11, 8),
                                             torch.randint(0, 11, (5, 2)).t(), backend=be)),
        ("masks", lambda be: ops.compact_masks(torch.ones(3, 2, dtype=torch.bool).t(),
                                               backend=be)),
        ("uniforms", lambda be: ops.sample_and_compact(torch.rand(3), torch.rand(3, 2).t(),
                                                       backend=be)),
    ]


@requires_triton
@pytest.mark.parametrize("name,call", _noncontig_cases(), ids=lambda c: c if isinstance(c, str)
                         else "")
def test_non_contiguous_rejected_for_kernels(name, call, monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the cases build CPU tensors; the check itself is device independent")
    with pytest.raises(ValueError, match=rf"{name} must be contiguous .*call .contiguous\(\)"):
        call("triton")


@pytest.mark.parametrize("name,call", _noncontig_cases()[:3], ids=lambda c: c
                         if isinstance(c, str) else "")
def test_non_contiguous_fine_for_reference(name, call):
    with pytest.raises(AssertionError, match="launched on reference"):  # got past validation
        call("reference")


# -------------------------------------------------------------------------------------- layers

def test_layers_validate_masks():
    from torch import nn
    from probprune_kernels import MaskedLlamaAttention, MaskedSwiGLUMLP

    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads"):
        MaskedLlamaAttention(*(nn.Linear(8, 8) for _ in range(4)), 6, 4, 2)
    with pytest.raises(ValueError, match="k_proj has 8 outputs, expected 4"):
        MaskedLlamaAttention(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 8),
                             4, 2, 2)
    with pytest.raises(ValueError, match="gate_proj has a bias"):
        MaskedSwiGLUMLP(nn.Linear(8, 6), nn.Linear(8, 6, bias=False), nn.Linear(6, 8))
