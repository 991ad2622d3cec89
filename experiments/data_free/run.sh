#!/usr/bin/env bash
# Data-free distillation on MNIST-1D: dafl, zskt and deep_inversion, 3 seeds each, against kd (with the real
# data) and the vanilla student (algorithm=none), at one short budget; then the table, by kd-lab-compare,
# into results.md / results.csv here.
#   bash experiments/data_free/run.sh [output dir]            (default: ./logs/data_free)
# Setting: conf/experiment/mnist1d_survey.yaml (the default teacher cnn1d_large, trained once and cached in
# the teacher store), student cnn1d_tiny, trainer.max_epochs=$EPOCHS (README.md: the budget and why).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/data_free}
EPOCHS=${EPOCHS:-20}
export OMP_NUM_THREADS=1

run() {  # sweep name, overrides...
  local name=$1; shift
  kd-lab -m experiment=mnist1d_survey student=cnn1d_tiny seed=0,1,2 "trainer.max_epochs=$EPOCHS" \
    "hydra.sweep.dir=$out/$name" "$@" > "$out/$name.log" 2>&1 || echo "sweep $name exited with $? (see $out/$name.log)"
}

mkdir -p "$out"
start=$(date +%s)
kd-lab experiment=mnist1d_survey algorithm=none trainer.max_epochs=1 logger=none "hydra.run.dir=$out/warmup" \
  > "$out/warmup.log" 2>&1  # trains and caches the teacher once, before the parallel streams
rm -rf "$out/warmup"
(  # two streams, one per core
  run baselines algorithm=none,kd
  run dafl algorithm=dafl
) &
(
  run zskt algorithm=zskt
  run deep_inversion algorithm=deep_inversion  # one synthetic set, made by seed 0's job, reused by seeds 1 and 2
) &
wait
echo "all runs: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
kd-lab-compare "$out"/*/ --markdown "$here/results.md" --csv "$here/results.csv"
# the synthetic sample counts and synthesis times, from each run's results.json (no machine path)
python - "$out" > "$here/synthesis.md" <<'PY'
import json, sys
from pathlib import Path

print("| algorithm | seed | synthetic samples | synthesis seconds | cached |")
print("|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("*/*/results.json")):
    r = json.loads(path.read_text())
    a = r.get("algorithm") or {}
    if "synthetic_samples" in a:
        name = r["names"]["algorithm"]
        print(f"| {name} | {r['seed']} | {a['synthetic_samples']} | {a['synthesis_seconds']} | {a.get('synthesis_cached', '-')} |")
PY
