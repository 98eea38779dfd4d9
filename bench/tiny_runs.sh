#!/usr/bin/env bash
# Whole command-line runs on the tests' tiny Llama, Qwen2 and Qwen3 models (fixed seeds, with and
# without compensation, layers prunable), printing every perplexity and a hash of the masks and of
# the exported weights: run it on two checkouts and diff the outputs to show that a change moves
# no figure.
#
#   bench/tiny_runs.sh CHECKOUT OUTDIR [PYTHON]      e.g. bench/tiny_runs.sh . /tmp/tiny-new
set -euo pipefail
CHECKOUT=$(cd "$1" && pwd); OUT=$2; PY=${3:-$CHECKOUT/.venv/bin/python}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$CHECKOUT"
"$PY" - "$OUT" <<'PYEOF'
import os, sys
from tests.tiny_models import CORPUS, make_model_dir
out = sys.argv[1]
for arch in ("llama", "qwen3", "qwen2"):
    if not os.path.exists(os.path.join(out, "m_" + arch)):
        make_model_dir(os.path.join(out, "m_" + arch), arch)
open(os.path.join(out, "calib.txt"), "w").write("\n".join(CORPUS * 60) + "\n")
PYEOF
for arch in llama qwen3 qwen2; do
  for comp in none sequential; do
    run=$OUT/run_${arch}_$comp
    "$PY" -m probprune prune --model "$OUT/m_$arch" --sparsity 0.3 --out "$run" --steps 8 --k 3 \
      --batch-size 2 --seqlen 24 --calib "$OUT/calib.txt" --nsamples 12 --val-windows 3 \
      --select-windows 4 --eval "$OUT/calib.txt" --max-windows 6 --eval-every 2 --seed 3 \
      --compensate $comp --compensate-windows 8 --prune-layers --budget global \
      > "$OUT/log_${arch}_$comp.txt" 2>&1
    "$PY" - "$run" "$arch $comp" <<'PYEOF'
import hashlib, json, sys
from safetensors.torch import load_file
run, name = sys.argv[1:]
report = json.load(open(f"{run}/report.json"))
def digest(path):
    t = load_file(path)
    return hashlib.sha256(b"".join(t[k].float().numpy().tobytes() for k in sorted(t))).hexdigest()[:16]
print(name, {k: round(v["ppl"], 6) for k, v in report["perplexity"].items()},
      "masks", digest(f"{run}/masks.safetensors"), "weights", digest(f"{run}/model.safetensors"))
PYEOF
  done
done
