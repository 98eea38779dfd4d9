#!/usr/bin/env bash
# The seeds-by-sparsities quality table of one model: a prune run per sparsity and seed, one at a
# time (runs sharing the cores slow each other), then `probprune-fast compare` of them all into
# OUTDIR/table.md. A finished run is skipped and a killed one resumes from its checkpoint, so
# starting the script again after an interruption picks up where it stopped.
#
#   bench/seed_runs.sh MODEL OUTDIR [PRUNE FLAGS...]
#   e.g. bench/seed_runs.sh gemma3-270m runs/gemma --window-stride 16 --speed-tokens 0
#
# SPARSITIES and SEEDS (environment) replace "0.3 0.5" and "0 1 2"; PROBPRUNE_FAST replaces the
# probprune-fast on the PATH. Each run's output goes to OUTDIR/sparsity-S-seed-N.log.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 MODEL OUTDIR [PRUNE FLAGS...]" >&2; exit 2; }
MODEL=$1; OUT=$2; shift 2
PF=${PROBPRUNE_FAST:-probprune-fast}
mkdir -p "$OUT"
runs=()
for sparsity in ${SPARSITIES:-0.3 0.5}; do
  for seed in ${SEEDS:-0 1 2}; do
    run=$OUT/sparsity-$sparsity-seed-$seed
    runs+=("$run")
    if [ -f "$run/report.json" ]; then
      echo "$run: finished before, skipped"
      continue
    fi
    resume=()
    [ -f "$run/checkpoint.safetensors" ] && resume=(--resume)
    echo "$run: $([ ${#resume[@]} -gt 0 ] && echo resumed || echo started) $(date -u '+%F %T UTC')"
    $PF prune --model "$MODEL" --sparsity "$sparsity" --seed "$seed" --out "$run" \
      ${resume[@]+"${resume[@]}"} "$@" >> "$run.log" 2>&1 ||
      { echo "$run: failed, see $run.log" >&2; exit 1; }
  done
done
$PF compare "${runs[@]}" | tee "$OUT/table.md"
