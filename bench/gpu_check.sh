#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: the GPU check in one command, decisive within 5 minutes on one H100.
#
# Steps and their time budgets (seconds). A step is stopped at its budget by SIGINT, so that
# pytest and the benchmarks still write their results (junit, bench.json), then SIGKILL 10 s later
# if it has not ended; its log is OUTDIR/STEP.log.
#   env          20  python, torch, triton, nvcc and the GPU -> env.json
#   build        70  pip install -e . : probprune_kernels._C for this GPU's architecture only, and
#                    only when the extension is missing or older than csrc/ or setup.py
#                    (GPU_CHECK_BUILD=1 always, 0 never)
#   import       10  the extension loads, holds every op, each one available on this GPU
#   plan_13b     15  probprune-fast prune --dry-run of LLaMA-2-13B from its config.json alone (bf16,
#                    the paper's K 2, batch 8, seqlen 128): the memory plan must fit 80 GB
#   gpu_tests   120  pytest -m gpu: every test of every backend that runs on CUDA, and a whole
#                    prune on cuda with each backend whose reloaded export must give the run's
#                    masked perplexity; 180 when no build was needed. Triton keeps one autotune
#                    config per kernel (PROBPRUNE_TRITON_AUTOTUNE=first), tests spread over the
#                    cores with pytest-xdist; junit in gpu_tests.xml
#   micro_bench  45  python -m bench --plan gpu-check: the kernels at LLaMA-7B layer shapes, every
#                    backend through the public ops, no case started after 30 s; an output beyond
#                    the reference's tolerance fails the step (micro_bench/bench.json, bench.md)
#   report       10  OUTDIR/gpu_check.json and gpu_check.md: each step's status, seconds, budget
# 290 s with the build, 280 s without; an overall deadline (GPU_CHECK_DEADLINE_S, 295) cuts any
# step short that would pass it. A failing step is recorded and the script goes on; it exits 1 if
# any step failed or timed out, else 0.
#
# Without a GPU it says so and does a dry run of its plumbing: no build (unless GPU_CHECK_BUILD=1),
# no import check, the 13B plan, the GPU tests collected (not run), the benchmark's cases listed,
# each step allowed 4x its budget (a small shared CPU is slower than the GPU machine); exit 0.
#
# No network is needed; the environment must already hold torch, triton, pytest (pytest-xdist to
# spread the tests) and ninja. Python: the checkout's .venv/bin/python when present, else python3.
#
# Environment:
#   GPU_CHECK_TESTS            pytest paths (default: tests)
#   GPU_CHECK_BUILD=auto|0|1   build the extension (default auto: with a GPU, when it is stale)
#   GPU_CHECK_DEADLINE_S       overall deadline in seconds (default 295)
#   PROBPRUNE_TRITON_AUTOTUNE  first (default here) or full: every config tuned, minutes more
#   TORCH_CUDA_ARCH_LIST       the build's architectures (default: this GPU's)
#   CUDA_HOME                  the toolkit (default /usr/local/cuda when present)
set -u -o pipefail

