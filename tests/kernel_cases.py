"""Inputs and the attention oracle shared by the CUDA kernel tests: test_cuda_emulation.py (the
kernels' block logic on the CPU) and test_cuda_ops.py (the kernels on a GPU)."""
import torch

from probprune_kernels import reference
from tests.conftest import TOLERANCES, assert_close


def counts_for(kind, K, cap):
    """Kept units of K masks: "ragged" (all, none, two thirds), "zero" or "full"."""
    if kind == "ragged":
        return [cap, 0, max(1, (2 * cap) // 3)][:K] if K > 1 else [max(1, (2 * cap) // 3)]
    if kind == "zero":
        return [0] * K
    return [cap] * K


def compact_inputs(K, n, counts, cap=None, device="cpu"):
    """(idx, counts): idx [K, cap] holds ascending random subsets of the n units with the given
    counts, zero padded."""
    cap = n if cap is None else cap
    idx = torch.zeros(K, cap, dtype=torch.int32)
    for k, c in enumerate(counts):
        idx[k, :c] = torch.randperm(n)[:c].sort().values.to(torch.int32)
    return idx.to(device), torch.tensor(counts, dtype=torch.int32, device=device)


def check_attention(got, q, k, v, counts, scale, dtype, msg, fp32_tol=None):
    """fp32: within fp32_tol (default: the dtype's tolerance) of the reference. fp16 / bf16
    (flash-attention's rule): the error against the fp32 oracle is at most twice the error of the
    reference computed in the same dtype, plus the dtype's absolute tolerance."""
    ref32 = reference.masked_attention(q.float(), k.float(), v.float(), counts, scale)
    if dtype == torch.float32:
        assert_close(got, ref32, dtype, msg=msg, **(fp32_tol or {}))
        return
    ref_low = reference.masked_attention(q, k, v, counts, scale)
    err = (got.float() - ref32).abs().max().item()
    ref_err = (ref_low.float() - ref32).abs().max().item()
    assert err <= 2 * ref_err + TOLERANCES[dtype]["atol"], \
        f"{msg}: max error {err:.3g}, same-dtype reference {ref_err:.3g}"
