"""masked_attention: reference semantics (against a naive causal softmax loop), opcheck."""
import math

import pytest
import torch

from probprune_kernels import ops
from tests.conftest import assert_close


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