if [ $# -lt 1 ] || [ -z "${1:-}" ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2

DEADLINE=${GPU_CHECK_DEADLINE_S:-295}
TESTS=${GPU_CHECK_TESTS:-tests}
# budgets (seconds): see the header
ENV_CAP=20
BUILD_CAP=70
IMPORT_CAP=10
PLAN_CAP=15
TESTS_CAP=120
TESTS_CAP_NO_BUILD=180
BENCH_CAP=45
BENCH_START_S=30  # the benchmark starts no case after this; the rest of its budget ends the last
REPORT_CAP=10
GRACE=10          # seconds between a step's SIGINT and its SIGKILL (at most a quarter of it)
SLOWDOWN=1        # the budgets' multiplier: 4 in a dry run
MIN_STEP=5        # a step is not started with less time than this left
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
# Autotuning compiles and times every config of every new shape, one after another: minutes on a
# fresh machine. The check is of correctness; timings with the first config are indicative.
export PROBPRUNE_TRITON_AUTOTUNE=${PROBPRUNE_TRITON_AUTOTUNE:-first}

# what this script writes; earlier results in OUTDIR must not be read as this run's
rm -f "$OUT"/{env.json,env.log,steps.tsv,build.log,import.log,plan_13b.log,gpu_tests.log} \
      "$OUT"/{gpu_tests.xml,micro_bench.log,gpu_check.json,gpu_check.md}
rm -rf "$OUT/micro_bench" "$OUT/plan_13b"
: >"$OUT/steps.tsv"

say() { echo "gpu_check: $*"; }

# ---------------------------------------------------------------------------------------------
# steps: record NAME STATUS RC SECONDS BUDGET LOG -> steps.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$OUT/steps.tsv"; }

skip_step() {  # NAME BUDGET REASON
    record "$1" skipped "" 0 "$(($2 * SLOWDOWN))" "$3"
    say "[$1] skipped: $3"
}

LAST_STATUS=""
run_step() {  # NAME BUDGET CMD...   (cwd: the checkout; stdout+stderr -> OUTDIR/NAME.log)
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS - REPORT_CAP))
    if [ "$left" -lt "$MIN_STEP" ]; then
        record "$name" timeout "" 0 "$cap" "not started: the $DEADLINE s deadline is reached"
        say "[$name] not started: the ${DEADLINE}s deadline is reached"
        LAST_STATUS=timeout
        return
    fi
    cap=$((cap * SLOWDOWN))
    local t=$((cap < left ? cap : left))
    local grace=$((t / 4 < GRACE ? t / 4 : GRACE))
    local soft=$((t - grace))
    local log="$name.log"
    local shown="$*"
    shown=${shown//$'\n'/ }
    [ "${#shown}" -gt 200 ] && shown="${shown:0:200}..."
    say "[$name] (budget ${t}s) $shown"
    local t0 t1 rc status
    t0=$(date +%s.%N)
    # SIGINT first (timeout sends it to the step's whole process group, pytest-xdist's workers
    # included): pytest writes its junit and summary, python -m bench its json; SIGKILL after
    # GRACE. timeout gives the child default signal handling even when this script runs in the
    # background (where bash would start it with SIGINT ignored).
    timeout -s INT -k "$grace" "$soft" "$@" >"$OUT/$log" 2>&1 </dev/null
    rc=$?
    t1=$(date +%s.%N)
    local dt
    dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    if [ "$rc" = 0 ]; then
        status=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout
        echo "gpu_check: interrupted at its ${t}s budget (SIGINT after ${soft}s)" >>"$OUT/$log"
    else
        status=failed
    fi
    record "$name" "$status" "$rc" "$dt" "$t" "$log"
    say "[$name] $status (exit $rc, ${dt%.*}s of ${t}s, log $OUT/$log)"
    if [ "$status" != ok ]; then
        tail -n 15 "$OUT/$log" | sed 's/^/    /'
    fi
    LAST_STATUS=$status
}

# ---------------------------------------------------------------------------------------------
# machine and environment -> OUTDIR/env.json (stderr in env.log)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)
t0=$(date +%s.%N)
COMMIT="$COMMIT" timeout -s INT -k 5 "$ENV_CAP" "$PY" - "$OUT/env.json" >>"$OUT/env.log" 2>&1 \
    <<'PYEOF'
import json, os, platform, shutil, subprocess, sys

env = {"python": platform.python_version(), "torch": None, "torch_cuda": None, "gpu": False,
       "triton": None, "nvcc": None, "commit": os.environ.get("COMMIT") or None,
       "cpus": os.cpu_count()}
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
try:
    import xdist
    env["xdist"] = xdist.__version__
except Exception:
    env["xdist"] = None
cuda_home = os.environ.get("CUDA_HOME")
nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
nvcc = nvcc if nvcc and os.path.exists(nvcc) else shutil.which("nvcc")
if nvcc:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=5)
        lines = out.stdout.strip().splitlines()
        env["nvcc"] = lines[-1] if lines else None
    except Exception as exc:
        print(f"nvcc: {type(exc).__name__}: {exc}", file=sys.stderr)
if env["gpu"] and shutil.which("nvidia-smi"):
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=5)
        env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except Exception as exc:
        print(f"nvidia-smi: {type(exc).__name__}: {exc}", file=sys.stderr)
