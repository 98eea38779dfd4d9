"""Static sm_90 (H100 / H200) resource figures of every kernel, on a machine without a GPU.

CUDA: each csrc/kernels/*.cu is compiled by nvcc for sm_90 with the extension's flags and
``ptxas -v``. Triton: every autotune config of every kernel in probprune_kernels/triton, for each
dtype and variant the engine launches, is compiled for sm_90 (no TRITON_INTERPRET) and its PTX goes
through ``ptxas -v``. Both give, per kernel: registers per thread, spill stores / loads, stack,
shared memory per block (static from ptxas plus the dynamic size the launcher asks for).

tests/test_sm90.py checks the figures; the table in docs/gpu-static-checks.md is written by

    .venv/bin/python -m tests.sm90_static --markdown docs/gpu-static-checks.md
"""
import argparse
import concurrent.futures
import contextlib
import functools
import glob
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# sm_90 limits: 227 KiB of opt-in shared memory per block, 255 registers per thread, and for the
# occupancy estimate the SM's 64 K registers, 228 KiB of shared memory (1 KiB of it reserved per
# block), 2048 threads and 32 blocks.
SMEM_LIMIT = 232448
MAX_REGISTERS = 255
SM_REGISTERS = 65536
SM_SMEM = 233472
SMEM_PER_BLOCK_RESERVED = 1024
SM_THREADS = 2048
SM_BLOCKS = 32

# The kernels of the hot path (every layer of every step): a spill in one of them fails the tests.
# Matched as substrings of the kernel name (the fused SwiGLU is the NB = 2 instance of the CUDA
# gather_rows_kernel and the SWIGLU variant of the Triton gather-rows kernel; "lm_head" takes the
# lm_head + cross-entropy kernels and their merge kernels).
HOT_KERNELS = ("gather_rows", "gather_cols", "swiglu", "attention", "lm_head")

# Dynamic shared memory of the CUDA kernels that use `extern __shared__`: the largest size their
# launcher requests, as a C++ expression over csrc/probprune/*.h (evaluated by a host compile).
# Keys are regular expressions on the short kernel name ("name<template args>").
CUDA_DYNAMIC_SMEM = {
    r"^masked_attention_tc_kernel<.*, 64>$": "probprune::attn::TcAttnConfig<64>::SMEM_BYTES",
    r"^masked_attention_tc_kernel<.*, 128>$": "probprune::attn::TcAttnConfig<128>::SMEM_BYTES",
    r"^masked_attention_fma_kernel<": (
        "probprune::attn::fma_attn_smem_bytes(probprune::attn::FmaAttnConfig::DMAX)"),
}
CUDA_DYNAMIC_HEADERS = ("probprune/attention_logic.h", "probprune/gemm_logic.h")


def is_hot(kernel: str) -> bool:
    return any(h in kernel for h in HOT_KERNELS)


# ---- ptxas -v and PTX parsing ---------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")


