#!/usr/bin/env bash
# The encoder table: every transformer method on a masked LM. A BERT teacher (4 layers, 128 wide, 4 heads,
# trained once and cached) and a BERT student of the teacher's width and head count (2 layers), so every
# method runs as its paper has it: DistilBERT's cosine and PKD's patient term compare hidden states,
# TinyBERT's attention term compares heads. 3 seeds of each row, then kd-lab-compare.
#   bash experiments/lm_encoders/run.sh [output dir]      # default: ./logs/lm_encoders
#   SWEEPS="ce distilbert" bash experiments/lm_encoders/run.sh   # only these rows
# The data and budget are the LM survey's (conf/experiment/lm.yaml, 5 epochs), with data=text_mlm:
# 15% of the tokens masked, BERT's 80/10/10 rule. STREAMS sweeps run side by side (default 2).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/lm_encoders}
epochs=${LM_SURVEY_EPOCHS:-5}
streams=${STREAMS:-2}
export OMP_NUM_THREADS=1
kd_lab=${KD_LAB:-kd-lab}  # the command; e.g. KD_LAB="python -m kd_lab.run.train" for a checkout on PYTHONPATH
common=(experiment=lm data=text_mlm teacher=bert_teacher student=bert_student student.model.hidden_size=128
  student.model.num_heads=4 "trainer.max_epochs=$epochs" logger=csv)

declare -A rows=(
  [ce]="algorithm=none"
  [token_kd]="algorithm=token_kd"
  [distilbert]="algorithm=distilbert"
  [distilbert_init]="algorithm=distilbert student.init_from_teacher=every_other"
  [pkd]="algorithm=pkd"
  [tinybert]="algorithm=tinybert chain=tinybert"
  [minilm]="algorithm=minilm"
  [minilmv2]="algorithm=minilmv2"
  [early_exit]="scheme=self algorithm=early_exit"
)
order=(tinybert distilbert_init distilbert pkd minilm minilmv2 token_kd early_exit ce)  # the slowest first
read -r -a selected <<< "${SWEEPS:-${order[*]}}"

run() {  # sweep name
  local name=$1
  # shellcheck disable=SC2086  # the row's overrides are words
  $kd_lab -m "${common[@]}" seed=0,1,2 "hydra.sweep.dir=$out/$name" ${rows[$name]} > "$out/$name.log" 2>&1 \
    || echo "sweep $name exited with $? (see $out/$name.log)"
}

mkdir -p "$out"
for name in "${selected[@]}"; do
  [[ -n ${rows[$name]+x} ]] || { echo "unknown row '$name'; the rows are: ${order[*]}"; exit 2; }
done
start=$(date +%s)
$kd_lab "${common[@]}" algorithm=none trainer.max_epochs=1 logger=none "hydra.run.dir=$out/warmup" \
  > "$out/warmup.log" 2>&1  # trains and caches the teacher once, before the parallel streams
rm -rf "$out/warmup"
for name in "${selected[@]}"; do
  while (( $(jobs -rp | wc -l) >= streams )); do wait -n; done
  run "$name" &
done
wait
echo "all runs: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
${KD_LAB_COMPARE:-kd-lab-compare} "$out"/*/ --markdown "$here/results.md" --csv "$here/results.csv"
