#!/usr/bin/env bash
# The CRD CIFAR-100 benchmark (RepDistiller's recipe): one cell, a row, a column or the whole grid, then the
# table (kd-lab-compare) and its gap to the published numbers (compare_reference.py).
#   bash experiments/cifar100_crd/run.sh PAIR|all METHOD|all [SEEDS] [extra kd-lab overrides...]
#   bash experiments/cifar100_crd/run.sh resnet32x4-resnet8x4 crd 0            # one cell, one seed
#   bash experiments/cifar100_crd/run.sh all all 0,1,2                         # 13 pairs x 10 methods x 3 seeds
#   bash experiments/cifar100_crd/run.sh vgg13-vgg8 kd 0 teacher.ckpt_path=/path/vgg13.pt  # a released teacher
# Output: $CIFAR_CRD_OUT (default ./logs/cifar100_crd)/<pair>/<method>/ per sweep, table.{md,csv}, gap.md.
# CIFAR-100 must be unpacked under paths.data_dir (default ./data/cifar-100-python/). Jobs run one after the
# other on one GPU; every teacher is trained once (teacher store) and reused by all methods and seeds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pairs_dir="$here/../../kd_lab/conf/experiment/cifar100_crd"
pair=${1:?pair name (e.g. resnet32x4-resnet8x4) or all}
method=${2:?method (none kd fitnet attention sp rkd pkt crd crd_kd dkd) or all}
seeds=${3:-0}
shift $(( $# < 3 ? $# : 3 ))
out=${CIFAR_CRD_OUT:-$PWD/logs/cifar100_crd}

# RepDistiller's per-method weights (scripts/run_cifar_distill.sh, tuned on resnet32x4->resnet8x4 and used for
# every pair, RD#6). Values that equal conf/algorithm/<name>.yaml are listed anyway, so the grid states them.
overrides() {  # method pair -> kd-lab overrides
  case $1 in
    none) echo "algorithm.ce_weight=1" ;;  # the vanilla student
    kd) echo "algorithm.ce_weight=0.1 algorithm.kd_weight=0.9 algorithm.temperature=4" ;;  # -r 0.1 -a 0.9
    fitnet) echo "algorithm.ce_weight=1 algorithm.hint_weight=100 algorithm.student_tap=1 algorithm.teacher_tap=1" ;;
    # ^ -a 0 -b 100, hint_layer 2 = RepDistiller's feat[2] = our stage 1 (our stages exclude the stem)
    attention) echo "algorithm.ce_weight=1 algorithm.at_weight=2000 algorithm.p=2" ;;  # -a 0 -b 1000, no /2 there
    sp) echo "algorithm.ce_weight=1 algorithm.sp_weight=3000" ;;  # -a 0 -b 3000
    rkd) echo "algorithm.ce_weight=1 algorithm.rkd_weight=1 algorithm.distance_weight=25 algorithm.angle_weight=50" ;;
    pkt) echo "algorithm.ce_weight=1 algorithm.pkt_weight=30000" ;;  # -a 0 -b 30000
    crd) echo "algorithm.ce_weight=1 algorithm.crd_weight=0.8 algorithm.nce_k=16384" ;;  # -a 0 -b 0.8
    crd_kd) echo "algorithm.ce_weight=1 algorithm.kd_weight=1 algorithm.temperature=4 algorithm.crd_weight=0.8" ;;  # -a 1 -b 0.8
    dkd)  # mdistiller configs/cifar100/dkd/*.yaml: beta 8, 2 or 6 by pair; T 4, warm-up 20
      local beta=8
      case $2 in
        resnet56-resnet20 | resnet110-resnet32) beta=2 ;;
        vgg13-vgg8 | vgg13-MobileNetV2 | wrn_40_2-wrn_16_2 | wrn_40_2-wrn_40_1) beta=6 ;;
      esac
      echo "algorithm.ce_weight=1 algorithm.alpha=1 algorithm.beta=$beta algorithm.temperature=4 algorithm.warmup_epochs=20" ;;
    *) echo "unknown method $1 (none kd fitnet attention sp rkd pkt crd crd_kd dkd)" >&2; return 1 ;;
  esac
}

if [[ $pair == all ]]; then
  pairs=$(cd "$pairs_dir" && ls *.yaml | sed 's/\.yaml$//')
else
  [[ -f $pairs_dir/$pair.yaml ]] || { echo "no pair $pair; pairs: $(cd "$pairs_dir" && ls | sed 's/\.yaml$//' | xargs)" >&2; exit 1; }
  pairs=$pair
fi
methods=$([[ $method == all ]] && echo "none kd fitnet attention sp rkd pkt crd crd_kd dkd" || echo "$method")

mkdir -p "$out"
for p in $pairs; do
  for m in $methods; do
    extra=$(overrides "$m" "$p")
    echo "== $p $m seeds=$seeds -> $out/$p/$m"
    # shellcheck disable=SC2086
    kd-lab -m "experiment=cifar100_crd/$p" "algorithm=$m" $extra "seed=$seeds" \
      "hydra.sweep.dir=$out/$p/$m" "$@"
  done
done
kd-lab-compare "$out" --markdown "$out/table.md" --csv "$out/table.csv" > /dev/null
python "$here/compare_reference.py" "$out/table.csv" --markdown "$out/gap.md"