def parse_ptxas(log: str) -> dict:
    """{mangled entry name: figures} from a ``ptxas -v`` log."""
    out = {}
    starts = [(m.start(), m.group(1), m.group(2)) for m in _ENTRY.finditer(log)]
    for i, (pos, name, arch) in enumerate(starts):
        chunk = log[pos:starts[i + 1][0] if i + 1 < len(starts) else len(log)]
        props = re.search(r"Function properties for " + re.escape(name)
                          + r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads", chunk)
        regs = re.search(r"Used (\d+) registers", chunk)
        smem = re.search(r"(\d+) bytes smem", chunk)
        if regs is None:
            raise ValueError(f"no register count for {name} in the ptxas log:\n{chunk}")
        out[name] = dict(
            arch=arch,
            registers=int(regs.group(1)),
            stack=int(props.group(1)) if props else 0,
            spill_stores=int(props.group(2)) if props else 0,
            spill_loads=int(props.group(3)) if props else 0,
            smem_static=int(smem.group(1)) if smem else 0,
        )
    return out


def parse_ptx_entries(ptx: str) -> dict:
    """{mangled entry name: dict(maxntid, minblocks, uses_dynamic_smem)} of a PTX module:
    launch bounds (``.maxntid`` / ``.minnctapersm``) and whether the entry reads an
    ``.extern .shared`` array (dynamic shared memory)."""
    externs = re.findall(r"^\s*\.extern\s+\.shared\s+[^;]*?(\w+)\s*\[\s*\]\s*;", ptx, re.M)
    heads = list(re.finditer(r"\.entry\s+(\w+)\s*\(", ptx))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(ptx)
        body = ptx[m.end():end]
        ntid = re.search(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", body)
        minb = re.search(r"\.minnctapersm\s+(\d+)", body)
        threads = None
        if ntid:
            threads = 1
            for g in ntid.groups():
                threads *= int(g) if g else 1
        out[m.group(1)] = dict(
            maxntid=threads, minblocks=int(minb.group(1)) if minb else None,
            uses_dynamic_smem=any(re.search(r"\b" + re.escape(s) + r"\b", body) for s in externs))
    return out


def blocks_per_sm(registers: int, smem: int, threads):
    """Resident blocks per SM on sm_90 from registers (allocated per warp in units of 256),
    shared memory and threads; None when the block size is unknown."""
    if not threads:
        return None
    warps = -(-threads // 32)
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM_REGISTERS // (regs_per_warp * warps) if registers else SM_BLOCKS
    by_smem = SM_SMEM // (smem + SMEM_PER_BLOCK_RESERVED) if smem else SM_BLOCKS
    return min(by_regs, by_smem, SM_THREADS // threads, SM_BLOCKS)


# ---- CUDA: nvcc for sm_90 -------------------------------------------------------------------------

def find_nvcc():
    """The nvcc setup.py builds with: $CUDA_HOME, then PATH, then /usr/local/cuda."""
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "bin", "nvcc"))
    if shutil.which("nvcc"):
        cands.append(shutil.which("nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True,
                         timeout=60)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


_TYPE_NAMES = (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("float", "fp32"))


def _split_top(args: str):
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def short_cuda_name(demangled: str):
    """(kernel, template arguments) of a demangled kernel, without namespaces, the parameter list
    and the defaulted template arguments that only repeat earlier ones."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"^void\s+", "", s)
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    s = re.sub(r"\b\w+::", "", s)
    for long, short in _TYPE_NAMES:
        s = re.sub(r"\b" + long + r"\b", short, s)
    if "<" not in s:
        return s.strip(), ""
    name, args = s.split("<", 1)
    kept = []
    for a in _split_top(args.rsplit(">", 1)[0]):
        earlier = ", ".join(kept)
        tokens = set(re.split(r"[<>,\s]+", earlier))
        if kept and (a in tokens or ("<" in a and a in earlier)):
            continue
        kept.append(a)
    return name.strip(), ", ".join(kept)


def _torch_includes():
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return []
    try:
        return include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        return include_paths(cuda=True)
    except Exception:  # a CPU-only torch cannot name its CUDA include dir
        return include_paths()


def nvcc_flags(nvcc: str):
    """The extension's nvcc flags (setup.py), for sm_90 alone."""
    flags = ["-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90",
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "--expt-relaxed-constexpr", "-I", CSRC]
    for inc in _torch_includes():
        flags += ["-I", inc]
    return flags


def cuda_sources():
    return sorted(glob.glob(os.path.join(CSRC, "kernels", "*.cu")))


def _compile_cu(nvcc, flags, src, workdir):
    stem = os.path.splitext(os.path.basename(src))[0]
    keep = os.path.join(workdir, stem)
    os.makedirs(keep, exist_ok=True)
    cmd = [nvcc, *flags, "-cubin", "-Xptxas", "-v", "--keep", "--keep-dir", keep,
           "-o", os.path.join(keep, stem + ".cubin"), src]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    ptx = ""
    for p in glob.glob(os.path.join(keep, "*.ptx")):
        with open(p) as f:
            ptx += f.read() + "\n"
    return dict(source=os.path.relpath(src, ROOT), returncode=out.returncode,
                log=out.stdout + out.stderr, ptx=ptx, cmd=" ".join(cmd))


@functools.lru_cache(maxsize=1)
def cuda_dynamic_smem_values(nvcc: str):
    """{expression: bytes} of CUDA_DYNAMIC_SMEM, from a host program built on the logic headers."""
    exprs = list(CUDA_DYNAMIC_SMEM.values())
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "smem.cpp")
        with open(src, "w") as f:
            for h in CUDA_DYNAMIC_HEADERS:
                f.write(f'#include "{h}"\n')
            f.write("#include <cstdio>\nint main() {\n")
            for e in exprs:
                f.write(f'  std::printf("%lld\\n", static_cast<long long>({e}));\n')
            f.write("  return 0;\n}\n")
        exe = os.path.join(tmp, "smem")
        cxx = shutil.which("c++") or shutil.which("g++")
        cmd = ([cxx, "-std=c++17", "-I", CSRC, src, "-o", exe] if cxx
               else [nvcc, "-std=c++17", "-I", CSRC, "-x", "c++", src, "-o", exe])
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        vals = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(exprs, (int(v) for v in vals)))


def cuda_records(jobs: int = 2, nvcc: str = None):
    """Compiles every csrc/kernels/*.cu for sm_90 (at most ``jobs`` nvcc at once) and returns
    (records, failures): one record per kernel instance, failures as {source: log}."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
    flags = nvcc_flags(nvcc)
    dyn_values = cuda_dynamic_smem_values(nvcc)
    with tempfile.TemporaryDirectory() as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(lambda s: _compile_cu(nvcc, flags, s, tmp), cuda_sources()))
    records, failures = [], {}
    for res in results:
        if res["returncode"] != 0:
            failures[res["source"]] = res["cmd"] + "\n" + res["log"][-6000:]
            continue
        figures = parse_ptxas(res["log"])
        entries = parse_ptx_entries(res["ptx"])
        names = _demangle(sorted(figures))
        for mangled, fig in figures.items():
            kernel, variant = short_cuda_name(names[mangled])
            ent = entries.get(mangled, {})
            dynamic = 0
            if ent.get("uses_dynamic_smem"):
                full = f"{kernel}<{variant}>" if variant else kernel
                expr = next((e for pat, e in CUDA_DYNAMIC_SMEM.items() if re.search(pat, full)),
                            None)
                dynamic = None if expr is None else dyn_values[expr]
            threads = ent.get("maxntid")
            rec = dict(backend="cuda", source=res["source"], kernel=kernel, variant=variant,
                       mangled=mangled, threads=threads, min_blocks=ent.get("minblocks"),
                       smem_dynamic=dynamic, **fig)
            _finish(rec)
            records.append(rec)
    records.sort(key=lambda r: (r["source"], r["kernel"], r["variant"]))
    return records, failures


def _finish(rec):
    dyn = rec["smem_dynamic"]
    rec["smem"] = None if dyn is None else rec["smem_static"] + dyn
    rec["hot"] = is_hot(rec["kernel"])
    rec["blocks_per_sm"] = (None if rec["smem"] is None
                            else blocks_per_sm(rec["registers"], rec["smem"], rec["threads"]))


# ---- Triton: every autotune config for sm_90 ------------------------------------------------------

DTYPES = ("bf16", "fp16", "fp32")


def triton_cases(torch, dtypes=DTYPES):
    """(label, op of probprune_kernels.triton, positional args) for each dtype and variant the
    engine launches. Sizes are small but keep the model's divisibility (multiples of 16, unit
    strides, group 1 for MLP channels), which is what Triton specialises on."""
    K, M, DIN, DOUT = 2, 64, 256, 512
    i32 = torch.int32

    def idx_counts(n_cap):
        return torch.zeros(K, n_cap, dtype=i32), torch.full((K,), n_cap, dtype=i32)

    cases = []
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dn in dtypes:
        dt = named[dn]
        x = torch.empty(K, M, DIN, dtype=dt)
        w = torch.empty(DOUT, DIN, dtype=dt)
        head = 64
        idx, cnt = idx_counts(DOUT // head)
        cases.append((f"{dn} heads", "gather_rows_gemm", (x, w, idx, cnt, head, None)))
        cases.append((f"{dn} heads+bias", "gather_rows_gemm",
                      (x, w, idx, cnt, head, torch.empty(DOUT, dtype=dt))))
        idx1, cnt1 = idx_counts(DOUT)
        cases.append((f"{dn} swiglu", "gather_rows_swiglu", (x, w, torch.empty_like(w), idx1, cnt1)))
        h_heads = torch.empty(K, M, DOUT, dtype=dt)
        w_o = torch.empty(DIN, DOUT, dtype=dt)
        cases.append((f"{dn} heads", "gather_cols_gemm", (h_heads, w_o, idx, cnt, head, None)))
        # down_proj is stored column-major on the kernel backends (layers.column_major)
        w_down = torch.empty(DOUT, DIN, dtype=dt).t()
        cases.append((f"{dn} channels+residual", "gather_cols_gemm",
                      (h_heads, w_down, idx1, cnt1, 1, torch.empty(K, M, DIN, dtype=dt))))
        for d in (64, 128):
            q = torch.empty(K, 1, M, 4, d, dtype=dt)
            kv = torch.empty(K, 1, M, 2, d, dtype=dt)
            cases.append((f"{dn} D={d}", "masked_attention_heads",
                          (q, kv, kv, torch.full((K,), 4, dtype=i32), torch.zeros(K, 4, dtype=i32))))
        cases.append((f"{dn}", "lm_head_ce", (torch.empty(K, M, DIN, dtype=dt),
                                              torch.empty(1024, DIN, dtype=dt),
                                              torch.zeros(M, dtype=torch.int64))))
    probs = torch.empty(DOUT, dtype=torch.float32)
    u = torch.empty(K, DOUT, dtype=torch.float32)
    cases.append(("sample", "sample_masks", (probs, u)))
    cases.append(("compact", "compact_masks", (torch.zeros(K, DOUT, dtype=torch.bool), DOUT // 2)))
    cases.append(("sample+compact", "sample_and_compact", (probs, u, DOUT // 2)))
    return cases


class _Sm90Driver:
    """Stands in for the CUDA driver: Triton asks it for the target only (nothing is launched)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def triton_jobs(dtypes=DTYPES):
    """Runs every case's launcher with the kernels replaced by recorders. Returns {kernel name:
    (JITFunction, autotune configs or [None] for a kernel launched without autotuning)} and
    (case label, kernel name, args, kwargs) for each distinct recorded launch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the autotune configs would be the interpreter's")
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import probprune_kernels.triton as pkt
    pkt.load()
    modules = [importlib.import_module(f"{pkt.__name__}.{m.name}")
               for m in pkgutil.iter_modules(pkt.__path__)]
    kernels, originals, calls = {}, {}, []

    class Recorder:
        label = None

        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append((Recorder.label, self.name, args, kwargs))
            return launch

    # Helpers (@triton.jit functions called from kernels) are patched too: nothing compiles while
    # recording, and only what a launcher launched is compiled afterwards.
    for mod in modules:
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, (Autotuner, JITFunction)):
                name = f"{mod.__name__.rsplit('.', 1)[-1]}.{attr}"
                originals[(mod, attr)] = obj
                kernels[name] = ((obj.fn, list(obj.configs)) if isinstance(obj, Autotuner)
                                 else (obj, [None]))
                setattr(mod, attr, Recorder(name))
    # by module: the package attribute `lm_head_ce` is the submodule once it is imported
    ops = {n: getattr(m, n) for m in modules for n in pkt.__all__ if callable(getattr(m, n, None))}
    try:
        for label, op, args in triton_cases(torch, dtypes):
            Recorder.label = label
            ops[op](*args)
    finally:
        for (mod, attr), obj in originals.items():
            setattr(mod, attr, obj)
    seen, unique = set(), []
    for label, name, args, kwargs in calls:  # ops sharing a kernel (sample_and_compact) repeat
        key = (name, label, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in seen:
            seen.add(key)
            unique.append((label, name, args, kwargs))
    launched = {c[1] for c in unique}
    autotuned = {n for (m, a), o in originals.items() if isinstance(o, Autotuner)
                 for n in [f"{m.__name__.rsplit('.', 1)[-1]}.{a}"]}
    return {n: k for n, k in kernels.items() if n in launched or n in autotuned}, unique


def triton_ptxas():
    """The ptxas Triton builds its cubins with."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:
        nvcc = find_nvcc()
        return os.path.join(os.path.dirname(nvcc), "ptxas") if nvcc else "ptxas"


