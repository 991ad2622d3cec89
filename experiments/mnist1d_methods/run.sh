#!/usr/bin/env bash
# The methods the founding documents cite that the main survey does not run: Tf-KD (both variants),
# activation boundaries, IRG, rocket launching and ONE, next to their baselines, at the MNIST-1D survey's
# recipe (conf/experiment/mnist1d_survey.yaml: 80 epochs, the default teacher), 3 seeds, in two parallel
# streams (one per core); then the table, written by kd-lab-compare into results.md / results.csv / *.png here.
#   bash experiments/mnist1d_methods/run.sh [output dir]            (default: ./logs/mnist1d_methods)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/mnist1d_methods}
export OMP_NUM_THREADS=1

run() {  # sweep name, student, overrides...
  local name=$1 student=$2; shift 2
  kd-lab -m experiment=mnist1d_survey "student=$student" seed=0,1,2 "hydra.sweep.dir=$out/$name" "$@" \
    > "$out/$name.log" 2>&1 || echo "sweep $name exited with $? (see $out/$name.log)"
}

mkdir -p "$out"
start=$(date +%s)
kd-lab experiment=mnist1d_survey algorithm=none trainer.max_epochs=1 logger=none "hydra.run.dir=$out/warmup" \
  > "$out/warmup.log" 2>&1  # trains and caches the teacher once, before the parallel streams
rm -rf "$out/warmup"
# Offline methods with both students of the main survey: the vanilla student and KD are the baselines.
# Tf-KD's self-teacher is the student's own architecture trained first: a born-again chain of one generation.
# The self-distillation methods (no teacher) run with the tiny CNN, next to BYOT.
(
  run mlp_medium mlp_medium algorithm=none,kd,ab,irg
  run mlp_medium-self mlp_medium scheme=self algorithm=tf_kd_reg
  run mlp_medium-tf_kd_self mlp_medium chain=born_again algorithm=tf_kd_self
  run cnn1d_tiny-tf_kd_self cnn1d_tiny chain=born_again algorithm=tf_kd_self
) &
(
  run cnn1d_tiny cnn1d_tiny algorithm=none,kd,ab,irg
  run cnn1d_tiny-self cnn1d_tiny scheme=self algorithm=byot,tf_kd_reg,rocket,one
) &
wait
echo "all runs: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
kd-lab-compare "$out"/*/ --markdown "$here/results.md" --csv "$here/results.csv"
