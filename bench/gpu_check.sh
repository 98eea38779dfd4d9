#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: the CUDA backend's check on a GPU machine, in one command.
#
# Steps (each capped with `timeout`, all under one overall deadline, one log each in OUTDIR):
#   build        pip install -e . --no-build-isolation --no-deps (compiles probprune_kernels._C)
#   import       imports probprune_kernels._C and records probprune_kernels._cuda.info()
#   gpu_tests    pytest -m gpu $GPU_CHECK_TESTS (-n auto with pytest-xdist), junit in gpu_tests.xml
#   micro_bench  python -m bench --plan gpu-check: the kernel micro-benchmarks of the registry at
#                LLaMA-7B layer shapes, every backend through the public ops, timed with
#                triton.testing.do_bench (results in OUTDIR/micro_bench/bench.json and bench.md)
# then writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md. A failing step is recorded and the
# script goes on; it exits 1 if any step failed (or timed out), else 0.
#
# Without a GPU it says so and does a dry run of its plumbing: no build (unless GPU_CHECK_BUILD=1),
# the GPU tests are collected and skip, the benchmark lists the cases it would time; exit 0.
#
# No network is needed; the environment must already hold torch, triton, pytest and ninja. Python:
# the checkout's .venv/bin/python when present, else python3 (python) on the PATH.
#
# Environment:
#   GPU_CHECK_TESTS           pytest paths (default: tests)
#   GPU_CHECK_BUILD=0|1       build the extension (default: 1 with a GPU, 0 without)
#   GPU_CHECK_BENCH_BUDGET_S  the micro-benchmarks' time budget in seconds (default 100)
#   GPU_CHECK_DEADLINE_S      overall deadline in seconds (default 285: done within 5 minutes)
#   CUDA_HOME                 the toolkit (default /usr/local/cuda when present)
set -u -o pipefail

if [ $# -lt 1 ] || [ -z "${1:-}" ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2

DEADLINE=${GPU_CHECK_DEADLINE_S:-285}
TESTS=${GPU_CHECK_TESTS:-tests}
BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET_S:-100}
RESERVE=10        # seconds kept for writing the report
MIN_STEP=5        # a step is not started with less time than this left
BUILD_CAP=170     # per-step caps (seconds), further limited by the deadline
IMPORT_CAP=60
TESTS_CAP=150
BENCH_SLACK=40    # the benchmark's start-up and last measurement beyond its budget
SECONDS=0

