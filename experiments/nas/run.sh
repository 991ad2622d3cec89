#!/usr/bin/env bash
# Distillation-aware student search on MNIST-1D, then the best student retrained with and without KD.
#   bash experiments/nas/run.sh [output dir]            (default: ./logs/nas)
# 1. the search: 14 Optuna (TPE) trials of a 1-D CNN student under a 10,000-parameter budget, each a 15-epoch
#    KD run from the survey's cached teacher, scored by best validation accuracy (hparams_search=student_nas);
# 2. the Pareto front of the trials (kd-lab-pareto) into pareto.md / pareto.png here;
# 3. the best trial's student at the survey recipe (experiment=mnist1d_survey, 80 epochs), KD and vanilla,
#    seeds 0, 1, 2, into results.md / results.csv here (kd-lab-compare).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/nas}
export OMP_NUM_THREADS=1
mkdir -p "$out"
start=$(date +%s)
# A trial over budget fails before compute, so the search exits with status 1 when one was refused.
kd-lab -m experiment=mnist1d_survey hparams_search=student_nas "hydra.sweep.dir=$out/search" \
  > "$out/search.log" 2>&1 || echo "the search exited with $? (refused trials are expected; see $out/search.log)"
echo "search: $(( $(date +%s) - start )) s"
kd-lab-pareto "$out/search" --markdown "$here/pareto.md" --png "$here/pareto.png" > /dev/null
# the best trial's scalars, as overrides: student.model.depth=3 student.model.width=16 ...
best=$(python -c "
import sys
from omegaconf import OmegaConf
best = OmegaConf.load(sys.argv[1]).best_params
print(' '.join(f'{k}={v}' for k, v in best.items()))" "$out/search/optimization_results.yaml")
echo "best trial: $best" | tee "$out/best.txt"
# shellcheck disable=SC2086  # $best is several overrides
kd-lab -m experiment=mnist1d_survey student=cnn1d_search $best student.model.measure_latency=true \
  algorithm=kd,none seed=0,1,2 "hydra.sweep.dir=$out/retrain" > "$out/retrain.log" 2>&1 ||
  echo "the retraining exited with $? (see $out/retrain.log)"
echo "all runs: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
kd-lab-compare "$out/retrain" --markdown "$here/results.md" --csv "$here/results.csv" > /dev/null
