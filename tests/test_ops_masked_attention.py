"""masked_attention and masked_attention_heads: reference semantics (against a naive causal softmax
loop, the sliced oracle and hand-built cases), the head index lists, fake shapes, opcheck."""
import math

import pytest
import torch

from probprune_kernels import ops
from tests.conftest import assert_close
from tests.kernel_cases import (HEAD_KINDS, check_head_attention, head_case, query_head_masks,
                                routing_case)

# every test on the CPU, and on the GPU when there is one
pytestmark = pytest.mark.usefixtures("kernel_device")


def _naive(q, k, v, counts, scale=None):
    K, B, T, hq, d = q.shape
    G = hq // k.shape[3]
    scale = 1 / math.sqrt(d) if scale is None else scale
    o = torch.zeros_like(q)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(K):
        for h in range(int(counts[i]) * G):
            s = torch.einsum("btd,bsd->bts", q[i, :, :, h], k[i, :, :, h // G]) * scale
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            o[i, :, :, h] = p @ v[i, :, :, h // G]
    return o


@pytest.mark.parametrize("K,counts", [(1, [0]), (1, [2]), (3, [0, 2, 1])])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_masked_attention_reference(K, counts, G, scale):
    B, T, hkv, d = 2, 13, 2, 12
    q = torch.randn(K, B, T, hkv * G, d)
    k, v = torch.randn(K, B, T, hkv, d), torch.randn(K, B, T, hkv, d)
    c = torch.tensor(counts, dtype=torch.int32)
    o = ops.masked_attention(q, k, v, c, scale, backend="reference")
    assert_close(o, _naive(q, k, v, c, scale))


def test_opcheck_masked_attention_reference():
    q, k, v = torch.randn(3, 2, 5, 6, 4), torch.randn(3, 2, 5, 2, 4), torch.randn(3, 2, 5, 2, 4)
    c = torch.tensor([0, 2, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.probprune.masked_attention.default,
                          (q, k, v, c, None, "reference"))


# ----------------------------------------------------------------------------------------------
# the query-head form and its index lists

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tight", [False, True], ids=["full-cap", "tight-cap"])
@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("G", [1, 3])
def test_masked_attention_heads_reference(G, kind, tight, dtype):
    case = head_case(query_head_masks(kind, 3, G), G, 2, 13, 12, dtype, tight)
    o = ops.masked_attention_heads(*case.args(), backend="reference")
    check_head_attention(o, case, G, None, dtype, f"reference {kind} G={G} tight={tight}")


def test_masked_attention_heads_reference_scale_and_hand_built():
    case = head_case(query_head_masks("mixed", 2, 2), 2, 1, 9, 8, torch.float32)
    o = ops.masked_attention_heads(*case.args(), 0.3, backend="reference")
    check_head_attention(o, case, 2, 0.3, torch.float32, "reference scale=0.3")
    args, expected = routing_case()
    assert_close(ops.masked_attention_heads(*args, backend="reference"), expected)


def test_masked_attention_heads_against_the_naive_loop():
    """The KV-group form's naive oracle, on every query head of the kept groups."""
    G, counts = 3, torch.tensor([0, 2, 1], dtype=torch.int32)
    q, k, v = torch.randn(3, 2, 11, 6, 8), torch.randn(3, 2, 11, 2, 8), torch.randn(3, 2, 11, 2, 8)
    idx = torch.zeros(3, 2, dtype=torch.int32)
    idx[1] = torch.tensor([0, 1])
    lists = ops.head_lists_from_groups(idx, counts, G)
    o = ops.masked_attention_heads(q, k, v, lists.q_counts, lists.kv_slot, backend="reference")
    assert_close(o, _naive(q, k, v, counts))


def _lists(*rows, G):
    return ops.head_lists(torch.tensor(rows, dtype=torch.bool), G)


def test_head_lists_hand_computed():
    one = _lists([1, 0, 0, 0, 0, 0], G=3)
    assert one.q_idx.tolist() == [[0, 0, 0, 0, 0, 0]] and one.q_counts.tolist() == [1]
    assert one.kv_idx.tolist() == [[0, 0]] and one.kv_counts.tolist() == [1]
    assert one.kv_slot.tolist() == [[0, 0, 0, 0, 0, 0]]
    two = _lists([0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], G=3)
    assert two.q_idx.tolist() == [[1, 2, 3, 0, 0, 0], [5, 0, 0, 0, 0, 0], [0] * 6]
    assert two.q_counts.tolist() == [3, 1, 0]
    assert two.kv_idx.tolist() == [[0, 1], [1, 0], [0, 0]]
    assert two.kv_counts.tolist() == [2, 1, 0]
    assert two.kv_slot.tolist() == [[0, 0, 1, 0, 0, 0], [0] * 6, [0] * 6]
    # G = 2, 4 groups: groups 1 and 3 kept; capacity 3 bounds q (and kv to min(4, 3))
    cap = ops.head_lists(torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1]], dtype=torch.bool), 2, 3)
    assert cap.q_idx.tolist() == [[2, 3, 7]] and cap.kv_idx.tolist() == [[1, 3, 0]]
    assert cap.kv_slot.tolist() == [[0, 0, 1]] and cap.kv_counts.tolist() == [2]
    for t in cap:
        assert t.dtype == torch.int32


def test_head_lists_capacity_too_small_raises():
    with pytest.raises(ValueError, match="capacity=1 is below the kept count"):
        ops.head_lists(torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), 2, 1)