if [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1; then
    PY=python3
else
    PY=python
fi
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    export PATH="$CUDA_HOME/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# what this script writes; earlier results in OUTDIR must not be read as this run's
rm -f "$OUT"/{env.json,env.log,steps.tsv,build.log,import.log,gpu_tests.log,gpu_tests.xml} \
      "$OUT"/{micro_bench.log,gpu_check.json,gpu_check.md}
rm -rf "$OUT/micro_bench"
: >"$OUT/steps.tsv"

say() { echo "gpu_check: $*"; }

# ---------------------------------------------------------------------------------------------
# machine and environment -> OUTDIR/env.json (stderr in env.log)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)
COMMIT="$COMMIT" timeout -k 5 60 "$PY" - "$OUT/env.json" >>"$OUT/env.log" 2>&1 <<'PYEOF'
import json, os, platform, shutil, subprocess, sys

env = {"python": platform.python_version(), "torch": None, "torch_cuda": None, "gpu": False,
       "triton": None, "nvcc": None, "commit": os.environ.get("COMMIT") or None}
try:
    import torch
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["gpu"] = bool(torch.cuda.is_available())
    if env["gpu"]:
        p = torch.cuda.get_device_properties(0)
        env["gpu_name"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["sm"] = f"{p.major}.{p.minor}"
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
except Exception as exc:
    print(f"torch: {type(exc).__name__}: {exc}", file=sys.stderr)
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:
    print(f"triton: {type(exc).__name__}: {exc}", file=sys.stderr)
cuda_home = os.environ.get("CUDA_HOME")
nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
nvcc = nvcc if nvcc and os.path.exists(nvcc) else shutil.which("nvcc")
if nvcc:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
        lines = out.stdout.strip().splitlines()
        env["nvcc"] = lines[-1] if lines else None
    except Exception as exc:
        print(f"nvcc: {type(exc).__name__}: {exc}", file=sys.stderr)
if env["gpu"] and shutil.which("nvidia-smi"):
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except Exception as exc:
        print(f"nvidia-smi: {type(exc).__name__}: {exc}", file=sys.stderr)
with open(sys.argv[1], "w") as f:
    json.dump(env, f)
PYEOF
[ -s "$OUT/env.json" ] || say "could not probe the environment with $PY (see $OUT/env.log)"

TORCH_GPU=0
grep -q '"gpu": true' "$OUT/env.json" 2>/dev/null && TORCH_GPU=1
SMI_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && timeout -k 5 20 nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    SMI_GPU=1
fi
if [ "$TORCH_GPU" = 1 ] || [ "$SMI_GPU" = 1 ]; then
    GPU=1; DRY=0
else
    GPU=0; DRY=1
fi
BUILD=${GPU_CHECK_BUILD:-$GPU}

if [ "$DRY" = 1 ]; then
    say "no GPU detected (torch.cuda.is_available() is False, nvidia-smi lists none): dry run of" \
        "the plumbing; the build is skipped unless GPU_CHECK_BUILD=1, the GPU tests skip and" \
        "nothing is measured"
elif [ "$TORCH_GPU" = 0 ]; then
    say "WARNING: nvidia-smi lists a GPU but torch does not see it (CPU-only torch? driver?)"
else
    say "GPU: $("$PY" -c 'import json,sys; e=json.load(open(sys.argv[1])); print(e.get("gpu_name"), "sm", e.get("sm"))' "$OUT/env.json" 2>/dev/null)"
fi
say "python $PY, outputs in $OUT, deadline ${DEADLINE}s"

# ---------------------------------------------------------------------------------------------
# steps: record NAME STATUS RC SECONDS LOG -> steps.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$OUT/steps.tsv"; }

skip_step() {  # NAME REASON
    record "$1" skipped "" 0 "$2"
    say "[$1] skipped: $2"
}

LAST_STATUS=""
run_step() {  # NAME CAP_SECONDS CMD...   (cwd: the checkout; stdout+stderr -> OUTDIR/NAME.log)
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS - RESERVE))
    if [ "$left" -lt "$MIN_STEP" ] || [ "$cap" -lt 1 ]; then
        record "$name" timeout "" 0 "not started: the $DEADLINE s deadline is reached"
        say "[$name] not started: the ${DEADLINE}s deadline is reached"
        LAST_STATUS=timeout
        return
    fi
    local t=$((cap < left ? cap : left))
    local log="$name.log"
    local shown="$*"
    shown=${shown//$'\n'/ }
    [ "${#shown}" -gt 200 ] && shown="${shown:0:200}..."
    say "[$name] (at most ${t}s) $shown"
    local t0 t1 rc status
    t0=$(date +%s.%N)
    timeout -k 5 "$t" "$@" >"$OUT/$log" 2>&1 </dev/null
    rc=$?
    t1=$(date +%s.%N)
    local dt
    dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    if [ "$rc" = 0 ]; then
        status=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout
        echo "gpu_check: killed after ${t}s (timeout)" >>"$OUT/$log"
    else
        status=failed
    fi
    record "$name" "$status" "$rc" "$dt" "$log"
    say "[$name] $status (exit $rc, ${dt%.*}s, log $OUT/$log)"
    if [ "$status" != ok ]; then
        tail -n 15 "$OUT/$log" | sed 's/^/    /'
    fi
    LAST_STATUS=$status
}

# build
BUILT=0
if [ "$BUILD" = 1 ]; then
    run_step build "$BUILD_CAP" "$PY" -m pip install -v -e . --no-build-isolation --no-deps
    BUILT=1
elif [ "$DRY" = 1 ]; then
    skip_step build "no GPU (dry run); GPU_CHECK_BUILD=1 builds anyway"
else
    skip_step build "GPU_CHECK_BUILD=0: using the extension as already built"
fi

# import: the extension loads and holds every op (with a GPU: every op is available)
if [ "$BUILT" = 1 ] || [ "$DRY" = 0 ]; then
    run_step import "$IMPORT_CAP" "$PY" -c '
import json, sys
import torch
from probprune_kernels import _cuda
info = _cuda.info()
print(json.dumps(info))
if not info["built"]:
    sys.exit("probprune_kernels._C is not usable: %s" % info["error"])
import probprune_kernels._C  # raises if broken
missing = sorted(set(_cuda.KERNEL_OPS) - set(info["ops"]))
if missing:
    sys.exit("probprune_kernels._C lacks %s" % missing)
if torch.cuda.is_available() and not all(info["available"].values()):
    sys.exit("a GPU is present but some ops are unavailable: %s" % info["available"])
'
else
    skip_step import "no build"
fi

# GPU tests (junit XML in OUTDIR/gpu_tests.xml)
XDIST=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n auto)
fi
left=$((DEADLINE - SECONDS - RESERVE - BENCH_SLACK - 5))   # leave the benchmarks a share
cap=$((TESTS_CAP < left ? TESTS_CAP : left))
[ "$cap" -lt "$MIN_STEP" ] && cap=$MIN_STEP
# shellcheck disable=SC2086  # GPU_CHECK_TESTS holds several paths
run_step gpu_tests "$cap" "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider "${XDIST[@]}" \
    --junitxml="$OUT/gpu_tests.xml" $TESTS

