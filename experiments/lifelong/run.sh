#!/usr/bin/env bash
# Learning without Forgetting against its baselines on MNIST-1D in 5 two-class tasks, 3 seeds each:
# lwf, finetune (the same sequence without the KD term) and joint (all tasks at once: the upper bound).
# One sweep in one process (9 runs, a few seconds each), then the table into results.md / results.csv here.
#   bash experiments/lifelong/run.sh [output dir]            (default: ./logs/lifelong)
# Setting: kd_lab/conf/lifelong.yaml as shipped (mlp_medium trunk, 5 warm-up + 20 epochs per task).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/lifelong}
export OMP_NUM_THREADS=1
mkdir -p "$(dirname "$out")"
start=$(date +%s)
kd-lab-lifelong -m method=lwf,finetune,joint seed=0,1,2 "hydra.sweep.dir=$out" > "$out.log" 2>&1 ||
  { echo "the sweep failed (see $out.log)"; exit 1; }
echo "all runs: $(( $(date +%s) - start )) s"
python "$here/table.py" "$out" --markdown "$here/results.md" --csv "$here/results.csv"