@pytest.mark.parametrize("K,hkv,G", [(5, 4, 3), (3, 2, 1), (0, 2, 2)])
def test_head_lists_from_groups_is_head_lists_of_the_expanded_masks(K, hkv, G):
    groups = torch.rand(K, hkv) < 0.5
    if K:
        groups[0], groups[-1] = False, True
    kv_idx, kv_counts = ops.compact_masks(groups)
    got = ops.head_lists_from_groups(kv_idx, kv_counts, G)
    expected = ops.head_lists(groups.repeat_interleave(G, dim=1), G)
    for name, a, b in zip(ops.HeadLists._fields, got, expected):
        assert a.dtype == torch.int32 and torch.equal(a, b), name


def test_head_lists_on_the_meta_device():
    """Device ops only: the lists build on meta tensors (no value is read on the host)."""
    lists = ops.head_lists(torch.ones(3, 8, dtype=torch.bool, device="meta"), 4, 5,
                           validate=False)
    shapes = [tuple(t.shape) for t in lists]
    assert shapes == [(3, 5), (3,), (3, 2), (3,), (3, 5)]
    assert all(t.device.type == "meta" for t in lists)


def test_masked_attention_heads_fake_shape():
    meta = torch.device("meta")
    q = torch.empty(2, 1, 9, 5, 16, device=meta)
    kv = torch.empty(2, 1, 9, 2, 16, device=meta)
    qc = torch.empty(2, device=meta, dtype=torch.int32)
    slot = torch.empty(2, 5, device=meta, dtype=torch.int32)
    o = torch.ops.probprune.masked_attention_heads(q, kv, kv, qc, slot, None, "reference")
    assert o.shape == q.shape and o.device == meta
    with pytest.raises(ValueError, match=r"kv_slot must have shape \(2, 5\)"):
        torch.ops.probprune.masked_attention_heads(q, kv, kv, qc, slot[:, :4], None, "reference")


def test_opcheck_masked_attention_heads_reference():
    case = head_case(query_head_masks("mixed", 2, 3), 3, 2, 5, 4, torch.float32, tight=True)
    q, k, v, qc, slot = case.args()
    q, k, v = (torch.nan_to_num(t) for t in (q, k, v))
    torch.library.opcheck(torch.ops.probprune.masked_attention_heads.default,
                          (q, k, v, qc, slot, None, "reference"))
