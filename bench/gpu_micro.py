"""Kernel micro-benchmarks on a GPU, at LLaMA-7B layer shapes (bench/gpu_check.sh runs this).

For each op, keep ratio (1.0, 0.5) and number of masks K (1, 4), times the providers side by side:

  cuda      probprune's CUDA kernel (probprune_kernels._cuda), all K masks in one launch
  triton    probprune's Triton kernel, all K masks in one launch
  sliced    torch on the pre-sliced weight, one matmul (or SDPA) per mask: the physical limit
  dense     torch on the full weight for all K masks (what a dense-masked forward pays)

and reports the median time (triton.testing.do_bench, else CUDA events), TFLOP/s of the active
work, and ratios to `sliced` (the design's target: masked GEMM <= 1.15x sliced) and to `dense`.
Each provider's output is also compared with `sliced` (max abs difference) as a sanity check.

usage: python bench/gpu_micro.py --out OUT.json [--md OUT.md] [--budget-s 100] [--dtype bf16]
Without a GPU it writes a record saying so and exits 0 (bench/gpu_check.sh's dry mode).
Exit status 1 when a probprune provider raised (its error is in the JSON).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# LLaMA-7B: hidden 4096, intermediate 11008, 32 heads (no GQA) of 128; one calibration sequence.
LLAMA7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, batch=1,
               seq=2048)
KEEPS = (1.0, 0.5)
KS = (1, 4)


def _bench_fn():
    try:
        from triton.testing import do_bench

        def run(fn):
            return do_bench(fn, warmup=10, rep=40, return_mode="median")
        return run, "triton.testing.do_bench (median)"
    except Exception:  # no triton: CUDA events
        def run(fn):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return sorted(times)[len(times) // 2]
        return run, "torch.cuda.Event (median of 10)"


def _masks(K, n, keep, device):
    c = max(0, min(n, round(keep * n)))
    idx = torch.zeros(K, n, dtype=torch.int32)
    for k in range(K):
        idx[k, :c] = torch.randperm(n)[:c].sort().values.to(torch.int32)
    return idx.to(device), torch.full((K,), c, dtype=torch.int32, device=device), c


def _rows(idx_k, group):
    return (idx_k.long()[:, None] * group + torch.arange(group, device=idx_k.device)).reshape(-1)


@functools.lru_cache(maxsize=None)
def _impl(backend, op):
    from probprune_kernels import backends
    if backend == "cuda":
        from probprune_kernels import _cuda
        if not _cuda.available(op):
            raise RuntimeError(f"cuda {op} unavailable: {_cuda.load_error()}")
    return backends.implementation(backend, op)


def _setups(dtype, dev):
    """(op, K, keep) -> dict(provider -> callable returning the output, flops, compare)."""
    s = LLAMA7B
    M, d, Fi, H, D = s["batch"] * s["seq"], s["hidden"], s["intermediate"], s["heads"], s["head_dim"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    w_q = rnd(H * D, d, scale=d ** -0.5)          # q_proj, a unit = one head (128 rows)
    w_gate, w_up = rnd(Fi, d, scale=d ** -0.5), rnd(Fi, d, scale=d ** -0.5)
    w_down = rnd(d, Fi, scale=Fi ** -0.5)
    for K in KS:
        x = rnd(K, M, d)
        for keep in KEEPS:
            # gather-rows GEMM (q_proj, group = head_dim)
            idx, counts, c = _masks(K, H, keep, dev)
            sl = [w_q[_rows(idx[k, :c], D)].contiguous() for k in range(K)]
            yield ("gather_rows_gemm", K, keep, 2.0 * K * M * d * c * D, {
                "cuda": lambda x=x, idx=idx, counts=counts: _impl("cuda", "gather_rows_gemm")(x, w_q, idx, counts, D, None),
                "triton": lambda x=x, idx=idx, counts=counts: _impl("triton", "gather_rows_gemm")(x, w_q, idx, counts, D, None),
                "sliced": lambda x=x, sl=sl: torch.stack([x[k] @ sl[k].T for k in range(K)]),
                "dense": lambda x=x: (x.reshape(K * M, d) @ w_q.T).view(K, M, -1),
            })
            # fused SwiGLU (gate/up, group 1)
            idx, counts, c = _masks(K, Fi, keep, dev)
            slg = [w_gate[idx[k, :c].long()].contiguous() for k in range(K)]
            slu = [w_up[idx[k, :c].long()].contiguous() for k in range(K)]
            yield ("gather_rows_swiglu", K, keep, 4.0 * K * M * d * c, {
                "cuda": lambda x=x, idx=idx, counts=counts: _impl("cuda", "gather_rows_swiglu")(x, w_gate, w_up, idx, counts),
                "triton": lambda x=x, idx=idx, counts=counts: _impl("triton", "gather_rows_swiglu")(x, w_gate, w_up, idx, counts),
                "sliced": lambda x=x, slg=slg, slu=slu: torch.stack(
                    [F.silu(x[k] @ slg[k].T) * (x[k] @ slu[k].T) for k in range(K)]),
                "dense": lambda x=x: (F.silu(x.reshape(K * M, d) @ w_gate.T)
                                      * (x.reshape(K * M, d) @ w_up.T)).view(K, M, -1),
            })
            # gather-cols GEMM (down_proj, group 1, compact h)
            h = rnd(K, M, Fi)
            sld = [w_down[:, idx[k, :c].long()].contiguous() for k in range(K)]
            yield ("gather_cols_gemm", K, keep, 2.0 * K * M * d * c, {
                "cuda": lambda h=h, idx=idx, counts=counts: _impl("cuda", "gather_cols_gemm")(h, w_down, idx, counts, 1, None),
                "triton": lambda h=h, idx=idx, counts=counts: _impl("triton", "gather_cols_gemm")(h, w_down, idx, counts, 1, None),
                "sliced": lambda h=h, sld=sld, c=c: torch.stack([h[k, :, :c] @ sld[k].T for k in range(K)]),
                "dense": lambda h=h: (h.reshape(K * M, Fi) @ w_down.T).view(K, M, -1),
            })
            # masked attention (causal, active heads)
            B, T = s["batch"], s["seq"]
            ch = max(0, min(H, round(keep * H)))
            q, kk, v = rnd(K, B, T, H, D), rnd(K, B, T, H, D), rnd(K, B, T, H, D)
            hc = torch.full((K,), ch, dtype=torch.int32, device=dev)

            def sdpa(q, kk, v, heads):
                o = F.scaled_dot_product_attention(
                    q[..., :heads, :].flatten(0, 1).transpose(1, 2),
                    kk[..., :heads, :].flatten(0, 1).transpose(1, 2),
                    v[..., :heads, :].flatten(0, 1).transpose(1, 2), is_causal=True)
                return o.transpose(1, 2).unflatten(0, (K, B))

            def sliced_attn(q=q, kk=kk, v=v, ch=ch):
                out = torch.zeros_like(q)
                out[..., :ch, :] = sdpa(q, kk, v, ch)
                return out
            yield ("masked_attention", K, keep, 2.0 * K * B * T * T * D * ch, {  # causal half of 4*T*T*D
                "cuda": lambda q=q, kk=kk, v=v, hc=hc: _impl("cuda", "masked_attention")(q, kk, v, hc, None),
                "triton": lambda q=q, kk=kk, v=v, hc=hc: _impl("triton", "masked_attention")(q, kk, v, hc, None),
                "sliced": sliced_attn,
                "dense": lambda q=q, kk=kk, v=v: sdpa(q, kk, v, H),
            })
        # compaction of K masks over the MLP channels (keep ratio 0.5)
        masks = torch.rand(K, Fi, device=dev) < 0.5
        yield ("compact_masks", K, 0.5, 0.0, {
            "cuda": lambda masks=masks: _impl("cuda", "compact_masks")(masks, None),
            "triton": lambda masks=masks: _impl("triton", "compact_masks")(masks, None),
            "sliced": lambda masks=masks: _impl("reference", "compact_masks")(masks, None),
        })


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--md", default=None, help="markdown table (default: OUT with .md)")
    ap.add_argument("--budget-s", type=float, default=100.0, help="stop starting new measurements "
                    "after this many seconds")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    args = ap.parse_args(argv)
    md_path = args.md or os.path.splitext(args.out)[0] + ".md"
    rec = {"shapes": LLAMA7B, "keeps": KEEPS, "Ks": KS, "dtype": args.dtype, "results": [],
           "errors": [], "skipped": [], "python": platform.python_version(),
           "torch": torch.__version__}
    if not torch.cuda.is_available():
        rec["gpu"] = None
        rec["note"] = "no GPU: nothing measured (dry run)"
        print("gpu_micro: no GPU detected, nothing measured (dry run)")
        _write(rec, args.out, md_path)
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    rec["gpu"] = torch.cuda.get_device_name(dev)
    try:
        import triton
        rec["triton"] = triton.__version__
    except Exception:
        rec["triton"] = None
    from probprune_kernels import _cuda
    rec["cuda_ext"] = _cuda.info()
    bench, rec["timer"] = _bench_fn()
    t0 = time.time()
    for op, K, keep, flops, providers in _setups(dtype, dev):
        ref = None
        try:
            ref = providers["sliced"]()
        except Exception as exc:
            rec["errors"].append({"op": op, "K": K, "keep": keep, "provider": "sliced",
                                  "error": repr(exc)})
        times = {}
        for name, fn in providers.items():
            row = {"op": op, "K": K, "keep": keep, "provider": name}
            if time.time() - t0 > args.budget_s:
                rec["skipped"].append(dict(row, reason=f"time budget {args.budget_s:.0f}s spent"))
                continue
            try:
                out = fn()
                if ref is not None and name in ("cuda", "triton") and op != "compact_masks":
                    # compact outputs have capacity columns; the sliced ones only the live ones
                    live = out[..., : ref.shape[-1]] if out.shape != ref.shape else out
                    row["max_abs_diff_vs_sliced"] = float((live.float() - ref.float()).abs().max())
                elif ref is not None and op == "compact_masks":
                    row["matches_reference"] = all(torch.equal(a, b) for a, b in zip(out, ref))
                ms = bench(fn)
                row["us"] = round(ms * 1e3, 1)
                if flops:
                    row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
                times[name] = ms
                rec["results"].append(row)
            except Exception as exc:
                rec["errors"].append(dict(row, error=f"{type(exc).__name__}: {exc}",
                                          trace=traceback.format_exc(limit=3)))
            torch.cuda.synchronize()
        for row in rec["results"]:
            if row["op"] == op and row["K"] == K and row["keep"] == keep:
                if "sliced" in times and "us" in row:
                    row["ratio_vs_sliced"] = round(row["us"] / (times["sliced"] * 1e3), 3)
                if "dense" in times and "us" in row:
                    row["ratio_vs_dense"] = round(row["us"] / (times["dense"] * 1e3), 3)
        del providers, ref
        torch.cuda.empty_cache()
        print(f"gpu_micro: {op} K={K} keep={keep}: "
              + ", ".join(f"{n} {t * 1e3:.0f}us" for n, t in times.items()), flush=True)
    rec["seconds"] = round(time.time() - t0, 1)
    _write(rec, args.out, md_path)
    failed = [e for e in rec["errors"] if e["provider"] in ("cuda", "triton")]
    return 1 if failed else 0


def _write(rec, out, md_path):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rec, f, indent=2, default=str)
    lines = ["## Kernel micro-benchmarks", ""]
    if rec.get("gpu") is None:
        lines.append(rec.get("note", "no GPU"))
    else:
        s = rec["shapes"]
        lines += [f"GPU {rec['gpu']}, {rec['dtype']}, torch {rec['torch']}, triton {rec.get('triton')}, "
                  f"timer: {rec.get('timer')}. LLaMA-7B layer: d={s['hidden']}, F={s['intermediate']}, "
                  f"{s['heads']} heads x {s['head_dim']}, B x T = {s['batch']} x {s['seq']}.",
                  "", "| op | K | keep | provider | us | TFLOP/s | x sliced | x dense | check |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rec["results"]:
            check = r.get("max_abs_diff_vs_sliced", r.get("matches_reference", ""))
            if isinstance(check, float):
                check = f"{check:.2g}"
            lines.append(f"| {r['op']} | {r['K']} | {r['keep']} | {r['provider']} | {r.get('us', '')} "
                         f"| {r.get('tflops', '')} | {r.get('ratio_vs_sliced', '')} "
                         f"| {r.get('ratio_vs_dense', '')} | {check} |")
        if rec["errors"]:
            lines += ["", "Errors:"] + [f"- {e['op']} K={e['K']} keep={e['keep']} {e['provider']}: "
                                        f"{e['error']}" for e in rec["errors"]]
        if rec["skipped"]:
            lines += ["", f"{len(rec['skipped'])} measurements skipped (time budget)."]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