with open(sys.argv[1], "w") as f:
    json.dump(env, f)
PYEOF
rc=$?
dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
if [ -s "$OUT/env.json" ]; then
    record env ok "$rc" "$dt" "$ENV_CAP" env.log
else
    record env failed "$rc" "$dt" "$ENV_CAP" env.log
    say "could not probe the environment with $PY (see $OUT/env.log)"
fi
envget() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or "")' \
    "$OUT/env.json" "$1" 2>/dev/null; }

TORCH_GPU=0
grep -q '"gpu": true' "$OUT/env.json" 2>/dev/null && TORCH_GPU=1
SMI_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 \
        && timeout -k 2 5 nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    SMI_GPU=1
fi
if [ "$TORCH_GPU" = 1 ] || [ "$SMI_GPU" = 1 ]; then
    GPU=1; DRY=0
else
    GPU=0; DRY=1
    # The budgets are for the GPU machine; a dry run on a small shared CPU may take longer.
    SLOWDOWN=4
fi

if [ "$DRY" = 1 ]; then
    say "no GPU detected (torch.cuda.is_available() is False, nvidia-smi lists none): dry run of" \
        "the plumbing; the build is skipped unless GPU_CHECK_BUILD=1, the GPU tests are only" \
        "collected and nothing is measured"
elif [ "$TORCH_GPU" = 0 ]; then
    say "WARNING: nvidia-smi lists a GPU but torch does not see it (CPU-only torch? driver?)"
else
    say "GPU: $(envget gpu_name) sm $(envget sm)"
fi
say "python $PY, outputs in $OUT, deadline ${DEADLINE}s," \
    "Triton autotune: $PROBPRUNE_TRITON_AUTOTUNE"

# build: only what is stale, only for this GPU
BUILD=${GPU_CHECK_BUILD:-auto}
SO=$(ls "$ROOT"/probprune_kernels/_C*.so 2>/dev/null | head -n 1)
if [ "$BUILD" = auto ]; then
    BUILD=0
    if [ "$GPU" = 1 ]; then
        if [ -z "$SO" ]; then
            BUILD=1; why="no built extension"
        elif [ -n "$(find csrc setup.py -type f -newer "$SO" 2>/dev/null | head -n 1)" ]; then
            BUILD=1; why="sources newer than $(basename "$SO")"
        fi
    fi
fi
BUILT=0
if [ "$BUILD" = 1 ]; then
    SM=$(envget sm)
    say "build: ${why:-GPU_CHECK_BUILD=1}"
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${SM:-9.0}} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        run_step build "$BUILD_CAP" "$PY" -m pip install -v -e . --no-build-isolation --no-deps
    BUILT=1
elif [ "$DRY" = 1 ]; then
    skip_step build "$BUILD_CAP" "no GPU (dry run); GPU_CHECK_BUILD=1 builds anyway"
else
    skip_step build "$BUILD_CAP" \
        "the built extension is newer than its sources (GPU_CHECK_BUILD=1 rebuilds)"
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
    skip_step import "$IMPORT_CAP" "no build (dry run)"
fi

# LLaMA-2-13B's memory plan from its config alone (plan_13b/plan.json)
run_step plan_13b "$PLAN_CAP" "$PY" -m bench.estimate --plan-13b "$OUT/plan_13b"

# GPU tests (junit in OUTDIR/gpu_tests.xml); without a GPU only collected
XDIST=()
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n auto)
fi
cap=$TESTS_CAP
[ "$BUILD" = 0 ] && cap=$TESTS_CAP_NO_BUILD
if [ "$DRY" = 1 ]; then
    # shellcheck disable=SC2086  # GPU_CHECK_TESTS holds several paths
    run_step gpu_tests "$cap" "$PY" -m pytest -q -m gpu -p no:cacheprovider --collect-only $TESTS
else
    # shellcheck disable=SC2086
    run_step gpu_tests "$cap" "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider "${XDIST[@]}" \
        --junitxml="$OUT/gpu_tests.xml" $TESTS
fi

