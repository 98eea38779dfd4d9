"""Micro-benchmark cases: one definition of each (op, shape, K, keep ratio, provider), shared by
``python -m bench`` (side-by-side timing, CPU and GPU) and ``bench/test_bench_ops.py``
(pytest-benchmark). Provider names and their meaning: :mod:`.registry`.

Shapes come from ``registry.MODEL_REGISTRY``: ``q_proj`` rows per KV group for
``gather_rows_gemm``, ``gate/up_proj`` for ``gather_rows_swiglu``, ``down_proj`` columns for
``gather_cols_gemm``, the attention heads for ``masked_attention`` (KV groups) and
``masked_attention_heads`` (single query heads), the vocabulary for
``lm_head_ce``, all units of the model for the mask ops.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import probprune_kernels as pk
from probprune_kernels.reference import TOLERANCES

from .registry import (BASELINES, GEMM_OPS, K_LAUNCHES, KEEP_INDEPENDENT, OPS, OURS, Plan,
                       model_shape, provider_backend)
from .timing import ratio


@dataclass(frozen=True)
class MicroCase:
    op: str
    shape: str
    K: int
    keep: float
    batch: int
    seqlen: int

    @property
    def group(self) -> str:
        """The providers of one group are compared with each other (pytest-benchmark group)."""
        return f"{self.op}-{self.shape}-K{self.K}-keep{self.keep:g}"


def bench_backends(device) -> List[str]:
    """Backends worth timing here: all available ones on a GPU; on the CPU only the reference
    (Triton on CPU tensors runs through its interpreter, orders of magnitude slower)."""
    device = torch.device(device)
    return [b for b in pk.backends() if device.type == "cuda" or b == "reference"]


def providers_for(op: str, device) -> List[str]:
    out = []
    for b in bench_backends(device):
        out += [OURS + b, K_LAUNCHES + b]
    return out + list(BASELINES[op])


def micro_cases(plan: Plan) -> List[MicroCase]:
    B, T = plan.micro_tokens
    out = []
    for shape in plan.micro_shapes:
        for op in OPS:
            for K in plan.Ks:
                for keep in ((1.0,) if op in KEEP_INDEPENDENT else plan.keeps):
                    out.append(MicroCase(op, shape, K, keep, B, T))
    return out


def micro_params(plan: Plan, device) -> List[tuple]:
    """(case, provider) pairs of a plan, in group order."""
    return [(c, p) for c in micro_cases(plan) for p in providers_for(c.op, device)]


# ---------------------------------------------------------------------------------------------
# tensors of a case (deterministic per case, so every provider sees the same data)

def _units(case: MicroCase):
    """(n units, rows/cols per unit, weight shape) of the op's weight."""
    s = model_shape(case.shape)
    d, F_, hkv, hd = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"], s["head_dim"]
    G = s["num_attention_heads"] // hkv
    if case.op == "gather_rows_gemm":
        return hkv, G * hd, (hkv * G * hd, d)
    if case.op == "gather_rows_swiglu":
        return F_, 1, (F_, d)
    if case.op == "gather_cols_gemm":
        return F_, 1, (d, F_)
    if case.op == "masked_attention":
        return hkv, G, None
    if case.op == "masked_attention_heads":
        return hkv * G, 1, None
    if case.op == "lm_head_ce":
        return 1, 1, (s["vocab_size"], d)
    n = s["num_hidden_layers"] * (hkv + F_)
    return n, 1, None


def kept_count(n: int, keep: float) -> int:
    return max(1, min(n, round(keep * n)))


