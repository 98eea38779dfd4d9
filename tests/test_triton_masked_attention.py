"""Triton causal attention over active heads: the KV-group form against the reference, the
query-head form against the sliced oracle and a hand-built case.

fp16/bf16 oracle: the reference in fp32 on the same inputs, then cast (the kernel keeps scores,
softmax statistics and the accumulator in fp32).
"""
import pytest
import torch

from probprune_kernels import ops, reference
from tests.conftest import assert_close
from tests.kernel_cases import (HEAD_KINDS, check_head_attention, head_case, query_head_masks,
                                routing_case)
from tests.triton_support import DEVICE, DTYPES, on_device, requires_triton

pytestmark = requires_triton
HKV = 3
# counts per mask: zero, full, ragged, and all three in one launch
COUNTS = [[0], [HKV], [1], [0, HKV, 2]]


def _setup(counts, G, T, D, dtype, B=2):
    K = len(counts)
    q = torch.randn(K, B, T, HKV * G, D).to(dtype)
    k = torch.randn(K, B, T, HKV, D).to(dtype)
    v = torch.randn(K, B, T, HKV, D).to(dtype)
    c = torch.tensor(counts, dtype=torch.int32)
    for i, n in enumerate(counts):  # pruned heads are NaN: the kernel must not read them
        q[i, :, :, n * G:] = float("nan")
        k[i, :, :, n:] = float("nan")
        v[i, :, :, n:] = float("nan")
    return q, k, v, c


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("T,D", [(13, 16), (20, 12)])  # T ragged / > one tile; D not a power of 2
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_attention(counts, G, T, D, dtype):
    q, k, v, c = _setup(counts, G, T, D, dtype)
    o = ops.masked_attention(*on_device(q, k, v, c), backend="triton").cpu()
    expected = reference.masked_attention(q.float(), k.float(), v.float(), c).to(dtype)
    assert o.dtype == dtype and o.shape == q.shape
    assert_close(o, expected, dtype)
    for i, n in enumerate(counts):
        assert torch.all(o[i, :, :, n * G:] == 0)


def test_masked_attention_scale():
    q, k, v, c = _setup([2, 1], 2, 13, 16, torch.float32)
    o = ops.masked_attention(*on_device(q, k, v, c), 0.37, backend="triton")
    assert_close(o.cpu(), reference.masked_attention(q, k, v, c, 0.37))


def test_opcheck_masked_attention_triton():
    q, k, v, c = _setup([0, HKV, 2], 2, 13, 16, torch.float32)
    q, k, v = (torch.nan_to_num(t) for t in (q, k, v))
    torch.library.opcheck(torch.ops.probprune.masked_attention.default,
                          (*on_device(q, k, v, c), None, "triton"))


# ----------------------------------------------------------------------------------------------
# the query-head form (the one kernel; the KV-group form above runs through it too)

@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("tight", [False, True], ids=["full-cap", "tight-cap"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_attention_heads(kind, tight, dtype):
    G = 3
    case = head_case(query_head_masks(kind, HKV, G), G, 2, 20, 12, dtype, tight)
    o = ops.masked_attention_heads(*case.args(DEVICE), backend="triton").cpu()
    check_head_attention(o, case, G, None, dtype, f"triton {kind} tight={tight}")


def test_masked_attention_heads_scale_and_hand_built():
    case = head_case(query_head_masks("mixed", 2, 2), 2, 1, 13, 16, torch.float32, tight=True)
    o = ops.masked_attention_heads(*case.args(DEVICE), 0.37, backend="triton").cpu()
    check_head_attention(o, case, 2, 0.37, torch.float32, "triton scale=0.37")
    args, expected = routing_case()
    assert_close(ops.masked_attention_heads(*on_device(*args), backend="triton").cpu(), expected)


def test_opcheck_masked_attention_heads_triton():
    case = head_case(query_head_masks("mixed", HKV, 2), 2, 2, 13, 16, torch.float32, tight=True)
    q, k, v, qc, slot = case.args()
    q, k, v = (torch.nan_to_num(t) for t in (q, k, v))
    torch.library.opcheck(torch.ops.probprune.masked_attention_heads.default,
                          (*on_device(q, k, v, qc, slot), None, "triton"))