# micro-benchmarks (OUTDIR/micro_bench/bench.json and bench.md); without a GPU a dry run that
# lists the cases a GPU run would time
BENCH_DRY=()
[ "$TORCH_GPU" = 1 ] || BENCH_DRY=(--dry-run)
run_step micro_bench "$BENCH_CAP" "$PY" -m bench --plan gpu-check --device cuda \
    --out "$OUT/micro_bench" --budget-s "$BENCH_START_S" --no-plots "${BENCH_DRY[@]}"

# ---------------------------------------------------------------------------------------------
# report: OUTDIR/gpu_check.json and OUTDIR/gpu_check.md; exit 1 when anything failed
RPY=$PY
"$RPY" -c pass >/dev/null 2>&1 || RPY=python3
GC_GPU=$GPU GC_DRY=$DRY GC_TORCH_GPU=$TORCH_GPU GC_BUILT=$BUILT GC_SECONDS=$SECONDS \
    GC_REPORT_CAP=$REPORT_CAP timeout -s INT -k 5 "$REPORT_CAP" "$RPY" - "$OUT" <<'PYEOF'
import json, os, re, sys, time
import xml.etree.ElementTree as ET

t_report = time.perf_counter()

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
        name, status, rc, secs, cap, log = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
        steps.append({"name": name, "status": status, "rc": int(rc) if rc else None,
                      "seconds": round(float(secs or 0), 1),
                      "budget_s": int(cap) if cap else None, "log": log})
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
    except Exception as exc:  # a junit file cut short by a kill
        tests = {"error": f"cannot read gpu_tests.xml: {type(exc).__name__}: {exc}"}
    if by_name["gpu_tests"]["status"] == "timeout" and tests and "error" not in tests:
        tests["interrupted"] = True  # the counts are those of the tests that finished
collected = None
if dry and os.path.exists(path("gpu_tests.log")):
    with open(path("gpu_tests.log"), errors="replace") as f:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", f.read())
    collected = int(m.group(1)) if m else None

plan = load_json("plan_13b/plan.json")

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
steps.append({"name": "report", "status": "ok", "rc": 0,
              "seconds": round(time.perf_counter() - t_report, 1),
              "budget_s": int(os.environ["GC_REPORT_CAP"]), "log": ""})
budget = sum(s["budget_s"] or 0 for s in steps if s["status"] != "skipped")
rec = {"gpu": gpu, "dry_run": dry, "ok": ok, "failed_steps": failed, "seconds": seconds,
       "budget_s": budget, "env": env, "steps": steps, "tests": tests,
       "tests_collected": collected, "plan_13b": plan, "bench": bench}
with open(path("gpu_check.json"), "w") as f:
    json.dump(rec, f, indent=2, default=str)

md = ["# gpu_check", ""]
if dry:
    what = ("Nothing was measured (GPU_CHECK_BUILD=1: the build step ran)" if built
            else "Nothing was measured or built")
    md += ["**DRY RUN: no GPU detected** (torch.cuda.is_available() is False). "
           f"{what}; the GPU tests were collected ({collected}), not run.", ""]
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
       f"- result: {'OK' if ok else 'FAILED: ' + ', '.join(failed)} in {seconds} s "
       f"(budget of the steps run: {budget} s)", "",
       "| step | status | exit | seconds | budget s | log |", "|---|---|---|---:|---:|---|"]
for s in steps:
    md.append(f"| {s['name']} | {s['status']} | {'' if s['rc'] is None else s['rc']} "
              f"| {s['seconds']} | {'' if s['budget_s'] is None else s['budget_s']} "
              f"| {s['log']} |")
if plan is not None:
    gib = 2 ** 30
    md += ["", f"LLaMA-2-13B memory plan ({plan['setting']}): peak {plan['peak'] / gib:.2f} GiB "
               f"({'fits' if plan['fits'] else 'DOES NOT FIT'} {plan['limit_gb']:g} GB)", ""]
    md += [f"- {name}: {value / gib:.3f} GiB" for name, value in plan["terms"].items()]
if tests is not None:
    md.append("")
    if "error" in tests:
        md.append(f"GPU tests: {tests['error']}")
    else:
        md.append(f"GPU tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} "
                  f"failed, {tests['skipped']} skipped (junit: gpu_tests.xml)"
                  + (": INTERRUPTED at the step's budget, the tests that finished" if
                     tests.get("interrupted") else ""))
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