class CaseData:
    """Inputs of one case plus the index lists every provider derives from the same masks."""

    def __init__(self, case: MicroCase, device, dtype: torch.dtype, seed: int = 0):
        self.case, self.device, self.dtype = case, torch.device(device), dtype
        g = torch.Generator().manual_seed(seed)  # masks, labels, uniforms: small, made on the CPU
        # big tensors on the device itself (LLaMA-7B activations take seconds to draw on a CPU)
        gd = g if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(seed)
        s = model_shape(case.shape)
        self.shape = s
        K, M = case.K, case.batch * case.seqlen
        self.M = M
        n, group, wshape = _units(case)
        self.n, self.unit = n, group
        c = kept_count(n, case.keep)
        self.c = c
        # Each mask keeps exactly c units, a different random subset per mask.
        masks = torch.zeros(K, n, dtype=torch.bool)
        for k in range(K):
            masks[k, torch.randperm(n, generator=g)[:c]] = True
        self.masks = masks.to(device)

        def rnd(*shape, scale=1.0):
            x = torch.randn(*shape, generator=gd, device=gd.device) * scale
            return x.to(device=device, dtype=dtype)

        op = case.op
        d = s["hidden_size"]
        if op in GEMM_OPS or op == "lm_head_ce":
            self.w = rnd(*wshape, scale=wshape[1] ** -0.5)
        if op == "gather_rows_swiglu":
            self.w2 = rnd(*wshape, scale=wshape[1] ** -0.5)
        if op in ("gather_rows_gemm", "gather_rows_swiglu", "lm_head_ce"):
            self.x = rnd(K, M, d)
        if op in ("gather_rows_gemm", "gather_rows_swiglu", "gather_cols_gemm"):
            self.idx, self.counts = pk.compact_masks(self.masks, backend="reference")
            rows = [(self.idx[k, :c].long()[:, None] * group
                     + torch.arange(group, device=device)).reshape(-1) for k in range(K)]
            self.rows = rows
            self.col_mask = self.masks.repeat_interleave(group, dim=1).to(dtype)  # [K, n*group]
        if op == "gather_cols_gemm":
            self.h_full = rnd(K, M, n * group) * self.col_mask[:, None, :]
            self.h = torch.zeros_like(self.h_full)  # compact: the active columns first
            for k in range(K):
                self.h[k, :, : c * group] = self.h_full[k][:, self.rows[k]]
            self.residual = rnd(K, M, d)
        if op == "masked_attention":
            hq, hkv, hd = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
            G = hq // hkv
            B, T = case.batch, case.seqlen
            self.q = rnd(K, B, T, hq, hd)
            self.k = rnd(K, B, T, hkv, hd)
            self.v = rnd(K, B, T, hkv, hd)
            self.counts = torch.full((K,), c, dtype=torch.int32, device=device)
            self.head_mask = (torch.arange(hq, device=device) < c * G).to(dtype)  # compact heads
            self.scale = hd ** -0.5
        if op == "masked_attention_heads":  # c random query heads per mask, over their groups
            hq, hkv, hd = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
            lists = pk.head_lists(self.masks, hq // hkv, backend="reference")
            B, T = case.batch, case.seqlen
            self.q = rnd(K, B, T, hq, hd)
            self.k = rnd(K, B, T, hkv, hd)
            self.v = rnd(K, B, T, hkv, hd)
            self.q_counts, self.kv_slot = lists.q_counts, lists.kv_slot
            self.head_mask = (torch.arange(hq, device=device) < c).to(dtype)
            self.scale = hd ** -0.5
        if op == "lm_head_ce":
            self.labels = torch.randint(0, s["vocab_size"], (M,), generator=g).to(device)
        if op in ("compact_masks", "sample_masks", "sample_and_compact"):
            self.probs = torch.full((n,), case.keep, dtype=torch.float32, device=device)
            self.uniforms = torch.rand(K, n, generator=g).to(device)


def case_work(case: MicroCase, dtype: torch.dtype) -> dict:
    """What the case computes and which weight bytes it must read at least (for TFLOP/s, GB/s)."""
    n, g, _ = _units(case)
    c, K, M = kept_count(n, case.keep), case.K, case.batch * case.seqlen
    s = model_shape(case.shape)
    d = s["hidden_size"]
    elt = torch.finfo(dtype).bits // 8
    flops, wbytes = 0, 0
    if case.op == "gather_rows_gemm":
        flops, wbytes = 2 * K * M * d * c * g, K * c * g * d * elt
    elif case.op == "gather_rows_swiglu":
        flops, wbytes = 4 * K * M * d * c, 2 * K * c * d * elt
    elif case.op == "gather_cols_gemm":
        flops, wbytes = 2 * K * M * d * c, K * c * d * elt
    elif case.op in ("masked_attention", "masked_attention_heads"):  # QK^T, PV: causal half
        flops = 2 * K * case.batch * c * g * case.seqlen ** 2 * s["head_dim"]
    elif case.op == "lm_head_ce":
        flops, wbytes = 2 * K * M * d * s["vocab_size"], s["vocab_size"] * d * elt
    return {"active_flops": flops, "active_weight_bytes": wbytes, "kept_units": c, "units": n,
            "actual_keep": c / n, "tokens": M}


# ---------------------------------------------------------------------------------------------
# providers

def _dense_attention(q, k, v, scale):
    """Causal attention over all heads of all K masks: [K, B, T, H, D] in, same out."""
    K, B, T, hq, hd = q.shape
    G = hq // k.shape[3]
    qq = q.reshape(K * B, T, hq, hd).transpose(1, 2)
    kk = k.reshape(K * B, T, -1, hd).transpose(1, 2).repeat_interleave(G, dim=1)
    vv = v.reshape(K * B, T, -1, hd).transpose(1, 2).repeat_interleave(G, dim=1)
    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
    return o.transpose(1, 2).reshape(K, B, T, hq, hd)


def make_provider(case: MicroCase, provider: str, data: CaseData) -> Callable[[], object]:
    """A zero-argument callable running ``provider`` on ``data`` (pre-work done here, untimed)."""
    op, K, c, d = case.op, case.K, data.c, data
    if provider.startswith((OURS, K_LAUNCHES)):
        fn = _op_call(op, d, provider_backend(provider))
        if provider.startswith(OURS):
            return lambda: fn(slice(None))
        slices = [slice(k, k + 1) for k in range(K)]
        return lambda: [fn(sl) for sl in slices]
    if op == "gather_rows_gemm":
        if provider == "torch-dense":
            return lambda: F.linear(d.x, d.w)
        if provider == "torch-masked-dense":
            return lambda: F.linear(d.x, d.w) * d.col_mask[:, None, :]
        if provider == "torch-gather":
            return lambda: [F.linear(d.x[k], d.w.index_select(0, d.rows[k])) for k in range(K)]
        if provider == "torch-sliced":
            ws = [d.w[d.rows[k]].contiguous() for k in range(K)]
            return lambda: [F.linear(d.x[k], ws[k]) for k in range(K)]
    if op == "gather_rows_swiglu":
        if provider == "torch-dense":
            return lambda: F.silu(F.linear(d.x, d.w)) * F.linear(d.x, d.w2)
        if provider == "torch-masked-dense":
            return lambda: F.silu(F.linear(d.x, d.w)) * F.linear(d.x, d.w2) * d.col_mask[:, None, :]
        if provider == "torch-gather":
            return lambda: [F.silu(F.linear(d.x[k], d.w.index_select(0, d.rows[k])))
                            * F.linear(d.x[k], d.w2.index_select(0, d.rows[k])) for k in range(K)]
        if provider == "torch-sliced":
            ws = [(d.w[d.rows[k]].contiguous(), d.w2[d.rows[k]].contiguous()) for k in range(K)]
            return lambda: [F.silu(F.linear(d.x[k], a)) * F.linear(d.x[k], b)
                            for k, (a, b) in enumerate(ws)]
    if op == "gather_cols_gemm":
        if provider == "torch-dense":
            return lambda: d.residual + F.linear(d.h_full, d.w)
        if provider == "torch-masked-dense":
            return lambda: d.residual + F.linear(d.h_full * d.col_mask[:, None, :], d.w)
        width = c * d.unit
        if provider == "torch-gather":
            return lambda: [d.residual[k] + F.linear(d.h[k, :, :width], d.w.index_select(1, d.rows[k]))
                            for k in range(K)]
        if provider == "torch-sliced":
            ws = [d.w[:, d.rows[k]].contiguous() for k in range(K)]
            hs = [d.h[k, :, :width].contiguous() for k in range(K)]
            return lambda: [d.residual[k] + F.linear(hs[k], ws[k]) for k in range(K)]
    if op == "masked_attention":
        if provider == "torch-dense":
            return lambda: _dense_attention(d.q, d.k, d.v, d.scale)
        if provider == "torch-masked-dense":
            return lambda: _dense_attention(d.q, d.k, d.v, d.scale) * d.head_mask[:, None]
        if provider == "torch-sliced":
            G = d.q.shape[3] // d.k.shape[3]
            sl = []
            for k in range(K):
                q = d.q[k, :, :, : c * G].transpose(1, 2).contiguous()
                kk = d.k[k, :, :, :c].transpose(1, 2).repeat_interleave(G, dim=1).contiguous()
                vv = d.v[k, :, :, :c].transpose(1, 2).repeat_interleave(G, dim=1).contiguous()
                sl.append((q, kk, vv))
            return lambda: [F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=d.scale)
                            for q, kk, vv in sl]
    if op == "masked_attention_heads":
        # every query slot's KV head gathered, as a dense model with one KV head per query head
        kv_of = d.kv_slot.long()[:, None, None, :, None].expand(-1, *d.q.shape[1:3], -1,
                                                                  d.q.shape[4])
        k_all, v_all = d.k.gather(3, kv_of), d.v.gather(3, kv_of)
        if provider == "torch-dense":
            return lambda: _dense_attention(d.q, k_all, v_all, d.scale)
        if provider == "torch-masked-dense":
            return lambda: _dense_attention(d.q, k_all, v_all, d.scale) * d.head_mask[:, None]
        if provider == "torch-sliced":
            sl = [tuple(t[k, :, :, :c].transpose(1, 2).contiguous() for t in (d.q, k_all, v_all))
                  for k in range(K)]
            return lambda: [F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=d.scale)
                            for q, kk, vv in sl]
    if op == "lm_head_ce" and provider == "torch-dense":
        labels = d.labels.repeat(K)
        return lambda: F.cross_entropy(F.linear(d.x, d.w).float().flatten(0, 1), labels,
                                       reduction="none").view(K, -1).mean(1)
    raise ValueError(f"no provider {provider!r} for op {op!r}")


