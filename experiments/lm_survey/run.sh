#!/usr/bin/env bash
# The LM survey: one GPT-2-style teacher (1.07M parameters, trained once and cached), one student (0.24M),
# the plain cross-entropy student and every token-level divergence, 3 seeds; then kd-lab-compare.
#   bash experiments/lm_survey/run.sh [output dir]      # default: ./logs/lm_survey
# Budget and setting: conf/experiment/lm.yaml (pydoc_topics corpus, BPE 2048, blocks of 64 tokens), and the
# epochs below.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/lm_survey}
epochs=${LM_SURVEY_EPOCHS:-5}
export OMP_NUM_THREADS=1
kd_lab=${KD_LAB:-kd-lab}  # the command; e.g. KD_LAB="python -m kd_lab.run.train" for a checkout on PYTHONPATH
common=(experiment=lm "trainer.max_epochs=$epochs" logger=csv)

run() {  # sweep name, overrides...
  local name=$1; shift
  $kd_lab -m "${common[@]}" seed=0,1,2 "hydra.sweep.dir=$out/$name" "$@" > "$out/$name.log" 2>&1 \
    || echo "sweep $name exited with $? (see $out/$name.log)"
}

mkdir -p "$out"
start=$(date +%s)
$kd_lab "${common[@]}" algorithm=none trainer.max_epochs=1 logger=none "hydra.run.dir=$out/warmup" \
  > "$out/warmup.log" 2>&1  # trains and caches the teacher once, before the parallel streams
rm -rf "$out/warmup"
# Two streams, one per core.
(
  run ce algorithm=none
  run forward_kl algorithm.divergence=forward_kl
  run reverse_kl algorithm.divergence=reverse_kl
  run jsd algorithm.divergence=jsd
) &
(
  run tvd algorithm.divergence=tvd
  run skew_kl algorithm.divergence=skew_kl
  run skew_rkl algorithm.divergence=skew_rkl
) &
wait
echo "all runs: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
${KD_LAB_COMPARE:-kd-lab-compare} "$out"/*/ --markdown "$here/results.md" --csv "$here/results.csv"