# micro-benchmarks (OUTDIR/micro_bench/bench.json and bench.md); without a GPU a dry run that
# lists the cases a GPU run would time
left=$((DEADLINE - SECONDS - RESERVE))
budget=$(awk -v b="$BENCH_BUDGET" -v l="$((left - BENCH_SLACK))" \
    'BEGIN { x = (b < l) ? b : l; if (x < 1) x = 1; printf "%d", x }')
BENCH_DRY=()
[ "$TORCH_GPU" = 1 ] || BENCH_DRY=(--dry-run)
run_step micro_bench "$((budget + BENCH_SLACK))" "$PY" -m bench --plan gpu-check --device cuda \
    --out "$OUT/micro_bench" --budget-s "$budget" --no-plots "${BENCH_DRY[@]}"

# ---------------------------------------------------------------------------------------------
# report: OUTDIR/gpu_check.json and OUTDIR/gpu_check.md; exit 1 when anything failed
RPY=$PY
"$RPY" -c pass >/dev/null 2>&1 || RPY=python3
GC_GPU=$GPU GC_DRY=$DRY GC_TORCH_GPU=$TORCH_GPU GC_BUILT=$BUILT GC_SECONDS=$SECONDS \
    timeout -k 5 60 "$RPY" - "$OUT" <<'PYEOF'
import json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
gpu = os.environ["GC_GPU"] == "1"
dry = os.environ["GC_DRY"] == "1"
torch_gpu = os.environ["GC_TORCH_GPU"] == "1"
built = os.environ["GC_BUILT"] == "1"


def path(name):
    return os.path.join(out, name)


