#!/usr/bin/env bash
# GLNN on a CSBM graph: the MLP alone (algorithm=none), the GCN teacher, and the distilled MLP (algorithm=glnn),
# 3 seeds, transductive (data=csbm) and inductive (data=csbm_inductive); then the per-run table (kd-lab-compare:
# results_runs.md / .csv), the summary over seeds (table.py: results.md) and the MLP's inference speed-up
# over the GCN (bench.txt), all here.
#   bash experiments/graph/run.sh [output dir]            (default: ./logs/graph)
# One stream on one core. Budget: 200 full-batch epochs per student, 200 per teacher (README.md says why).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/logs/graph}
export OMP_NUM_THREADS=1
# GLNN's MLP recipe (its train.conf.yaml, Cora): Adam with L2 weight decay 0.005, lr 0.01; for both students.
# teacher.seed follows the seed: each seed distills from its own GCN, and the GNN row averages 3 teachers.
recipe=(student=mlp_graph teacher=gcn 'teacher.seed=${seed}' trainer.max_epochs=200 logger=csv
  optim.optimizer._target_=torch.optim.Adam optim.optimizer.lr=0.01 optim.optimizer.weight_decay=0.005)
mkdir -p "$out"
start=$(date +%s)
for data in csbm csbm_inductive; do
  kd-lab -m "data=$data" algorithm=none,glnn seed=0,1,2 "${recipe[@]}" experiment_name=graph \
    "hydra.sweep.dir=$out/$data" > "$out/$data.log" 2>&1 || echo "sweep $data exited with $? (see $out/$data.log)"
done
echo "all runs: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
# one row per seed (teacher.seed differs), then the summary over the seeds
kd-lab-compare "$out"/*/ --markdown "$here/results_runs.md" --csv "$here/results_runs.csv"
python "$here/table.py" "$out" > "$here/results.md"
python "$here/../../scripts/bench_glnn.py" | tee "$here/bench.txt"