def _op_call(op: str, d: CaseData, backend: str) -> Callable[[slice], object]:
    """The op on masks ``sl`` (all K, or one for the K-launches baseline)."""
    if op == "gather_rows_gemm":
        return lambda sl: pk.gather_rows_gemm(d.x[sl], d.w, d.idx[sl], d.counts[sl], d.unit,
                                              backend=backend, validate=False)
    if op == "gather_rows_swiglu":
        return lambda sl: pk.gather_rows_swiglu(d.x[sl], d.w, d.w2, d.idx[sl], d.counts[sl],
                                                backend=backend, validate=False)
    if op == "gather_cols_gemm":
        return lambda sl: pk.gather_cols_gemm(d.h[sl], d.w, d.idx[sl], d.counts[sl], d.unit,
                                              d.residual[sl], backend=backend, validate=False)
    if op == "masked_attention":
        return lambda sl: pk.masked_attention(d.q[sl], d.k[sl], d.v[sl], d.counts[sl], d.scale,
                                              backend=backend, validate=False)
    if op == "masked_attention_heads":
        return lambda sl: pk.masked_attention_heads(d.q[sl], d.k[sl], d.v[sl], d.q_counts[sl],
                                                    d.kv_slot[sl], d.scale, backend=backend,
                                                    validate=False)
    if op == "lm_head_ce":
        return lambda sl: pk.lm_head_ce(d.x[sl], d.w, d.labels, backend=backend, validate=False)
    if op == "compact_masks":
        return lambda sl: pk.compact_masks(d.masks[sl], backend=backend, validate=False)
    if op == "sample_masks":
        return lambda sl: pk.sample_masks(d.probs, d.uniforms[sl], backend=backend,
                                          validate=False)
    if op == "sample_and_compact":
        return lambda sl: pk.sample_and_compact(d.probs, d.uniforms[sl], backend=backend,
                                                validate=False)
    raise ValueError(op)