def load_json(name):
    try:
        with open(path(name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


env = load_json("env.json") or {}

steps = []
with open(path("steps.tsv")) as f:
    for line in f:
        if not line.strip():
            continue
        name, status, rc, secs, log = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
        steps.append({"name": name, "status": status, "rc": int(rc) if rc else None,
                      "seconds": round(float(secs or 0), 1), "log": log})
by_name = {s["name"]: s for s in steps}

tests = None
ran_tests = by_name.get("gpu_tests", {}).get("status") in ("ok", "failed", "timeout")
if ran_tests and os.path.exists(path("gpu_tests.xml")):
    try:
        root = ET.parse(path("gpu_tests.xml")).getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for s in suites:
            for k in n:
                n[k] += int(s.get(k, 0))
        failed_cases = []
        for case in root.iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").strip().splitlines()
                failed_cases.append(f"{case.get('classname')}::{case.get('name')}"
                                    + (f": {msg[0][:200]}" if msg else ""))
        tests = dict(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                     failed_cases=failed_cases)
    except Exception as exc:  # a junit file cut short by a timeout
        tests = {"error": f"cannot read gpu_tests.xml: {type(exc).__name__}: {exc}"}

bench = load_json("micro_bench/bench.json") if "micro_bench" in by_name and \
    by_name["micro_bench"]["status"] != "skipped" else None

# with a GPU, a green step that checked nothing is a failure
if not dry:
    s = by_name.get("gpu_tests")
    if s and s["status"] == "ok" and tests and tests.get("passed", 0) == 0:
        s["status"] = "failed"
        s["log"] += " (a GPU is present but no GPU test passed)"
    s = by_name.get("micro_bench")
    if s and s["status"] == "ok" and not (bench or {}).get("micro"):
        s["status"] = "failed"
        s["log"] += " (a GPU is present but nothing was measured)"

failed = [s["name"] for s in steps if s["status"] in ("failed", "timeout")]
ok = not failed
seconds = int(os.environ["GC_SECONDS"])
rec = {"gpu": gpu, "dry_run": dry, "ok": ok, "failed_steps": failed, "seconds": seconds,
       "env": env, "steps": steps, "tests": tests, "bench": bench}
with open(path("gpu_check.json"), "w") as f:
    json.dump(rec, f, indent=2, default=str)

md = ["# gpu_check", ""]
if dry:
    what = ("Nothing was measured (GPU_CHECK_BUILD=1: the build step ran)" if built
            else "Nothing was measured or built")
    md += ["**DRY RUN: no GPU detected** (torch.cuda.is_available() is False). "
           f"{what}; the GPU tests were collected and skipped.", ""]
elif not torch_gpu:
    md += ["**WARNING: nvidia-smi lists a GPU but torch does not see it** "
           "(torch.cuda.is_available() is False: a CPU-only torch, or a driver problem).", ""]
if env.get("gpu"):
    device = f"{env.get('gpu_name')} (sm {env.get('sm')}"
    device += f", {env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else ""
    device += f", driver {env['driver']}" if env.get("driver") else ""
    device += ")" + (f" x{env['gpu_count']}" if (env.get("gpu_count") or 1) > 1 else "")
else:
    device = "none (sm -)"
md += [f"- device: {device}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
       f"triton {env.get('triton')}, {env.get('nvcc') or 'no nvcc'}, python {env.get('python')}, "
       f"commit {env.get('commit')}",
       f"- result: {'OK' if ok else 'FAILED: ' + ', '.join(failed)} in {seconds} s", "",
       "| step | status | exit | seconds | log |", "|---|---|---|---|---|"]
for s in steps:
    md.append(f"| {s['name']} | {s['status']} | {'' if s['rc'] is None else s['rc']} "
              f"| {s['seconds']} | {s['log']} |")
if tests is not None:
    md.append("")
    if "error" in tests:
        md.append(f"GPU tests: {tests['error']}")
    else:
        md.append(f"GPU tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} "
                  f"failed, {tests['skipped']} skipped (junit: gpu_tests.xml)")
        if tests["failed_cases"]:
            md += [""] + [f"- {c}" for c in tests["failed_cases"][:40]]
            if len(tests["failed_cases"]) > 40:
                md.append(f"- ... and {len(tests['failed_cases']) - 40} more (gpu_tests.xml)")
if bench is not None:
    try:
        with open(path("micro_bench/bench.md")) as f:  # its headings one level down
            micro = "\n".join("#" + line if line.startswith("#") else line
                              for line in f.read().strip().splitlines())
    except OSError:
        micro = "## Kernel micro-benchmarks\n\n(micro_bench/bench.md is missing; see bench.json)"
    md += ["", micro]
tails = []
for s in steps:
    log = s["log"].split(" ")[0]
    if s["status"] in ("failed", "timeout") and log.endswith(".log") and os.path.exists(path(log)):
        with open(path(log), errors="replace") as f:
            lines = f.read().rstrip().splitlines()[-25:]
        tails += ["", f"### {s['name']} ({s['status']}, exit {s['rc']}): end of {log}", "", "```"]
        tails += lines + ["```"]
if tails:
    md += ["", "## Failed steps"] + tails
with open(path("gpu_check.md"), "w") as f:
    f.write("\n".join(md) + "\n")
if failed:
    print("gpu_check: failed steps: " + ", ".join(failed))
sys.exit(0 if ok else 1)
PYEOF
rc=$?

if [ ! -s "$OUT/gpu_check.json" ]; then
    say "could not write the report (exit $rc)"
    exit 1
fi
if [ "$rc" = 0 ]; then
    if [ "$DRY" = 1 ]; then
        say "no GPU: dry run OK (plumbing only: nothing was measured, no GPU test ran) in ${SECONDS}s;" \
            "report in $OUT/gpu_check.md"
    else
        say "OK in ${SECONDS}s; report in $OUT/gpu_check.md"
    fi
    exit 0
fi
say "FAILED in ${SECONDS}s; report in $OUT/gpu_check.md"
exit 1
