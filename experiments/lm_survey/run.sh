#!/usr/bin/env bash
# The LM survey: one GPT-2-style teacher (1.07M parameters, trained once and cached), 3 seeds of each row,
# then kd-lab-compare. Rows: the cross-entropy student and every token-level divergence (the 0.24M student);
# the transformer methods (DistilBERT, TinyBERT, MiniLM, MiniLMv2, sequence-level KD, GKD, early exits); and
# the methods that compare hidden states, on a student of the teacher's width (0.67M) with its own baseline.
#   bash experiments/lm_survey/run.sh [output dir]      # default: ./logs/lm_survey
#   SWEEPS="ce forward_kl" bash experiments/lm_survey/run.sh   # only these rows
# Budget and setting: conf/experiment/lm.yaml (pydoc_topics corpus, BPE 2048, blocks of 64 tokens), and the
# epochs below. STREAMS sweeps run side by side (default 2, one per core).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/lm_survey}
epochs=${LM_SURVEY_EPOCHS:-5}
streams=${STREAMS:-2}
export OMP_NUM_THREADS=1
kd_lab=${KD_LAB:-kd-lab}  # the command; e.g. KD_LAB="python -m kd_lab.run.train" for a checkout on PYTHONPATH
common=(experiment=lm "trainer.max_epochs=$epochs" logger=csv)
wide=(student.model.hidden_size=128 student.model.num_heads=4)  # the teacher's width (and head size 32)

declare -A rows=(
  [ce]="algorithm=none"
  [forward_kl]="algorithm.divergence=forward_kl"
  [reverse_kl]="algorithm.divergence=reverse_kl"
  [jsd]="algorithm.divergence=jsd"
  [tvd]="algorithm.divergence=tvd"
  [skew_kl]="algorithm.divergence=skew_kl"
  [skew_rkl]="algorithm.divergence=skew_rkl"
  # DistilBERT's cosine term needs the teacher's width; on the narrow student it runs without it
  [distilbert_no_cos]="algorithm=distilbert algorithm.alpha_cos=0"
  [tinybert]="algorithm=tinybert chain=tinybert student.model.num_heads=4"
  [minilm]="algorithm=minilm student.model.num_heads=4"
  [minilmv2]="algorithm=minilmv2"
  [seq_kd]="algorithm=seq_kd"
  [seq_kd_mixed]="algorithm=seq_kd algorithm.seq_weight=0.5 algorithm.word_weight=0.5"
  [gkd]="algorithm=gkd"
  [gkd_half]="algorithm=gkd algorithm.lam=0.5"
  [early_exit]="scheme=self algorithm=early_exit"
  [ce_wide]="algorithm=none ${wide[*]}"
  [distilbert_wide]="algorithm=distilbert ${wide[*]}"
  [distilbert_wide_init]="algorithm=distilbert student.init_from_teacher=every_other ${wide[*]}"
  [pkd_wide]="algorithm=pkd ${wide[*]}"
)
# The slowest first, so the streams end together.
# seq_kd generates the stored sequences that seq_kd_mixed reuses: they are far apart.
order=(seq_kd gkd tinybert distilbert_wide_init distilbert_wide pkd_wide ce_wide gkd_half jsd skew_rkl tvd
  forward_kl reverse_kl skew_kl early_exit minilm minilmv2 distilbert_no_cos seq_kd_mixed ce)
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