def setup(case: MicroCase, providers: List[str], device, dtype: torch.dtype,
          seed: int = 0) -> Dict[str, Callable[[], object]]:
    """Callables of several providers of one case over the same data."""
    data = CaseData(case, device, dtype, seed)
    return {p: make_provider(case, p, data) for p in providers}


def extra_info(case: MicroCase, provider: str, device, dtype: torch.dtype) -> dict:
    """What a pytest-benchmark record (or a bench.json row) needs to be read and compared."""
    info = {**asdict(case), "group": case.group, "provider": provider,
            "backend": provider_backend(provider), "device": str(device),
            "dtype": str(dtype).replace("torch.", "")}
    info.update(case_work(case, dtype))
    return info


# ---------------------------------------------------------------------------------------------
# ratios of one group (used by the runner and by bench/conftest.py on the pytest-benchmark json)

def group_ratios(medians: Dict[str, float]) -> Dict[str, Dict[str, float]]:
    """For each ``probprune-<backend>`` provider: its time over each baseline's.

    ``vs_sliced`` (target <= 1.15), ``vs_k_launches`` (< 1: one launch beats K), ``vs_dense``,
    ``vs_masked_dense``, ``vs_gather``; plus ``sliced_vs_dense`` (what slicing saves at best).
    """
    out = {}
    for p, t in medians.items():
        if not p.startswith(OURS):
            continue
        b = provider_backend(p)
        r = {"vs_k_launches": ratio(t, medians.get(K_LAUNCHES + b))}
        for base, key in (("torch-sliced", "vs_sliced"), ("torch-dense", "vs_dense"),
                          ("torch-masked-dense", "vs_masked_dense"), ("torch-gather", "vs_gather")):
            if base in medians:
                r[key] = ratio(t, medians[base])
        if "torch-sliced" in medians and "torch-dense" in medians:
            r["sliced_vs_dense"] = ratio(medians["torch-sliced"], medians["torch-dense"])
        out[b] = r
    return out