def _compile_triton(fn, args, meta, ptxas, tmp):
    """(compiled kernel, its ptxas -v figures). The log of Triton's own ptxas run is taken when
    it compiles (TRITON_DUMP_PTXAS_LOG, set by the worker); a kernel from Triton's cache gets
    ptxas again on its PTX, with Triton's flags."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compiled = fn.warmup(*args, grid=(1,), **meta)
    figs = parse_ptxas(buf.getvalue())
    name = compiled.metadata.name
    if name not in figs:
        ptx = compiled.asm["ptx"]
        path = os.path.join(tmp, name + ".ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M).group(1)
        out = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path,
                              "-o", path + ".o"], capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"ptxas failed:\n{out.stderr[-4000:]}")
        figs = parse_ptxas(out.stdout + out.stderr)
    return compiled, figs[name]


def triton_records(shard: int = 0, shards: int = 1, dtypes=DTYPES):
    """Compiles this shard's (kernel, case, config) jobs for sm_90; returns (records, meta) with
    meta = dict(configs={kernel: number of configs}, cases={kernel: [case labels]}, jobs=total)."""
    import triton
    from triton.backends.compiler import GPUTarget

    triton.runtime.driver.set_active(_Sm90Driver(GPUTarget("cuda", 90, 32)))
    kernels, calls = triton_jobs(dtypes)
    jobs = [(label, name, args, kwargs, ci, cfg) for label, name, args, kwargs in calls
            for ci, cfg in enumerate(kernels[name][1])]
    ptxas = triton_ptxas()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for j, (label, name, args, kwargs, ci, cfg) in enumerate(jobs):
            if j % shards != shard:
                continue
            meta = dict(kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
            rec = dict(backend="triton", source=f"probprune_kernels/triton/{name.split('.')[0]}.py",
                       kernel=name.split(".", 1)[1], case=label, config=ci, min_blocks=None,
                       variant=f"{label}, config {ci}", threads=None)
            try:
                compiled, fig = _compile_triton(kernels[name][0], args, meta, ptxas, tmp)
                md = compiled.metadata
                tile = [f"{k}={v}" for k, v in (cfg.kwargs if cfg else {}).items()]
                tile += [f"w{md.num_warps}", f"s{md.num_stages}"]
                rec.update(fig, variant=f"{label}, {' '.join(tile)}", threads=md.num_warps * 32,
                           smem_dynamic=int(md.shared), error=None)
                _finish(rec)
            except Exception as e:  # reported by the tests, per job
                rec.update(error=f"{type(e).__name__}: {e}"[-4000:], registers=None,
                           spill_stores=None, spill_loads=None, stack=None, smem=None,
                           smem_static=None, smem_dynamic=None, hot=is_hot(rec["kernel"]),
                           blocks_per_sm=None)
            records.append(rec)
    meta = dict(configs={n: len(k[1]) for n, k in kernels.items()},
                cases={n: sorted({c[0] for c in calls if c[1] == n}) for n in kernels},
                jobs=len(jobs))
    return records, meta


def triton_records_in_subprocesses(shards: int = 2, dtypes=DTYPES, timeout: int = 1800):
    """triton_records in ``shards`` fresh interpreters at once, none with TRITON_INTERPRET (the
    test session sets it, and Triton reads it at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(shards):
            out = os.path.join(tmp, f"shard{i}.json")
            procs.append((out, subprocess.Popen(
                [sys.executable, "-m", "tests.sm90_static", "--triton-shard", f"{i}/{shards}",
                 "--dtypes", ",".join(dtypes), "--json", out], cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        records, meta, errors = [], None, []
        for out, p in procs:
            log, _ = p.communicate(timeout=timeout)
            if p.returncode != 0 or not os.path.exists(out):
                errors.append(log[-6000:])
                continue
            with open(out) as f:
                data = json.load(f)
            records += data["records"]
            meta = data["meta"]
    if errors:
        raise RuntimeError("Triton sm_90 compile worker failed:\n" + "\n".join(errors))
    records.sort(key=lambda r: (r["source"], r["kernel"], r["case"], r["config"]))
    return records, meta


# ---- the table ------------------------------------------------------------------------------------

def _fmt(v):
    return "?" if v is None else str(v)


def spills(r):
    return bool(r.get("spill_stores") or r.get("spill_loads"))


def over_limit(r):
    return r.get("smem") is not None and r["smem"] > SMEM_LIMIT


def summary(cuda, triton):
    """What the tests fail on, in words: hot CUDA instances that spill, hot Triton configs that
    spill (counted per kernel and case), and shared memory beyond the limit."""
    out = ["## Summary", ""]
    bad = [r for r in cuda if r["hot"] and spills(r)]
    out.append(f"- CUDA, hot instances that spill: {len(bad)} of {sum(r['hot'] for r in cuda)}"
               + "".join(f"\n  - {r['kernel']} <{r['variant']}>: {r['spill_stores']}/"
                         f"{r['spill_loads']} bytes" for r in bad))
    over = [r for r in cuda if over_limit(r) or r.get("smem") is None]
    out.append(f"- CUDA, shared memory beyond the limit or unknown: {len(over)}"
               + "".join(f"\n  - {r['kernel']} <{r['variant']}>: {_fmt(r['smem'])}"
                         for r in over))
    groups = {}
    for r in triton:
        if r["hot"] and not r.get("error"):
            groups.setdefault((r["kernel"], r["case"]), []).append(r)
    bad = {k: v for k, v in groups.items() if any(spills(r) for r in v)}
    n_bad = sum(spills(r) for v in groups.values() for r in v)
    out.append(f"- Triton, hot configs that spill: {n_bad} of "
               f"{sum(len(v) for v in groups.values())}"
               + "".join(f"\n  - {k} [{c}]: {sum(spills(r) for r in v)} of {len(v)} configs"
                         + ("" if any(not spills(r) for r in v) else ", none without")
                         for (k, c), v in sorted(bad.items())))
    over = [r for r in triton if over_limit(r)]
    out.append(f"- Triton, configs beyond the shared memory limit (the autotuner skips them): "
               f"{len(over)}" + "".join(f"\n  - {r['kernel']} [{r['variant']}]: {r['smem']}"
                                        for r in over))
    errors = [r for r in triton if r.get("error")]
    if errors:
        out.append(f"- Triton, configs that do not compile: {len(errors)}")
    return out


def markdown(cuda, triton, command):
    lines = [
        "# Static sm_90 checks (H100 / H200)",
        "",
        "Generated by",
        "",
        "    " + command,
        "",
        "Every CUDA kernel instance (csrc/kernels/*.cu, nvcc for sm_90 with the extension's flags)",
        "and every autotune config of every Triton kernel (probprune_kernels/triton, each dtype",
        "and variant the engine launches, compiled for sm_90 and its PTX through ptxas) with",
        "`ptxas -v`, on a machine without a GPU. `tests/test_sm90.py` (marker `sm90`) fails on any",
        "spill in a hot-path kernel (" + ", ".join(HOT_KERNELS) + ") and on shared memory beyond",
        f"{SMEM_LIMIT} bytes (227 KiB) per block; it compiles the Triton kernels for bf16 and fp16",
        "(PROBPRUNE_SM90_DTYPES), the fp32 rows (`ieee` dots: FMA, no tensor cores) are here only.",
        "",
        "Columns: registers per thread; spill stores / loads in bytes; stack frame in bytes; shared",
        "memory per block in bytes (static + the dynamic size the launcher requests); threads per",
        "block (CUDA: `__launch_bounds__`, with the minimum blocks per SM after the x); blocks/SM,",
        "the resident blocks per SM these allow (registers, shared memory, threads).",
        "",
    ]
    lines += summary(cuda, triton) + [""]
    for title, rows, bounds in (("CUDA kernels", cuda, True), ("Triton kernels", triton, False)):
        lines += [f"## {title}", "",
                  "| kernel | instance / config | hot | regs | spill st/ld | stack | smem | "
                  "threads | blocks/SM |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['kernel']} | {r['variant']} | | compile error | | | | | |")
                continue
            thr = _fmt(r["threads"])
            if bounds and r.get("min_blocks"):
                thr += f" x{r['min_blocks']}"
            lines.append(
                f"| {r['kernel']} | {r['variant']} | {'yes' if r['hot'] else ''} | "
                f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} | "
                f"{_fmt(r['smem'])} | {thr} | {_fmt(r['blocks_per_sm'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table to this file (else print it)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="Triton dtypes (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc / Triton workers")
    ap.add_argument("--triton-shard", help=argparse.SUPPRESS)  # worker: shard i/n of the jobs
    ap.add_argument("--json", help=argparse.SUPPRESS)  # worker: where its records go
    a = ap.parse_args(argv)
    dtypes = tuple(d for d in a.dtypes.split(",") if d)
    if a.triton_shard:
        i, n = (int(v) for v in a.triton_shard.split("/"))
        records, meta = triton_records(i, n, dtypes)
        with open(a.json, "w") as f:
            json.dump(dict(records=records, meta=meta), f)
        return 0
    cuda, failures = cuda_records(a.jobs)
    for src, log in failures.items():
        print(f"nvcc failed on {src}:\n{log}", file=sys.stderr)
    triton, _ = triton_records_in_subprocesses(a.jobs, dtypes)
    cmd = ".venv/bin/python -m tests.sm90_static --markdown docs/gpu-static-checks.md"
    if dtypes != DTYPES:
        cmd += " --dtypes " + ",".join(dtypes)
    text = markdown(cuda, triton, cmd)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    print(text)
    return 1 if failures or any(r.get("error") for r in triton) else 0


if __name__ == "__main__":
    sys.exit(main())