# ---------------------------------------------------------------------------------------------
# output check of a backend against the reference backend (the GPU plan's sanity check)

def active_part(op: str, out: torch.Tensor, data: CaseData) -> torch.Tensor:
    """The part of an op's output that carries results: compact outputs are padded to capacity."""
    if op in ("gather_rows_gemm", "gather_rows_swiglu"):
        return out[:, :, : data.c * data.unit]
    if op in ("masked_attention", "masked_attention_heads"):
        return out[:, :, :, : data.c * data.unit]
    return out


def compare_outputs(op: str, out, ref, data: CaseData) -> dict:
    """How far a backend's output is from the reference backend's on the same data: index
    outputs must be equal; values must lie within the reference's tolerance for the inputs'
    dtype (``|out - ref| <= atol + rtol * |ref|`` everywhere, a NaN never does)."""
    if isinstance(ref, tuple):  # (..., idx, counts): idx past each mask's count is padding
        *rest, idx, counts = out
        *rest_ref, idx_ref, counts_ref = ref
        live = torch.arange(idx_ref.shape[-1], device=idx_ref.device) < counts_ref[..., None]
        same = (torch.equal(counts, counts_ref) and torch.equal(idx[live], idx_ref[live])
                and all(torch.equal(a, b) for a, b in zip(rest, rest_ref)))
        return {"matches_reference": same}
    got, want = active_part(op, out, data).float(), active_part(op, ref, data).float()
    diff = (got - want).abs()
    tol = TOLERANCES[data.dtype]
    within = bool((diff <= tol["atol"] + tol["rtol"] * want.abs()).all())
    return {"max_abs_diff_vs_reference": float(diff.max()), "within_tolerance": within}


def output_problem(check: dict, dtype: torch.dtype) -> Optional[str]:
    """Why a :func:`compare_outputs` result fails the check, or None when it passes."""
    if check.get("matches_reference") is False:
        return "output differs from the reference backend's (index lists and counts must be equal)"
    if check.get("within_tolerance") is False:
        tol = TOLERANCES[dtype]
        return (f"output differs from the reference backend's beyond the "
                f"{str(dtype).replace('torch.', '')} tolerance (atol {tol['atol']:g}, rtol "
                f"{tol['rtol']:g}): max |diff| {check['max_abs_diff_vs_reference']:.3g}")
    return None
